"""Showers from a model bundle: sigma grids for each sampler, batched sampling, CaloChallenge output.

`make_sigmas` chooses the grid a sampler runs on: for DDPM/DDIM on a discrete-VP model a subset of
its training table (trailing spacing by default), otherwise a Karras grid (rho = 7) from sigma_max
(capped at 160 sigma_data, spec 4.1) to sigma_min. Distilled students carry their own grid.
`sampling_plan` gives every stage of a bundle its sampler: the main (last) stage the one asked for,
earlier stages (a factorised model's energy stage) their own default. `sample_batch` runs one batch
stage by stage with per-event noise (event k identical whatever the batch size), counts the NFE of
each stage and returns physical showers and which had to be clipped. `generate_file` streams any
number of showers to disk.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Bundle, Stage
from .deepcache import reset_caches
from .diffusion import Boundary
from .distill.consistency import consistency_points
from .interval import bind, uniform_grid
from .rng import EventRNG
from .samplers import SAMPLERS, CountingDenoiser
from .schedules import SIGMA_MAX_CAP, karras, karras_consistency, table_grid
from .transforms import MAX_RESPONSE

log = logging.getLogger("calofast")

__all__ = ["default_batch_size", "make_sigmas", "sample_batch", "generate_file", "GenerateStats", "resolve_sampler", "sampling_plan",
           "bound_plan", "run_stages", "parse_stage_sampler", "compile_network", "gemm_weights_bf16", "is_compiled", "nfe_text",
           "shard_range", "merge_files"]


MAX_STEPS = 10_000      # sampler steps beyond this are a typo, not a plan (a 4000-step table is the largest trained)
PROGRESS_INTERVAL_S = 0.5  # the generate bar's within-batch note (batch, stage, call) is redrawn at most this often


def _check_steps(steps: int, where: str = "steps") -> int:
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"{where}: {steps} steps; expected 1 to {MAX_STEPS}")
    return steps


def _table(param):
    """The discrete VP table of a DDPM-style model, None for continuous-sigma models (EDM, flow)."""
    base = param.base if isinstance(param, Boundary) else param
    return base.table.sigmas if hasattr(base, "table") else None


def make_sigmas(denoiser, name: str, steps: int, *, spacing: str = "trailing", rho: float = 7.0,
                sigma_max: float | None = None) -> torch.Tensor:
    """The sigma grid (float64, CPU) that sampler `name` uses with `steps` steps on this denoiser."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    _check_steps(steps)
    table = _table(denoiser.param)
    if SAMPLERS[name].grid == "table" and table is not None:
        if steps > len(table):
            raise ValueError(f"{name} with {steps} steps exceeds the model's {len(table)}-entry table")
        return table_grid(table, steps, spacing)
    s_max = sigma_max or min(denoiser.sigma_max, SIGMA_MAX_CAP * denoiser.sigma_data)
    if SAMPLERS[name].grid == "consistency":
        return torch.cat([karras_consistency(max(steps, 2), denoiser.sigma_min, s_max, rho)[:steps],
                          torch.tensor([denoiser.sigma_min], dtype=torch.float64)])
    return karras(steps, denoiser.sigma_min, s_max, rho)


def _resolve(stage: Stage, name: str | None, steps: int | None, where: str) -> tuple[str, int, torch.Tensor]:
    if steps is not None:
        _check_steps(steps, where)
    spec = stage.sampler or {}
    name = name or spec.get("name") or "dpmpp-2m"
    jumps = spec.get("method") == "shortcut" and name == spec["name"]       # a shortcut model: any number of jumps
    if spec and name == spec["name"]:
        if steps in (None, int(spec["steps"])) and "sigmas" in spec:
            return name, int(spec["steps"]), torch.tensor(spec["sigmas"], dtype=torch.float64)
        if steps not in (None, int(spec["steps"])) and "grid" in spec:    # consistency: any steps from its grid
            return name, steps, consistency_points(spec["grid"], steps)
        if steps not in (None, int(spec["steps"])) and "sigmas" in spec and not jumps:
            raise ValueError(f"{where}: distilled for {spec['name']} with {spec['steps']} steps; "
                             f"other step counts need an explicit --sampler")
        steps = steps or int(spec["steps"])
    elif spec and "sigmas" in spec:
        log.warning("%s: distilled for %s with %s step%s; --sampler %s runs it as an ordinary denoiser "
                    "(expect poor showers)", where, spec["name"], spec["steps"], "" if int(spec["steps"]) == 1 else "s", name)
    steps = steps or 20
    if jumps:
        return name, steps, uniform_grid(steps, float(spec["sigma_max"]))
    return name, steps, make_sigmas(stage.denoiser, name, steps)


def resolve_sampler(bundle: Bundle, name: str | None, steps: int | None) -> tuple[str, int, torch.Tensor]:
    """(sampler, steps, sigma grid) of the main stage. A distilled bundle brings its own sampler, steps and
    grid; explicit flags override them; otherwise DPM-Solver++(2M) with 20 steps on `make_sigmas`' grid."""
    return _resolve(bundle.stages[-1], name, steps, str(bundle.path))


def parse_stage_sampler(text: str | None, what: str = "--energy-sampler") -> tuple[str, int] | None:
    """'dpmpp-2m:16' -> ('dpmpp-2m', 16): the sampler of the stages before the main one (None: their own);
    `what` names the option in the error."""
    if not text:
        return None
    name, _, steps = text.partition(":")
    if name not in SAMPLERS or not steps.isdigit() or not 1 <= int(steps) <= MAX_STEPS:
        raise ValueError(f"{what} {text!r}: expected NAME:STEPS with NAME one of {', '.join(SAMPLERS)} "
                         f"and 1 <= STEPS <= {MAX_STEPS}, e.g. dpmpp-2m:16")
    return name, int(steps)


def sampling_plan(bundle: Bundle, name: str | None = None, steps: int | None = None,
                  sigmas: torch.Tensor | None = None,
                  early: tuple[str, int] | None = None) -> list[tuple[str, int, torch.Tensor]]:
    """(sampler, steps, grid) for every stage: the main stage as asked, earlier stages (a factorised model's
    energy stage) their own default or `early` = (sampler, steps)."""
    e_name, e_steps = early or (None, None)
    plan = [_resolve(stage, e_name, e_steps, f"{bundle.path} ({stage.name} stage)") for stage in bundle.stages[:-1]]
    main = (name, steps, sigmas) if sigmas is not None else resolve_sampler(bundle, name, steps)
    return plan + [main]


def nfe_text(nfe: dict[str, int]) -> str:
    """'NFE 20' for one stage, 'NFE 20 (+63 energy)' for a factorised model: the main stage first."""
    *early, main = nfe.items()
    return f"NFE {main[1]}" + "".join(f" (+{n} {name})" for name, n in early)


def gemm_weights_bf16(bundle: Bundle) -> Bundle:
    """Store the weights and biases of every Linear and Conv layer in bf16, in place: exactly the values
    autocast feeds those GEMMs (the same showers under `bf16=True`), without a cast kernel per weight and
    call, which a compiled graph would otherwise run at every step. Other parameters (positions, norms)
    stay float32. Only for bf16 sampling from then on."""
    for stage in bundle.stages:
        for m in stage.denoiser.net.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.data = p.data.to(torch.bfloat16)
    return bundle


def compile_network(bundle: Bundle, bf16: bool = False) -> Bundle:
    """Compile the denoiser of every stage (preconditioning and network) in place with torch.compile
    (inductor, static shapes); the noise hashing of `EventRNG` is compiled with it (`sample_batch`). With
    `bf16` (the bundle will sample in bf16 only) the GEMM weights are stored in bf16 first (`gemm_weights_bf16`).

    The samplers stay eager; parameter names (state_dict) are unchanged. The first call at each new batch
    size compiles (tens of seconds); later calls reuse the kernels."""
    from .deepcache import DeepCache
    if bf16:
        gemm_weights_bf16(bundle)
    for stage in bundle.stages:
        if isinstance(stage.denoiser.net, DeepCache):      # its parts: the call schedule stays in Python
            stage.denoiser.net.compile_parts()
        else:
            stage.denoiser.compile(dynamic=False)
    return bundle


def _compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def is_compiled(bundle: Bundle) -> bool:
    from .deepcache import DeepCache
    net = bundle.denoiser.net
    return _compiled(bundle.denoiser) or (isinstance(net, DeepCache) and net.compiled)


def sample_batch(bundle: Bundle, energies: torch.Tensor, seed: int, events, *, sampler: str | None = None,
                 steps: int | None = None, sigmas: torch.Tensor | None = None, bf16: bool = False,
                 knobs: dict | None = None, early: tuple[str, int] | None = None, on_call=None
                 ) -> tuple[torch.Tensor, dict[str, int], torch.Tensor]:
    """One batch: (showers [B, V] MeV float32 on the bundle's device, counted NFE per stage, clipped [B]).

    sampler/steps (and the sampler `knobs`) apply to the main stage and default to the bundle's own
    (distilled students), else DPM-Solver++(2M) with 20 steps; earlier stages use their own default, or
    `early` = (sampler, steps). `on_call(stage, nfe)`: called as each network evaluation starts (progress)."""
    device = next(bundle.denoiser.parameters()).device
    energies = torch.as_tensor(energies, dtype=torch.float64, device=device).reshape(-1)
    plan = bound_plan(bundle, sampling_plan(bundle, sampler, steps, sigmas, early))
    rng = EventRNG(seed, events, device, fused=is_compiled(bundle))
    return run_stages(bundle, plan, energies, rng, bf16=bf16, knobs=knobs, on_call=on_call)


def bound_plan(bundle: Bundle, plan: list[tuple[str, int, torch.Tensor]]) -> list[tuple[str, torch.Tensor, object]]:
    """(sampler, grid, the denoiser that sampler calls on that grid) for every stage; a denoiser bound to a
    grid (a shortcut model's, one object per grid) is compiled when its stage is."""
    out = []
    for stage, (name, _, grid) in zip(bundle.stages, plan):
        bound = bind(stage.denoiser, name, grid)
        if bound is not stage.denoiser and _compiled(stage.denoiser) and not _compiled(bound):
            bound.compile(dynamic=False)
        out.append((name, grid, bound))
    return out


def run_stages(bundle: Bundle, plan: list[tuple[str, torch.Tensor, object]], energies: torch.Tensor, rng: EventRNG,
               *, bf16: bool = False, knobs: dict | None = None, autocast_cache: bool = True,
               mark=None, on_call=None) -> tuple[torch.Tensor, dict[str, int], torch.Tensor]:
    """The GPU/CPU work of one batch: every stage's noise, sampler and condition, then the inverse transform.
    No host synchronisation, so a CUDA graph can capture it (`graphs.GraphedSampler`; autocast_cache off).
    `mark(phase)`, if given, is called after each phase ('condition STAGE', 'noise STAGE', 'sampler STAGE',
    'decode'): the hook of `benchmarks/profile_pipeline.py`; `on_call(stage, nfe)` as each network call starts."""
    device, mark = energies.device, mark or (lambda phase: None)
    xs, nfe = [], {}
    for k, (stage, (name, grid, denoiser)) in enumerate(zip(bundle.stages, plan)):
        cond = bundle.transform.stage_condition(k, energies, xs)
        mark(f"condition {stage.name}")
        noise = rng.randn(bundle.transform.stage_shapes[k])
        mark(f"noise {stage.name}")
        reset_caches(denoiser)
        counted = CountingDenoiser(denoiser, on_call and (lambda n, s=stage.name: on_call(s, n)))
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16,
                                             cache_enabled=autocast_cache):
            x0 = SAMPLERS[name].fn(counted, noise, grid, cond, rng=rng, **((knobs or {}) if k == len(plan) - 1 else {}))
        xs.append(x0.float())
        nfe[stage.name] = counted.nfe
        mark(f"sampler {stage.name}")
    showers, clipped = bundle.transform.decode(xs, energies)
    mark("decode")
    return showers, nfe, clipped


def check_knobs(name: str, knobs: dict | None) -> None:
    """Sampler options must be keyword arguments of that sampler (e.g. eta for ddim)."""
    import inspect
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    allowed = set(inspect.signature(SAMPLERS[name].fn).parameters) - {"denoiser", "noise", "sigmas", "cond", "rng"}
    bad = set(knobs or {}) - allowed
    if bad:
        raise ValueError(f"sampler {name} takes no option {', '.join(sorted(bad))} "
                         f"(it takes: {', '.join(sorted(allowed)) or 'none'})")


@dataclass
class GenerateStats:
    path: Path
    n: int
    sampler: str
    steps: int
    nfe: dict[str, int]
    seconds: float
    clipped: int

    @property
    def showers_per_s(self) -> float:
        return self.n / self.seconds


def generate_file(bundle: Bundle, output: "str | Path", energies_mev: np.ndarray, *, seed: int = 0,
                  sampler: str | None = None, steps: int | None = None, batch_size: int = 1000,
                  bf16: bool = False, force: bool = False, knobs: dict | None = None,
                  progress: bool = True, first_event: int = 0, early: tuple[str, int] | None = None,
                  cuda_graph: bool = False, total_events: int | None = None) -> GenerateStats:
    """Write len(energies_mev) showers to a CaloChallenge file, batch by batch (atomic, --force aware).

    Shower k of the file is event `first_event + k` of the seed's stream, so files of consecutive ranges
    hold exactly the events of one file of the whole range. The file's attributes record model, sampler,
    steps, seed, first event, the run's total events (`total_events`, default first_event + the file's; `merge`
    checks the parts cover them), NFE per stage and the clipped-shower count. `early`: (sampler, steps) of the
    stages before the main one; `cuda_graph`: every batch size replayed from a CUDA graph (GPU only)."""
    from tqdm import tqdm

    from .data import ShowerWriter

    name, n_steps, sigmas = resolve_sampler(bundle, sampler, steps)
    check_knobs(name, knobs)
    energies_mev = np.asarray(energies_mev, dtype=np.float64).reshape(-1)
    lo_e, hi_e = bundle.transform.energy_range
    if energies_mev.min() < lo_e * 0.999 or energies_mev.max() > hi_e * 1.001:
        log.warning("incident energies outside the trained range %.4g-%.4g MeV", lo_e, hi_e)
    n, nfe, t_sampling, clipped = len(energies_mev), {}, 0.0, 0
    device = next(bundle.denoiser.parameters()).device
    attrs = {"generator": "calofast", "model": bundle.path.name if bundle.path else "", "sampler": name,
             "steps": n_steps, "seed": seed, "first_event": first_event,
             "total_events": first_event + n if total_events is None else total_events}
    if early:
        attrs["early_sampler"] = f"{early[0]}:{early[1]}"
    args, graphs = dict(sampler=name, steps=n_steps, sigmas=sigmas, bf16=bf16, knobs=knobs, early=early), {}

    n_batches, shown = -(-n // batch_size), {"t": 0.0, "at": None}

    def on_call(stage: str, k: int) -> None:   # within a batch: the network call now running (a new stage always)
        at = (lo, stage)
        if at != shown["at"] or time.monotonic() - shown["t"] >= PROGRESS_INTERVAL_S:
            shown.update(t=time.monotonic(), at=at)
            bar.set_postfix_str(f"batch {lo // batch_size + 1}/{n_batches}: {stage} stage, network call {k}")

    def run(e: torch.Tensor, events: range):
        if not cuda_graph:   # a replayed CUDA graph makes no Python calls to report
            return sample_batch(bundle, e, seed, events, **args, on_call=on_call if progress else None)
        if len(e) not in graphs:
            from .graphs import GraphedSampler
            graphs[len(e)] = GraphedSampler(bundle, len(e), **args)
        return graphs[len(e)](e, seed, events)

    with ShowerWriter(output, bundle.geometry.n_voxels, force=force, attrs=attrs) as writer, \
            tqdm(total=n, unit="shower", desc=f"{name} x{n_steps}", disable=not progress) as bar:
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            idx = range(first_event + lo, first_event + hi)
            t0 = time.perf_counter()
            showers, nfe, bad = run(torch.from_numpy(energies_mev[lo:hi]), idx)
            showers, bad = showers.cpu().numpy(), bad.cpu()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_sampling += time.perf_counter() - t0
            clipped += int(bad.sum())
            writer.write(energies_mev[lo:hi], showers)
            bar.update(hi - lo)
        # Sampling time per shower (the writing excluded) and where: for the report's provenance, not a benchmark.
        from .bench import hardware
        writer.attrs.update({"nfe": json.dumps(nfe), "clipped_showers": clipped,
                             "ms_per_shower": 1e3 * t_sampling / n, "device": hardware(device)})
    if clipped:
        log.warning("%d of %d showers had to be clipped (non-finite or above %.1f x E_inc)", clipped, n, MAX_RESPONSE)
    return GenerateStats(Path(output), n, name, n_steps, nfe, max(t_sampling, 1e-9), clipped)


def default_batch_size(device: "str | torch.device", n_voxels: int) -> int:
    """The batch `generate` uses unless told: 100 on a CPU (the fastest there and 0.8 GB peak for DS2, against 2.3 GB
    at 1,000: docs/benchmarks.md); on a GPU as many showers as fit in a quarter of its memory at 64 bytes per voxel
    (a DS3 batch of 10,000 peaked at 21.8 GB, 54 bytes per voxel), between 100 and 10,000."""
    from .memory import device_memory
    if torch.device(device).type != "cuda":
        return 100
    return int(min(10_000, max(100, device_memory(device) // 4 // (64 * n_voxels))))


# Peak memory of sampling per voxel of the batch, measured (docs/benchmarks.md): DS2 on a CPU, 2.35 GB at batch 1,000
# against 0.81 GB at 100 (~260 B); DS3 on an H100, 21.8 GB at batch 10,000 (~54 B).
BYTES_PER_VOXEL = {"cpu": 250, "cuda": 54}


def check_batch_memory(device: "str | torch.device", n_voxels: int, batch: int, option: str = "--batch-size") -> None:
    """Refuse, before any work, a batch that cannot fit the device's whole memory (host RAM for a CPU)."""
    from .memory import device_memory
    device, total = torch.device(device), device_memory(device)
    need = batch * n_voxels * BYTES_PER_VOXEL.get(device.type, 250)
    if need > total:
        raise ValueError(f"{option} {batch}: a batch of {batch:,} showers of {n_voxels} voxels needs about "
                         f"{need / 1e9:,.0f} GB, and this {device.type} has {total / 1e9:,.0f} GB")


def shard_range(n: int, k: int, n_shards: int) -> range:
    """Events of shard k of n_shards: contiguous, in order, together exactly range(n)."""
    if not 0 <= k < n_shards:
        raise ValueError(f"shard {k}/{n_shards}: expected 0 <= K < N")
    return range(k * n // n_shards, (k + 1) * n // n_shards)


def merge_files(parts: list["str | Path"], output: "str | Path", *, force: bool = False,
                compression_level: int = 4) -> Path:
    """Join part files written by generate_file (shards or chunks of one run) into one file, atomically.

    The parts must come from the same model, sampler, steps and seed and cover events 0..N-1 without gap or
    overlap (their `first_event` attributes); the result is the file one unsharded run would write, its
    clipped-shower count summed."""
    from .data import ShowerFileError, ShowerWriter, file_attrs, inspect_file, iter_showers
    if not parts:
        raise ValueError("no part files to merge")
    if any(Path(p).resolve() == Path(output).resolve() for p in parts):
        raise ValueError(f"-o {output}: is one of the part files; write the merged file elsewhere")
    infos = [(file_attrs(p), inspect_file(p), Path(p)) for p in parts]
    infos.sort(key=lambda t: int(t[0].get("first_event", -1)))
    same = ("generator", "model", "sampler", "steps", "seed", "nfe", "early_sampler", "total_events")
    ref_attrs, ref_info, ref_path = infos[0]
    nxt = 0
    for attrs, info, path in infos:
        if "first_event" not in attrs:
            raise ShowerFileError(f"{path}: no first_event attribute (not written by calofast generate)")
        if int(attrs["first_event"]) != nxt:
            raise ShowerFileError(f"{path}: starts at event {attrs['first_event']}, expected {nxt} "
                                  "(a part is missing or overlaps)")
        if info.n_voxels != ref_info.n_voxels or any(attrs.get(k) != ref_attrs.get(k) for k in same):
            raise ShowerFileError(f"{path}: differs from {ref_path} in voxels or in {', '.join(same)}")
        nxt += info.n_events
    if "total_events" in ref_attrs and nxt != int(ref_attrs["total_events"]):
        raise ShowerFileError(f"{infos[-1][2]}: the parts end at event {nxt} of the run's {ref_attrs['total_events']} "
                              "(a part is missing)")
    keep = {k: v for k, v in ref_attrs.items() if k not in ("clipped_showers", "ms_per_shower", "device")}
    with ShowerWriter(output, ref_info.n_voxels, force=force, attrs=keep, compression_level=compression_level) as w:
        for _, _, path in infos:
            for e, s in iter_showers(path, 10_000, validate=False):
                w.write(e, s)
        w.attrs["clipped_showers"] = sum(int(a.get("clipped_showers", 0)) for a, _, _ in infos)
    return Path(output)
