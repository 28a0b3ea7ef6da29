"""Few-step students through the one `fit` loop: progressive distillation (stage by stage to 1 step),
consistency distillation, and the single-stage shortcut model (every jump size in one run).

Every stage writes an ordinary bundle that records the sampler and steps it was made for, its parent
(the teacher bundle's sha256) and its grid, so `calofast generate --model STUDENT` needs no flags.
Only the main stage is distilled: a factorised teacher's energy stage is copied into the student with
its own (cheap) sampler.
Runs resume like training: each stage has its own folder with a resume state, and finished stages
(bundle written, `done` marker) are skipped on a re-run.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint import Bundle, file_sha256, load_bundle, save_bundle
from ..config import Config, check_config, dumps
from ..diffusion import Boundary, Preconditioned
from ..schedules import SIGMA_MAX_CAP, karras_consistency
from ..train import fit, load_training_data, run_folder, setup_distributed
from .consistency import consistency_loss, consistency_points, update_target
from .dmd import DistributionMatching
from .meanflow import meanflow_loss
from .progressive import progressive_loss, student_grid
from .shortcut import TeacherTargets, shortcut_loss

__all__ = ["distill_progressive", "distill_consistency", "distill_shortcut", "distill_sigma_range"]

log = logging.getLogger("calofast.distill")


def distill_sigma_range(bundle: Bundle, cfg: Config, k: int = -1) -> tuple[float, float]:
    """(sigma_min, sigma_max) a student of stage k (default the main one) trains on: the teacher's, sigma_max
    capped at SIGMA_MAX_CAP sigma_data; distill.sigma_max overrides it for the main stage."""
    d = bundle.stages[k].denoiser
    main = k in (-1, len(bundle.stages) - 1)
    s_max = (cfg.distill.sigma_max if main else 0) or min(d.sigma_max, SIGMA_MAX_CAP * d.sigma_data)
    return d.sigma_min, s_max


def _student(denoiser: Preconditioned, param=None) -> Preconditioned:
    net = copy.deepcopy(denoiser.net).train().requires_grad_(True)
    return Preconditioned(net, param or denoiser.param)


def _write(path: Path, teacher: Bundle, ema, sampler: dict, cfg: Config, shown: int, parent: str,
           data_meta: list[dict]) -> None:
    """The student bundle: the teacher's earlier stages, then the distilled main stage."""
    stages = teacher.stages[:-1] + [teacher.stages[-1].with_denoiser(ema, sampler)]
    save_bundle(path, stages, teacher.transform, cfg, train_seed=cfg.train.seed, events_seen=shown, data=data_meta,
                parent=parent, weights_dtype=cfg.train.bundle_dtype)


def _meta(teacher_path: Path, data_path: Path, x0: torch.Tensor) -> tuple[str, list[dict]]:
    return file_sha256(teacher_path), [{"name": data_path.name, "bytes": data_path.stat().st_size,
                                        "events": int(x0.shape[0]), "sha256": file_sha256(data_path)}]


def distill_progressive(teacher_path: "str | Path", data_path: "str | Path", run_dir: "str | Path",
                        cfg: Config) -> list[Path]:
    """Halve the steps from cfg.distill.start_steps down to cfg.distill.to_steps; returns the bundles."""
    d = setup_distributed()
    run_dir, teacher_path, data_path = Path(run_dir), Path(teacher_path), Path(data_path)
    teacher_bundle = load_bundle(teacher_path, d.device)
    dc = cfg.distill
    if dc.start_steps < 2 or dc.start_steps & (dc.start_steps - 1) or dc.to_steps < 1:
        raise ValueError("distill.start_steps must be a power of two >= 2 and to_steps >= 1")
    run_folder(run_dir, dumps(cfg), same_config=False)
    x0, cond = load_training_data(data_path, teacher_bundle.transform, cfg.train.max_events, d.device)[-1]
    run_folder(run_dir, dumps(cfg), write=d.main, same_config=False)
    s_min, s_max = distill_sigma_range(teacher_bundle, cfg)
    parent, data_meta = _meta(teacher_bundle.path, data_path, x0) if d.main else ("", [])
    teacher, param = teacher_bundle.denoiser, teacher_bundle.denoiser.param
    stage_cfg = replace(cfg.train, showers=dc.showers_per_stage, warmup_showers=0, lr=dc.lr, lr_min_ratio=0.0)
    bundles, n = [], dc.start_steps // 2
    while n >= dc.to_steps:
        stage_dir = run_dir / f"stage-{n:04d}"
        bundle_path = run_dir / f"pd-{n}step.safetensors"
        grid = student_grid(n, s_min, s_max, dc.rho)
        sampler = {"name": "euler", "steps": n, "sigmas": grid.tolist(), "method": "progressive",
                   "teacher_steps": 2 * n}
        if (stage_dir / "done").exists() and bundle_path.exists():
            teacher = load_bundle(bundle_path, d.device).denoiser
        else:
            stage_dir.mkdir(parents=True, exist_ok=True)
            student = _student(teacher)
            loss = (lambda t, k: lambda model, x, c, g: progressive_loss(model, param, t, x, c, k, s_min, s_max,
                                                                         dc.rho, g))(teacher, n)

            def write(ema, shown, path=bundle_path, sampler=sampler):
                _write(path, teacher_bundle, ema, sampler, cfg, shown, parent, data_meta)

            ema, finished = fit(loss, student, (x0, cond), stage_cfg, stage_dir, on_checkpoint=write,
                                dist_info=d, desc=f"pd {2 * n}->{n}")
            if not finished:
                log.info("stopped early in stage %d; re-run to resume", n)
                return bundles
            if d.main:
                (stage_dir / "done").write_text("ok\n")
            teacher = ema.eval().requires_grad_(False)
        bundles.append(bundle_path)
        n //= 2
    return bundles


def distill_consistency(teacher_path: "str | Path", data_path: "str | Path", run_dir: "str | Path",
                        cfg: Config) -> Path:
    """Consistency distillation with a Heun teacher on a cfg.distill.cm_steps-point Karras grid."""
    d = setup_distributed()
    run_dir, teacher_path, data_path = Path(run_dir), Path(teacher_path), Path(data_path)
    teacher_bundle = load_bundle(teacher_path, d.device)
    dc = cfg.distill
    run_folder(run_dir, dumps(cfg), same_config=False)
    x0, cond = load_training_data(data_path, teacher_bundle.transform, cfg.train.max_events, d.device)[-1]
    run_folder(run_dir, dumps(cfg), write=d.main, same_config=False)
    s_min, s_max = distill_sigma_range(teacher_bundle, cfg)
    grid = karras_consistency(dc.cm_steps, s_min, s_max, dc.rho)
    teacher = teacher_bundle.denoiser
    student = _student(teacher, Boundary(teacher.param, s_min))
    target = copy.deepcopy(student).eval().requires_grad_(False)
    parent, data_meta = _meta(teacher_bundle.path, data_path, x0) if d.main else ("", [])
    steps = dc.cm_sampler_steps[0]
    sampler = {"name": "consistency", "steps": steps, "sigmas": consistency_points(grid, steps).tolist(),
               "grid": grid.tolist(), "method": "consistency"}
    bundle_path = run_dir / "cd.safetensors"

    def write(ema, shown):
        _write(bundle_path, teacher_bundle, ema, sampler, cfg, shown, parent, data_meta)

    loss = lambda model, x, c, g: consistency_loss(model, target, teacher, x, c, grid, dc.cm_loss, g)
    cm_cfg = replace(cfg.train, showers=dc.cm_showers, warmup_showers=min(cfg.train.warmup_showers, dc.cm_showers // 10),
                     lr=dc.lr)
    fit(loss, student, (x0, cond), cm_cfg, run_dir, on_checkpoint=write, dist_info=d, desc="consistency",
        after_step=lambda model: update_target(target, model, dc.cm_ema), extra_modules={"target": target})
    return bundle_path


def _same_transform(a: Bundle, b: Bundle) -> bool:
    ca, cb = a.transform.constants(), b.transform.constants()
    return (a.transform.spec() == b.transform.spec() and ca.keys() == cb.keys()
            and all(torch.equal(ca[k].cpu(), cb[k].cpu()) for k in ca))


def distill_shortcut(teacher_path: "str | Path", data_path: "str | Path", run_dir: "str | Path",
                     cfg: Config, targets_from: "str | Path | None" = None) -> Path:
    """A shortcut model fine-tuned from a flow-matching teacher in one run (`shortcut.py`; with
    distill.sc_loss=meanflow the same interval network trained with the MeanFlow loss, `meanflow.py`): the main stage,
    and with distill.sc_energy_steps > 0 a factorised teacher's energy stage first (its own folder
    run_dir/energy, length and time budget from energy.train). Given a shortcut bundle instead, trains that
    one further (its own t_max and max_steps). `targets_from`: the bundle whose main stage gives the teacher-ODE
    targets instead of the teacher's (its sha256 is recorded in the student's sampler spec as "targets")."""
    from ..interval import IntervalDenoiser, uniform_grid, widen_condition

    d = setup_distributed()
    run_dir, teacher_path, data_path = Path(run_dir), Path(teacher_path), Path(data_path)
    teacher_bundle = load_bundle(teacher_path, d.device)
    dc = cfg.distill
    check_config(cfg)
    names = list(teacher_bundle.transform.stages)
    if dc.sc_energy_steps and names[0] != "energy":
        raise ValueError(f"{teacher_path}: distill.sc_energy_steps needs a factorised teacher (stages {names})")
    for k in ([0] if dc.sc_energy_steps else []) + [len(names) - 1]:
        if teacher_bundle.stages[k].denoiser.param.kind != "flow":
            raise ValueError(f"{teacher_path}: a shortcut model is fine-tuned from a flow-matching teacher; its "
                             f"{names[k]} stage is {teacher_bundle.stages[k].denoiser.param.kind!r}")
    for stage in teacher_bundle.stages:
        if isinstance(stage.denoiser, IntervalDenoiser) and stage.denoiser.max_steps != dc.sc_max_steps:
            raise ValueError(f"{teacher_path}: its {stage.name} stage is a shortcut model with max_steps "
                             f"{stage.denoiser.max_steps}; distill.sc_max_steps={dc.sc_max_steps} cannot continue it")
    targets_bundle = teacher_bundle
    if dc.dmd_weight > 0 and (dc.sc_loss != "shortcut" or d.world > 1):
        raise ValueError("distill.dmd_weight > 0 (distribution matching) runs with the shortcut loss on one process")
    if targets_from is not None:
        if dc.sc_teacher_fraction <= 0 and dc.dmd_weight <= 0:
            raise ValueError("--targets-from names the teacher of the teacher-ODE targets or of distribution "
                             "matching: set distill.sc_teacher_fraction > 0 or distill.dmd_weight > 0")
        targets_bundle = load_bundle(targets_from, d.device)
        if not _same_transform(targets_bundle, teacher_bundle):
            raise ValueError(f"{targets_from}: its transform (stages, geometry or fitted constants) differs from "
                             f"{teacher_path}'s, so its ODE lives in another space")
    run_folder(run_dir, dumps(cfg), same_config=False)
    data = load_training_data(data_path, teacher_bundle.transform, cfg.train.max_events, d.device)
    run_folder(run_dir, dumps(cfg), write=d.main, same_config=False)
    parent, data_meta = _meta(teacher_bundle.path, data_path, data[-1][0]) if d.main else ("", [])
    stages = list(teacher_bundle.stages)
    bundle_path = run_dir / "shortcut.safetensors"
    main_k = len(stages) - 1
    for k in ([0] if dc.sc_energy_steps else []) + [main_k]:
        teacher = stages[k].denoiser
        more = isinstance(teacher, IntervalDenoiser)
        s_max = distill_sigma_range(teacher_bundle, cfg, k)[1]
        t_max = teacher.t_max if more else s_max / (1 + s_max)
        s_max = t_max / (1 - t_max)
        net = copy.deepcopy(teacher.net) if more else widen_condition(teacher.net)
        student = IntervalDenoiser(net.train().requires_grad_(True), teacher.param, t_max, dc.sc_max_steps)
        steps = dc.sc_steps if k == main_k else dc.sc_energy_steps
        sampler = {"name": "euler", "steps": steps, "sigmas": uniform_grid(steps, s_max).tolist(),
                   "method": "shortcut", "sigma_max": s_max}
        if targets_from is not None and k == main_k and d.main:
            sampler["targets"] = file_sha256(targets_bundle.path)
        if dc.dmd_weight > 0 and k == main_k:
            sampler["dmd"] = {"weight": dc.dmd_weight, "jumps": list(dc.dmd_jumps)}

        def write(ema, shown, k=k, sampler=sampler):
            done = stages[:k] + [stages[k].with_denoiser(ema, sampler)] + stages[k + 1:]
            save_bundle(bundle_path, done, teacher_bundle.transform, cfg, train_seed=cfg.train.seed,
                        events_seen=shown if k == main_k else 0, data=data_meta, parent=parent,
                        weights_dtype=cfg.train.bundle_dtype)

        sample_sigma = teacher.param.sample_sigma
        targets = TeacherTargets.of(targets_bundle.stages[k].denoiser, cfg.train.compile, t_max=t_max, fraction=dc.sc_teacher_fraction,
                                    levels=dc.sc_teacher_levels, steps=dc.sc_teacher_steps) \
            if k == main_k and dc.sc_teacher_fraction > 0 else None
        dm = DistributionMatching.of(targets_bundle.stages[k].denoiser, t_max=t_max, jumps=dc.dmd_jumps,
                                     fraction=dc.dmd_fraction, updates=dc.dmd_updates, lr=dc.dmd_lr or dc.lr,
                                     grad_clip=cfg.train.grad_clip, warmup=dc.dmd_warmup, compile=cfg.train.compile) \
            if k == main_k and dc.dmd_weight > 0 else None
        if dc.sc_loss == "meanflow":
            loss = lambda model, x, c, g, t_max=t_max, sample_sigma=sample_sigma, targets=targets: meanflow_loss(
                model, x, c, t_max, sample_sigma, dc.mf_ratio, dc.mf_p, dc.mf_eps, g, targets)
        else:
            loss = lambda model, x, c, g, t_max=t_max, sample_sigma=sample_sigma, targets=targets: shortcut_loss(
                model, x, c, t_max, dc.sc_max_steps, dc.sc_fraction, sample_sigma, g, targets)
        if dm is not None:
            loss = lambda model, x, c, g, base=loss: base(model, x, c, g) + dc.dmd_weight * dm.loss(model, x, c, g)
        base = cfg.train if k == main_k else cfg.stage("energy")[2]
        showers = dc.sc_showers if k == main_k else base.showers
        sc_cfg = replace(base, showers=showers, warmup_showers=min(base.warmup_showers, showers // 10), lr=dc.lr)
        ema, finished = fit(loss, student, data[k], sc_cfg, run_dir if k == main_k else run_dir / stages[k].name,
                            on_checkpoint=write, dist_info=d, desc=f"shortcut {stages[k].name}",
                            extra_modules={"dmd": dm} if dm is not None else None,
                            log_extra=dm.stats if dm is not None else None)
        if not finished:
            log.info("stopped early in the %s stage; re-run to resume", stages[k].name)
            return bundle_path
        stages[k] = stages[k].with_denoiser(ema.eval(), sampler)
    return bundle_path
