"""Distillation runs: progressive (stage by stage to 1 step) and consistency, through the one `fit` loop.

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
from ..config import Config, dumps
from ..diffusion import Boundary, Preconditioned
from ..schedules import SIGMA_MAX_CAP, karras_consistency
from ..train import fit, load_training_data, setup_distributed
from .consistency import consistency_loss, consistency_points, update_target
from .progressive import progressive_loss, student_grid

__all__ = ["distill_progressive", "distill_consistency", "distill_sigma_range"]

log = logging.getLogger("calofast.distill")


def distill_sigma_range(bundle: Bundle, cfg: Config) -> tuple[float, float]:
    d = bundle.denoiser
    s_max = cfg.distill.sigma_max or min(d.sigma_max, SIGMA_MAX_CAP * d.sigma_data)
    return d.sigma_min, s_max


def _student(denoiser: Preconditioned, param=None) -> Preconditioned:
    net = copy.deepcopy(denoiser.net).train().requires_grad_(True)
    return Preconditioned(net, param or denoiser.param)


def _write(path: Path, teacher: Bundle, ema, sampler: dict, cfg: Config, shown: int, parent: str,
           data_meta: list[dict]) -> None:
    """The student bundle: the teacher's earlier stages, then the distilled main stage."""
    stages = teacher.stages[:-1] + [teacher.stages[-1].with_denoiser(ema, sampler)]
    save_bundle(path, stages, teacher.transform, cfg, train_seed=cfg.train.seed, events_seen=shown, data=data_meta,
                parent=parent)


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
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(dumps(cfg))
    x0, cond = load_training_data(data_path, teacher_bundle.transform, cfg.train.max_events, d.device)[-1]
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
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(dumps(cfg))
    x0, cond = load_training_data(data_path, teacher_bundle.transform, cfg.train.max_events, d.device)[-1]
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
