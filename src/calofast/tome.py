"""Token merging for the patch transformer at inference (ToMe, Bolya et al. 2023; for diffusion, ToMe for
Stable Diffusion, Bolya & Hoffman 2023).

In every block the tokens are split alternately into destinations (even positions) and sources (odd); each
source is matched to its most similar destination (cosine similarity of the block's modulated, normalised
input), and the r = ratio x N best-matched sources are averaged into their destinations. Attention and MLP run on
the N - r tokens left; their outputs are copied back to every merged position ("unmerge"), so the residual
stream keeps all N tokens and the network keeps its forward(x, c_noise, cond). The matching is recomputed in
each block and at each call; ratio 0 is the plain network, operation for operation.

`token_merging(bundle, ratio)` sets the ratio of the bundle's main (transformer) stage in place: every sampler,
`generate`, `bench`, the CUDA graph, DeepCache and the study run it unchanged. Inference only: a bundle does not
store it.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["bipartite_merge", "token_merging", "parse_tome", "model_side"]


def bipartite_merge(metric: torch.Tensor, r: int) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                            Callable[[torch.Tensor], torch.Tensor]]:
    """(merge, unmerge) for tokens [B, N, C] matched by `metric` [B, N, C]: merge maps [B, N, *] to
    [B, N - r, *] (r capped at the N // 2 sources), unmerge maps [B, N - r, *] back to [B, N, *]."""
    B, N, _ = metric.shape
    n_src = N // 2
    r = max(0, min(int(r), n_src))
    with torch.no_grad():
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = m[:, 1::2] @ m[:, ::2].transpose(1, 2)                  # [B, sources, destinations]
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)[..., None]          # sources, most similar first
        src_idx, unm_idx = order[:, :r], order[:, r:]                     # [B, r, 1], [B, n_src - r, 1]
        dst_idx = best_dst[..., None].gather(1, src_idx)                  # [B, r, 1]

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        src, dst = x[:, 1::2], x[:, ::2]
        kept = src.gather(1, unm_idx.expand(-1, -1, c))
        moved = src.gather(1, src_idx.expand(-1, -1, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, c), moved, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        c, n_unm = y.shape[-1], unm_idx.shape[1]
        kept, dst = y[:, :n_unm], y[:, n_unm:]
        src = torch.empty(B, n_src, c, dtype=y.dtype, device=y.device)
        src = src.scatter(1, unm_idx.expand(-1, -1, c), kept)
        src = src.scatter(1, src_idx.expand(-1, -1, c), dst.gather(1, dst_idx.expand(-1, -1, c)))
        out = torch.empty(B, N, c, dtype=y.dtype, device=y.device)
        out[:, ::2] = dst
        out[:, 1::2] = src
        return out

    return merge, unmerge


def parse_tome(value: "str | float | None", what: str = "--tome") -> float:
    """A merge ratio in [0, 0.5] (at most every source token merged); None or '' -> 0."""
    if value is None or value == "":
        return 0.0
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {value!r}: expected a merge ratio between 0 and 0.5") from None
    if not 0.0 <= ratio <= 0.5:
        raise ValueError(f"{what} {value!r}: expected a merge ratio between 0 and 0.5 (the share of tokens merged)")
    return ratio


def token_merging(bundle, ratio: float):
    """The bundle with its main stage's transformer merging `ratio` of its tokens in every block, in place."""
    from .deepcache import DeepCache
    from .nn.transformer import Transformer3D
    den = bundle.stages[-1].denoiser
    net = den.net.net if isinstance(den.net, DeepCache) else den.net
    if not isinstance(net, Transformer3D):
        raise ValueError(f"--tome needs a transformer main stage (this one is a {type(net).__name__})")
    net.tome = parse_tome(ratio)                     # grid-bound copies (shortcut models) share this network
    return bundle


def model_side(bundle, deep_cache: str | None = None, tome: "float | str | None" = None):
    """The bundle with the inference-time model-side options of `generate`, `bench` and study rows applied to its
    main stage: DeepCache ('KEEP:INTERVAL' or 'KEEP:i,j,...') and token merging (a ratio); unchanged without them."""
    from .deepcache import deep_cache as apply_cache, parse_deep_cache
    if spec := parse_deep_cache(deep_cache):
        apply_cache(bundle, *spec)
    if ratio := parse_tome(tome):
        token_merging(bundle, ratio)
    return bundle
