"""One generic training loop, used for teachers and for distillation.

`fit(loss_fn, model, data, cfg, run_dir)`: AdamW, linear warm-up then cosine decay, gradient clipping,
EMA of the weights with a half-life counted in showers (EDM), bf16 autocast on CUDA, optional
torch.compile, a JSONL log (loss, lr, throughput) and a progress bar. Data-parallel through
`torchrun` (DDP; NCCL on GPUs, gloo on CPU): the same command runs on one CPU, one GPU or several.
Resumable: the state (weights, EMA, optimiser, counters, RNG) is written atomically every
`checkpoint_showers`; re-running the same command after a kill continues from it.

`train_model(...)` is the library form of `calofast train`: data -> fitted transform -> one denoiser per
stage -> `fit` with the denoising loss, stage after stage (a factorised model trains its energy stage in
RUN/energy, then its shape stage in RUN/shape) -> bundle.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import Bundle, Stage, atomic_write_bytes, file_sha256, load_bundle, load_state, save_bundle, save_state, stage_network
from .config import Config, DiffusionConfig, TrainConfig, dumps
from .data import claim_folder, inspect_file, iter_showers
from .diffusion import EDM, Flow, Preconditioned, build_parameterisation, denoising_loss
from .geometry import get_geometry
from .memory import device_memory, peak_memory
from .transforms import ShowerTransform, fit_transform

__all__ = ["Dist", "setup_distributed", "fit", "load_training_data", "train_model", "lr_at", "ema_beta", "progress"]

log = logging.getLogger("calofast.train")


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Read torchrun's environment; one process without it. NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


def progress(cfg: TrainConfig, shown: int, elapsed: float) -> float:
    """Fraction of the training done: of `showers`, or of `budget_seconds` of training time if that is larger."""
    by_time = elapsed / cfg.budget_seconds if cfg.budget_seconds > 0 else 0.0
    return min(1.0, max(shown / cfg.showers if cfg.showers > 0 else 1.0, by_time))


def lr_at(cfg: TrainConfig, shown: int, done: float | None = None) -> float:
    """Linear warm-up over warmup_showers, then cosine decay to lr * lr_min_ratio at the end of training;
    `done` is the fraction of training done after the warm-up (default: counted in showers)."""
    if shown < cfg.warmup_showers:
        return cfg.lr * (shown + cfg.batch_size) / (cfg.warmup_showers + cfg.batch_size)
    if done is None:
        done = (shown - cfg.warmup_showers) / max(1, cfg.showers - cfg.warmup_showers)
    frac = min(1.0, max(0.0, done))
    floor = cfg.lr * cfg.lr_min_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * frac))


def ema_beta(cfg: TrainConfig, shown: int) -> float:
    """EMA decay per step for a half-life in showers, ramped up as ramp * shown early on (EDM)."""
    half = cfg.ema_halflife_showers
    if cfg.ema_rampup > 0:
        half = min(half, cfg.ema_rampup * shown)
    return 0.5 ** (cfg.batch_size / max(half, 1e-8))


def _all_mean(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t) / d.world


def _resume(state_path: Path, model, ema, opt, extra_modules: dict, gen: torch.Generator, rank: int):
    """Load a resume state into the modules; returns (shown, step, elapsed). A damaged or foreign file (truncated,
    not weights-only, wrong structure) is one line naming it, never a traceback or an unpickled object."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            st = load_state(state_path)
        if not isinstance(st, dict):
            raise ValueError(f"holds a {type(st).__name__}, not a state")
        shown, step, elapsed = st["shown"], st["step"], float(st.get("elapsed", 0.0))
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (shown, step)):
            raise ValueError(f"showers {shown!r} and step {step!r} are not counts")
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        for name, module in extra_modules.items():
            module.load_state_dict(st["extra"][name])
        gen.set_state(st["gen"][rank] if rank < len(st["gen"]) else st["gen"][0])
    except Exception as err:   # noqa: BLE001 -- whatever the file provokes
        text = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if isinstance(err, pickle.UnpicklingError):   # torch's text suggests weights_only=False: never do that here
            text = "it holds objects other than tensors and plain values; they were refused, nothing was executed"
        raise ValueError(f"{state_path}: not a usable resume state ({type(err).__name__}: {text}); delete it to start "
                         "this run afresh, or choose a new output folder") from None
    return shown, step, elapsed


def fit(loss_fn: Callable, model: nn.Module, data: tuple[torch.Tensor, ...], cfg: TrainConfig, run_dir: Path,
        *, on_checkpoint: Callable[[nn.Module, int], None] | None = None, dist_info: Dist | None = None,
        desc: str = "train", after_step: Callable[[nn.Module], None] | None = None,
        extra_modules: dict[str, nn.Module] | None = None,
        log_extra: Callable[[], dict] | None = None) -> tuple[nn.Module, bool]:
    """Train `model` on `data` (tensors indexed along dim 0, all on the training device).

    `loss_fn(model, *batch, generator)` returns a scalar. `after_step(model)` runs after every
    optimiser step (e.g. a consistency target EMA); `extra_modules` (anything with state_dict and
    load_state_dict) are saved in and restored from the resume state with the rest; `log_extra()` gives
    more entries for each stats.jsonl record. Training ends after `showers`, or after `budget_seconds` of training time
    (summed over resumes) if that comes first; the cosine decay follows whichever is further along.
    Returns (ema model, finished); finished is False when `max_seconds`
    stopped the run early (re-run to continue).
    """
    from tqdm import tqdm

    extra_modules = extra_modules or {}
    d = dist_info or setup_distributed()
    run_dir = Path(run_dir)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.pt"
    if cfg.batch_size % d.world:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {d.world} processes")
    local_batch = cfg.batch_size // d.world
    n_data = data[0].shape[0]
    model.to(d.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=data[0].device)
    gen.manual_seed(cfg.seed * 1009 + d.rank)
    shown, step, elapsed = 0, 0, 0.0
    if state_path.exists():
        shown, step, elapsed = _resume(state_path, model, ema, opt, extra_modules, gen, d.rank)
        if d.main:
            log.info("resumed %s from %d showers", run_dir, shown)
    stats_path = run_dir / "stats.jsonl"
    if d.main and shown and stats_path.exists():
        _trim_stats(stats_path, shown)
    fwd = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None) \
        if d.world > 1 else model
    if cfg.compile:
        fwd = torch.compile(fwd)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and d.device.type == "cuda")

    def checkpoint() -> None:
        states = [gen.get_state()]
        if d.world > 1:
            states = [None] * d.world
            dist.all_gather_object(states, gen.get_state())
        if d.main:
            save_state(state_path, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                    "shown": shown, "step": step, "elapsed": elapsed, "gen": states,
                                    "extra": {k: m.state_dict() for k, m in extra_modules.items()}})
            if on_checkpoint is not None:
                on_checkpoint(ema, shown)
        if d.world > 1:
            dist.barrier()

    t_start, elapsed0, done = time.time(), elapsed, progress(cfg, shown, elapsed)
    t_log, shown_log, loss_sum, loss_n = time.time(), shown, 0.0, 0
    next_ckpt = (shown // cfg.checkpoint_showers + 1) * cfg.checkpoint_showers
    next_log = (shown // cfg.log_showers + 1) * cfg.log_showers
    bar = tqdm(total=cfg.showers if cfg.budget_seconds <= 0 else None, initial=shown, unit="shower",
               unit_scale=True, desc=desc, disable=not d.main, smoothing=0.05)
    finished = True
    model.train()
    while done < 1:
        lr = lr_at(cfg, shown, done if cfg.budget_seconds > 0 else None)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, n_data, (local_batch,), generator=gen, device=data[0].device)
        batch = [t[idx] for t in data]
        with autocast:
            loss = loss_fn(fwd, *batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if after_step is not None:
            after_step(model)
        shown += cfg.batch_size
        step += 1
        beta = ema_beta(cfg, shown)
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - beta)
            for be, bm in zip(ema.buffers(), model.buffers()):
                be.copy_(bm)
        loss_sum = loss_sum + loss.detach().float()      # stays on the device: no sync per step
        loss_n += 1
        bar.update(cfg.batch_size)
        stop = False
        if d.world == 1 or step % 16 == 0:
            # Several processes read the clock every 16 steps and share it (max over ranks), so every rank
            # applies the same learning rate and stops at the same step; one process reads it every step.
            clock = torch.tensor([time.time() - t_start], dtype=torch.float64)
            if d.world > 1:
                clock = clock.to(d.device)
                dist.all_reduce(clock, op=dist.ReduceOp.MAX)
            elapsed = elapsed0 + float(clock)
            stop = cfg.max_seconds > 0 and float(clock) > cfg.max_seconds
        done = progress(cfg, shown, elapsed)
        if (shown >= next_log or shown >= next_ckpt or done >= 1 or stop) and not math.isfinite(float(loss_sum)):
            # Checked before any record or checkpoint: a diverged run never writes non-finite weights.
            bar.close()
            raise ValueError(f"{run_dir}: training loss is {float(loss_sum)} by step {step} (lr {lr:.3g}); "
                             "lower train.lr or check the data; the last checkpoint is kept")
        if shown >= next_log or done >= 1 or stop:
            next_log += cfg.log_showers
            mean_loss = _all_mean(float(loss_sum) / max(loss_n, 1), d)
            now = time.time()
            if d.main:
                rec = {"step": step, "showers": shown, "loss": mean_loss, "lr": lr,
                       "showers_per_s": (shown - shown_log) / max(now - t_log, 1e-9), "time": now,
                       "elapsed_s": round(elapsed, 2), **peak_memory(d.device),
                       **(log_extra() if log_extra is not None else {})}
                with open(stats_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{mean_loss:.4f}")
            t_log, shown_log, loss_sum, loss_n = now, shown, 0.0, 0
        if shown >= next_ckpt or done >= 1 or stop:
            next_ckpt += cfg.checkpoint_showers
            checkpoint()
        if stop and done < 1:
            finished = False
            break
    bar.close()
    return ema, finished


def _trim_stats(path: Path, shown: int) -> None:
    """Drop the records a killed run wrote after its last checkpoint (and a line it left half written): the resumed
    run, which restarts from that checkpoint, writes them again, so each step is recorded once."""
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["showers"] <= shown:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    atomic_write_bytes(path, "".join(f"{line}\n" for line in keep).encode())


def load_training_data(path: "str | Path", transform: ShowerTransform, max_events: int = 0,
                       device: "str | torch.device" = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Preprocess a whole training file: (x0, cond) per stage (float32, on device), e.g. x0 [N, 1, L, A, R]
    and cond [N, 1] for a one-stage model; the main stage is the last."""
    info = inspect_file(path, transform.geometry)
    n = min(info.n_events, max_events) if max_events else info.n_events
    shapes = transform.stage_shapes
    need = 4 * n * sum(math.prod(shape) + c for shape, c in zip(shapes, transform.cond_dims))
    have = device_memory(device)
    if need > have:
        raise ValueError(f"{path}: its {n:,} events need {need / 1e9:,.1f} GB on {device} for training (the whole "
                         f"set is held there) and this device has {have / 1e9:,.0f} GB; set "
                         f"train.max_events={int(n * have / need / 2)} or fewer")
    data = [(torch.empty((n, *shape), dtype=torch.float32, device=device),
             torch.empty((n, c), dtype=torch.float32, device=device)) for shape, c in zip(shapes, transform.cond_dims)]
    lo, where = 0, torch.device(device)
    transform = copy.deepcopy(transform).to(where)       # preprocess where the data will live
    for e, s in iter_showers(path, 5000, geometry=transform.geometry, stop=n):
        et = torch.as_tensor(e, device=where)
        xs = transform.encode(torch.as_tensor(s, device=where), et)
        for (x0, cond), x, c in zip(data, xs, transform.conditions(et, xs)):
            x0[lo:lo + len(e)] = x.to(device)
            cond[lo:lo + len(e)] = c.to(device)
        lo += len(e)
    return data


def _training_only(diffusion: DiffusionConfig) -> DiffusionConfig:
    """The diffusion config with its training distribution of sigma (p_mean, p_std) left out: weights do not
    depend on it, so a continued run may change it."""
    return dataclasses.replace(diffusion, p_mean=0.0, p_std=1.0)


def _with_sigma_distribution(param, diffusion: DiffusionConfig):
    """`param` (a bundle's) with the training distribution of sigma of `diffusion` (ln sigma ~ N(p_mean, p_std^2));
    the discrete VP tables draw their own table indices and have none."""
    if isinstance(param, Flow):
        return dataclasses.replace(param, m=diffusion.p_mean, s=diffusion.p_std)
    if isinstance(param, EDM):
        return dataclasses.replace(param, P_mean=diffusion.p_mean, P_std=diffusion.p_std)
    return param


def _same_stage(config: Config, base: Config, name: str) -> bool:
    """Whether stage `name` has the same network and diffusion in both configs (its weights keep their meaning);
    the training distribution of sigma may differ."""
    (net, diff), (base_net, base_diff) = config.stage(name)[:2], base.stage(name)[:2]
    return net == base_net and _training_only(diff) == _training_only(base_diff)


def _check_init(config: Config, init: Bundle, stages: tuple[str, ...]) -> None:
    """Continuing from a bundle keeps what its weights and constants mean: only training options may change,
    except the network and diffusion of a stage that is trained (`stages`), which then starts fresh."""
    base = init.config
    if bad := [s for s in stages if s not in init.transform.stages]:
        raise ValueError(f"--stages {','.join(bad)}: {init.path} has the stages {', '.join(init.transform.stages)}")
    for part in ("geometry", "transform"):
        if getattr(config, part) != getattr(base, part):
            raise ValueError(f"--init {init.path}: {part} differs from the bundle's ({getattr(base, part)}); "
                             "only train.* options may change when continuing")
    for name in init.transform.stages:
        if name not in stages and not _same_stage(config, base, name):
            what = "network or diffusion" if len(init.transform.stages) == 1 else f"{name} stage's network or diffusion"
            raise ValueError(f"--init {init.path}: the {what} differs from the bundle's; "
                             "only train.* options may change when continuing (or list the stage in --stages)")


def run_folder(run_dir: Path, cfg_text: str, *, write: bool = False, same_config: bool = True) -> None:
    """Check (and with `write`, create) a run's output folder and its config.json: a path that is not a folder is
    refused, and with `same_config` a folder holding a resumable run (a state.pt anywhere in it) of another config
    (distillation resumes with a changed length, so it passes False)."""
    cfg_path = run_dir / "config.json"
    claim_folder(run_dir)
    if same_config and cfg_path.exists() and cfg_path.read_text() != cfg_text and any(run_dir.rglob("state.pt")):
        raise ValueError(f"{run_dir}: holds a run with a different config; resume with the same options "
                         "or choose a new output folder")
    if write:
        atomic_write_bytes(cfg_path, cfg_text.encode())            # (makes the folder)


def train_model(config: Config, data_path: "str | Path", run_dir: "str | Path", *, preset: str = "",
                init: "str | Path | None" = None, stages: tuple[str, ...] | None = None) -> Path:
    """`calofast train`: fit the transform, build each stage's denoiser, train, write `model.safetensors`.

    With `init` (a bundle), training continues from that bundle's (EMA) weights with its transform and
    parameterisation and a fresh optimiser and schedule from `config.train`; the new bundle counts the
    bundle's showers in its `train_events_seen` and names it as its parent. `stages` (with `init`) trains
    only those stages and copies the others; a listed stage whose network or diffusion differs from the
    bundle's starts from fresh weights."""
    d = setup_distributed()
    run_dir = Path(run_dir)
    if stages is not None and not init:
        raise ValueError("--stages needs --init (the bundle whose other stages are kept)")
    if stages is not None and not stages:
        raise ValueError("--stages: name at least one stage (e.g. energy)")
    start = load_bundle(init, d.device) if init else None
    if start is not None:
        _check_init(config, start, stages or ())
    geometry = get_geometry(config.geometry)
    info = inspect_file(data_path, geometry)
    cfg_text = dumps(config) + (f"\ninit {start.meta['tensors_sha256']} stages {','.join(stages or ['all'])}\n"
                                if start is not None else "")
    run_folder(run_dir, cfg_text)
    n_fit = min(info.n_events, config.train.max_events or info.n_events, 20_000)
    tc = config.transform
    transform = start.transform if start is not None else \
        fit_transform(geometry, iter_showers(data_path, 5000, geometry=geometry, stop=n_fit),
                      tc.kind, tc.scale_mev or None, tc.alpha, tc.standardise, tc.dequantise)
    data = load_training_data(data_path, transform, config.train.max_events, d.device)
    data_meta = [{"name": Path(data_path).name, "bytes": Path(data_path).stat().st_size,
                  "events": int(data[0][0].shape[0]), "sha256": file_sha256(data_path) if d.main else ""}]
    run_folder(run_dir, cfg_text, write=d.main)   # only once the data are read and checked: a refused run leaves none
    bundle_path = run_dir / "model.safetensors"
    single = len(transform.stages) == 1
    before = int(start.meta.get("train_events_seen", 0)) if start is not None else 0
    trained = stages or tuple(transform.stages)
    last_trained = max(k for k, name in enumerate(transform.stages) if name in trained)
    done: list[Stage] = []
    on_device = copy.deepcopy(transform).to(d.device)            # adds the transform's training noise to codes
    for k, name in enumerate(transform.stages):
        if name not in trained:
            done.append(start.stages[k])                          # copied from the --init bundle unchanged
            continue
        _, diffusion, train_cfg = config.stage(name)
        x0, cond = data[k]
        sigma_data = float(x0.std())
        fresh = start is None or not _same_stage(config, start.config, name)
        if fresh:
            param = build_parameterisation(diffusion, sigma_data)
            torch.manual_seed(train_cfg.seed + k)
            denoiser = Preconditioned(stage_network(config, transform, k), param)
            sampler = {"name": config.energy.sampler, "steps": config.energy.steps} if name == "energy" else None
        else:
            denoiser = start.stages[k].denoiser.train().requires_grad_(True)
            if diffusion != start.config.stage(name)[1]:     # a new training distribution of sigma
                denoiser.param = _with_sigma_distribution(denoiser.param, diffusion)
            param = denoiser.param
            sampler = start.stages[k].sampler             # a continued model keeps its stages' default samplers
        main = k == len(transform.stages) - 1

        def write_bundle(ema: nn.Module, shown: int, name=name, sampler=sampler, k=k, main=main, sd=sigma_data) -> None:
            if k == last_trained:             # earlier stages are finished by now; later ones are the bundle's
                rest = list(start.stages[k + 1:]) if start is not None else []
                save_bundle(bundle_path, done + [Stage(name, ema, sampler)] + rest, transform, config,
                            train_seed=config.train.seed, events_seen=before + (shown if main else 0), data=data_meta,
                            parent=start.meta["tensors_sha256"] if start is not None else None,
                            extra={"preset": preset, "sigma_data_measured": sd, "continued_from_events": before,
                                   "stages_trained": ",".join(trained)},
                            weights_dtype=config.train.bundle_dtype)

        loss = lambda model, x, c, g, param=param: denoising_loss(model, param, on_device.dequantised(x, c, g), c, g)
        ema, finished = fit(loss, denoiser, (x0, cond), train_cfg, run_dir if single else run_dir / name,
                            on_checkpoint=write_bundle, dist_info=d, desc=f"train {name}")
        if not finished:
            if d.main:
                log.info("%s stage stopped early (re-run to resume): %s", name, run_dir)
            return bundle_path
        done.append(Stage(name, ema.eval(), sampler))
    if d.main:
        log.info("finished: %s", bundle_path)
    return bundle_path
