"""Which scaled_dot_product_attention kernel the shipped transformer runs, what share of a forward attention is,
and what forcing each backend does (issue 15). One NFE of a bundle's main-stage network in bf16 autocast:

1. the kernels the default dispatch launches (profiler kernel names: flash, cuDNN, memory-efficient or math);
2. the whole network forward and the attention alone (the blocks' SDPA calls on q, k, v of the network's shapes),
   under the default dispatch and under each backend forced with `torch.nn.attention.sdpa_kernel`;
   a backend that cannot run these shapes is reported with its error.

Median of repeats after a warm-up, synchronised; eager (no torch.compile), so each call is one kernel choice.

    python benchmarks/bench_attention.py --model ds2-factorised --batch 10000 [--device cuda]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from calofast.checkpoint import load_bundle


def timed_ms(fn, reps: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def kernel_names(fn, device: torch.device) -> list[str]:
    """Names of the attention kernels (or CPU ops) one call launches."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    keys = ("flash", "fmha", "efficient", "cudnn", "attention", "softmax", "bmm")
    names = {e.key for e in prof.key_averages() if any(k in e.key.lower() for k in keys)}
    return sorted(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ds2-factorised")
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    b = load_bundle(a.model, device)
    den = b.stages[-1].denoiser
    net = den.net
    blocks = net.blocks
    x = torch.randn(a.batch, *b.transform.stage_shapes[-1], device=device)
    sigma = torch.full((a.batch,), 1.0, device=device)
    cond = torch.zeros(a.batch, b.transform.cond_dims[-1], device=device)
    heads, width = blocks[0].heads, blocks[0].qkv.in_features
    n_tokens = net._positions().shape[0]
    q = torch.randn(3, a.batch, heads, n_tokens, width // heads, device=device, dtype=torch.bfloat16)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{a.model}: {len(blocks)} blocks, {heads} heads, {n_tokens} tokens of width {width}; batch {a.batch}; {name}; "
          f"torch {torch.__version__}")

    def forward():
        with torch.autocast(device.type, torch.bfloat16):
            den(x, sigma, cond)

    def attention():
        for _ in blocks:
            F.scaled_dot_product_attention(q[0], q[1], q[2])

    print("default dispatch launches:", ", ".join(kernel_names(attention, device)) or "(none found)")
    backends = [("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)]
    for label, backend in backends:
        try:
            if backend is None:
                t_net, t_att = timed_ms(forward, a.reps, device), timed_ms(attention, a.reps, device)
            else:
                with sdpa_kernel(backend):
                    t_net, t_att = timed_ms(forward, a.reps, device), timed_ms(attention, a.reps, device)
            print(f"  {label:17s} network {t_net:9.2f} ms, attention {t_att:9.2f} ms ({100 * t_att / t_net:5.1f} % of the "
                  f"network), {a.batch / t_net * 1e3:10.0f} showers/s per NFE")
        except RuntimeError as err:          # a backend that cannot run these shapes on this device: say so, go on
            print(f"  {label:17s} not available here: {str(err).splitlines()[0][:120]}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
