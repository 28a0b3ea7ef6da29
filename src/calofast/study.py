"""`calofast study PLAN.toml -o DIR`: many methods on one table and one plot, resumable.

A plan names a reference (a file, or GFlash showers made here) and rows (model, sampler, steps, sampler
options). For every row the study generates the reference's incident energies in chunks, joins them,
times the sampler with the timing protocol (`bench`), evaluates against the reference (full protocol, or
`--fast`), and finally writes `table.csv`, `table.md`, `pareto.png` and `index.html` (links to each row's
report). Layout: `DIR/reference.h5`, `DIR/rows/LABEL/{row.json, chunks/, showers.h5, generation.json,
eval/metrics.json, eval/report.html}`. Every step is skipped when its output exists, so a killed study
re-run with the same command resumes (at worst it redoes the chunk or evaluation that was cut off).
`classifier_seeds = N` in a plan repeats each classifier test with N seeds: the table's AUC is then their mean,
with their standard deviation beside it.
Evaluations can run in `eval_jobs` worker processes (each prepares the reference once) while the main
process generates the next row; `shard=(k, n)` runs rows k, k+n, ... (one process per GPU).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write_bytes
from .data import claim_folder, file_attrs, inspect_file, read_energies
from .geometry import Geometry, get_geometry
from .memory import peak_memory
from .study_plan import FLOOR, Plan, Row, load_plan, select

__all__ = ["run_study", "study", "prepare_inputs", "generate_row"]

def _geometry(plan: Plan) -> Geometry:
    if plan.geometry:
        return get_geometry(plan.geometry)
    from .checkpoint import load_bundle
    return load_bundle(plan.rows[0].model).geometry


def prepare_inputs(plan: Plan, out: Path, geometry: Geometry, workers: int = 1) -> Path:
    """The reference file (the plan's, or GFlash made here) and, if asked, the floor row's showers."""
    from .gflash import write_gflash
    ref = plan.ref_file or out / "reference.h5"
    if plan.ref_file is None and not ref.exists():
        write_gflash(ref, geometry, plan.n, plan.energies, plan.gflash_seed, workers=workers, compression_level=0)
    n_ref = inspect_file(ref, geometry).n_events
    if n_ref < plan.n:
        raise ValueError(f"{ref}: {n_ref} events, the plan asks for {plan.n}")
    floor = out / "rows" / FLOOR / "showers.h5"
    done = (floor.parent / "eval" / "metrics.json").exists()
    if plan.floor_seed is not None and not floor.exists() and not done:
        energies = read_energies(ref, stop=plan.n)
        write_gflash(floor, geometry, plan.n, energies, int(plan.floor_seed), workers=workers, compression_level=0)
        _write_json(floor.parent / "generation.json", {"label": FLOOR, "family": "GFlash", "seed": plan.floor_seed})
    return ref


def _write_json(path: Path, obj: dict) -> None:
    """Every record of the study folder is written atomically: a kill never leaves half a file to resume from."""
    atomic_write_bytes(path, (json.dumps(obj) + "\n").encode())


def _row_dir(out: Path, row: Row) -> Path:
    """The row's folder, its record (the plan's row and the sha256 of the model file) written or checked: a row
    is only resumed, or skipped as done, for the same settings and the same weights."""
    from .checkpoint import bundle_path, file_sha256
    d = out / "rows" / row.label
    d.mkdir(parents=True, exist_ok=True)
    spec_path, spec = d / "row.json", {**row.spec(), "model_sha256": file_sha256(bundle_path(row.model))}
    if spec_path.exists():
        old = json.loads(spec_path.read_text())
        if "model_sha256" not in old:          # recorded before the model's hash was: settings only
            spec = {k: v for k, v in spec.items() if k != "model_sha256"}
        if old != spec:
            raise ValueError(f"{spec_path}: row {row.label} was run with {spec_path.read_text().strip()}, the "
                             f"plan and model now give {json.dumps(spec)}; give it a new label or delete {d}")
        return d
    _write_json(spec_path, spec)
    return d


def _check_folder(plan: Plan, out: Path) -> None:
    """A study folder holds one reference and one event count: resuming with others would mix results."""
    ident = {"n": plan.n, "reference": str(plan.ref_file) if plan.ref_file else
             {"gflash_seed": plan.gflash_seed, "energies": plan.energies}}
    if plan.classifier_seeds > 1:          # (absent for one seed: folders from before the option stay valid)
        ident["classifier_seeds"] = plan.classifier_seeds
    path = out / "study.json"
    if path.exists() and json.loads(path.read_text()) != ident:
        raise ValueError(f"{path}: this folder holds a study with {path.read_text().strip()}, the plan now says "
                         f"{json.dumps(ident)}; choose a new output folder")
    _write_json(path, ident)


class _Models:
    """Bundles loaded once per (model, compile, bf16, deep cache, token merging), compiled and warmed up at the
    row's batch size."""

    def __init__(self, device: str):
        self.device, self.cache = device, {}

    def get(self, row: Row, n: int):
        import torch
        from .checkpoint import load_bundle
        from .generate import compile_network, sample_batch
        from .tome import model_side
        key = (row.model, row.compile and self.device.startswith("cuda"), self.bf16(row), row.deep_cache, row.tome)
        if key not in self.cache:
            bundle = model_side(load_bundle(row.model, self.device), row.deep_cache, row.tome)
            if key[1]:
                compile_network(bundle, bf16=key[2])
            self.cache[key] = (bundle, set())
        bundle, warmed = self.cache[key]
        b = min(row.batch_size, n)
        if key[1] and b not in warmed:       # compile at this batch size before anything is timed
            lo = bundle.transform.energy_range[0]
            sample_batch(bundle, torch.full((b,), lo * 10, dtype=torch.float64), 0, range(b), sampler="euler", steps=2,
                         bf16=self.bf16(row))
            warmed.add(b)
        return bundle

    def bf16(self, row: Row) -> bool:
        return row.dtype == "bf16" or (row.dtype == "auto" and self.device.startswith("cuda"))


def generate_row(row: Row, d: Path, energies: np.ndarray, models: _Models, chunk: int, repeats: int,
                 progress: bool) -> Path:
    """Chunks, joined into showers.h5 (atomic), then generation.json with counted NFE and timing."""
    from .bench import bench, hardware
    from .generate import generate_file, merge_files, parse_stage_sampler
    out, n = d / "showers.h5", len(energies)
    bundle, early = None, parse_stage_sampler(row.energy_sampler)
    graph = row.cuda_graph and models.device.startswith("cuda")
    if not out.exists():
        bundle = models.get(row, n)
        parts = []
        for lo in range(0, n, chunk):
            part = d / "chunks" / f"{lo:09d}.h5"
            if not part.exists():
                generate_file(bundle, part, energies[lo:lo + chunk], seed=row.seed, sampler=row.sampler,
                              steps=row.steps, batch_size=row.batch_size, bf16=models.bf16(row), knobs=row.knobs or None,
                              progress=progress, first_event=lo, early=early, cuda_graph=graph,
                              total_events=n)
            parts.append(part)
        merge_files(parts, out, compression_level=0)
        shutil.rmtree(d / "chunks")
    rec_path = d / "generation.json"
    if not rec_path.exists():
        import torch
        bundle = bundle or models.get(row, n)
        attrs = file_attrs(out)
        rec = {"label": row.label, "family": row.family or str(attrs.get("sampler", "")), "model": row.model,
               "sampler": attrs.get("sampler"), "steps": attrs.get("steps"), "nfe": json.loads(attrs["nfe"]),
               "clipped": int(attrs["clipped_showers"]), "device": hardware(torch.device(models.device)),
               "dtype": "bf16" if models.bf16(row) else "fp32", "compiled": row.compile and models.device.startswith("cuda"),
               "cuda_graph": graph, "energy_sampler": row.energy_sampler, "deep_cache": row.deep_cache, "tome": row.tome,
               **peak_memory(models.device)}     # the study process's peaks so far (all rows before this one)
        if repeats:
            t = bench(bundle, rec["sampler"], rec["steps"], batch_sizes=(min(row.batch_size, n),), repeats=repeats,
                      bf16=models.bf16(row), knobs=row.knobs or None, early=early, cuda_graph=graph)[0]
            rec.update(ms_per_shower=t["median"], ms_std=t["std"], timing_batch=t["batch"], timing_repeats=repeats)
        _write_json(rec_path, rec)
    return out


_REFERENCE = None


def _worker_init(ref: str, geometry: Geometry, n: int, threads: int = 0) -> None:
    """Each evaluating process prepares the reference once (features, spectra, classifier inputs)."""
    import torch
    from .evaluate import prepare_reference
    global _REFERENCE
    if threads:
        torch.set_num_threads(threads)
    _REFERENCE = prepare_reference(ref, geometry, n, low_level=True)


def _evaluate(label: str, showers: str, eval_dir: str, geometry: Geometry, fast: bool, device: str | None,
              min_events: int, classifier_seeds: int = 1) -> str:
    from .evaluate import evaluate_files
    evaluate_files(showers, _REFERENCE, geometry, eval_dir, fast=fast, min_events=min_events, device=device,
                   label=label, progress=False, classifier_seeds=classifier_seeds, force=True)
    return label


def run_study(plan: Plan, out: "str | Path", *, device: str = "cpu", fast: bool = False, eval_jobs: int = 0,
              shard: tuple[int, int] = (0, 1), deadline: float = 0.0, keep_showers: bool = False,
              workers: int = 1, progress: bool = True) -> list[str]:
    """Run this shard's rows; returns the labels not finished (deadline reached). See the module doc."""
    t0, out = time.time(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_folder(plan, out)
    geometry = _geometry(plan)
    ref = prepare_inputs(plan, out, geometry, workers)
    energies = read_energies(ref, stop=plan.n)
    labels = ([FLOOR] if plan.floor_seed is not None else []) + [r.label for r in plan.rows]
    mine = labels[shard[0]::shard[1]]
    rows = {r.label: r for r in plan.rows}
    models, pending, left = _Models(device), {}, []
    eval_dev = device if device.startswith("cuda") else None
    threads = max(1, (os.cpu_count() or 2) // (eval_jobs + 1))
    pool = None
    if eval_jobs:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
        pool = ProcessPoolExecutor(eval_jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                                   initargs=(str(ref), geometry, plan.n, threads))
    late = lambda: deadline > 0 and time.time() - t0 > deadline
    try:
        for label in mine:
            d = out / "rows" / label if label == FLOOR else _row_dir(out, rows[label])
            if (d / "eval" / "metrics.json").exists():
                continue
            if late():
                left.append(label)
                continue
            if label != FLOOR:
                generate_row(rows[label], d, energies, models, plan.chunk, plan.timing_repeats, progress)
            if progress:
                print(f"[study] {label}: generated ({time.time() - t0:.0f} s); evaluating", flush=True)
            args = (label, str(d / "showers.h5"), str(d / "eval"), geometry, fast, eval_dev, plan.n, plan.classifier_seeds)
            if pool is None:
                if _REFERENCE is None or _REFERENCE.path != ref or _REFERENCE.n != plan.n:
                    _worker_init(str(ref), geometry, plan.n)       # once, when the first row needs it
                _evaluate(*args)
                _finish(d, label, keep_showers)
            else:
                pending[label] = (pool.submit(_evaluate, *args), d)
                _collect(pending, keep_showers, eval_jobs, t0, deadline)     # at most eval_jobs rows waiting
        left += _collect(pending, keep_showers, 0, t0, deadline)
    finally:
        if pool is not None:
            pool.shutdown(wait=not left, cancel_futures=True)
            if left:     # evaluations cut off by the deadline: stop them (no public API before Python 3.14)
                for p in list((getattr(pool, "_processes", None) or {}).values()):
                    p.terminate()
    return left


def _collect(pending: dict, keep_showers: bool, keep: int, t0: float, deadline: float) -> list[str]:
    """Finish evaluated rows; block until at most `keep` are still running, or the deadline passes (then the
    ones still running are returned as unfinished)."""
    from concurrent.futures import FIRST_COMPLETED, wait
    while pending:
        for label in [lb for lb, (fut, _) in pending.items() if fut.done()]:
            fut, d = pending.pop(label)
            fut.result()                       # an evaluation's error stops the study (re-run resumes)
            _finish(d, label, keep_showers)
        if len(pending) <= keep:
            return []
        remaining = deadline - (time.time() - t0) if deadline > 0 else None
        if remaining is not None and remaining <= 0:
            return list(pending)
        wait([fut for fut, _ in pending.values()], timeout=remaining, return_when=FIRST_COMPLETED)
    return []


def _finish(d: Path, label: str, keep_showers: bool) -> None:
    m = json.loads((d / "eval" / "metrics.json").read_text())
    print(f"[study] {label}: AUC low {m.get('classifier_low', {}).get('auc', float('nan')):.3f} "
          f"high {m.get('classifier_high', {}).get('auc', float('nan')):.3f} FPD x1e3 {m['fpd']['x1e3']:.1f}", flush=True)
    if not keep_showers and label != FLOOR:
        (d / "showers.h5").unlink(missing_ok=True)


def study(plan_path: "str | Path", out: "str | Path", *, device: str = "cpu", shard: tuple[int, int] | None = None,
          table_only: bool = False, only: list[str] | None = None, events: int | None = None, **kw) -> int:
    """The command: run (every visible GPU one shard, each in its own process, unless `shard` is given), then
    write the table, plot and index. 0 when every row is done, 3 when a deadline left rows to resume."""
    import subprocess
    import sys
    from .study_report import collect_rows, write_outputs
    full = load_plan(plan_path)
    plan, out = select(full, only, events), Path(out)
    labels = ([FLOOR] if full.floor_seed is not None else []) + [r.label for r in full.rows]     # the table's
    left: list[str] = []
    if not table_only:
        from .checkpoint import bundle_path
        claim_folder(out)
        for row in plan.rows:                  # every model found before the folder is made or any work is done
            bundle_path(row.model)
        n_gpu = _gpu_count() if device == "cuda" and shard is None else 0
        if n_gpu > 1:
            out.mkdir(parents=True, exist_ok=True)
            prepare_inputs(plan, out, _geometry(plan), kw.get("workers", 1))     # once, before the shards
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items() if k in ("eval_jobs", "deadline", "workers")]
            flags += [f"--{k.replace('_', '-')}" for k in ("fast", "keep_showers") if kw.get(k)]
            flags += (["--only", ",".join(only)] if only else []) + (["--events", str(events)] if events else [])
            procs = [subprocess.Popen([sys.executable, "-m", "calofast", "study", str(plan_path), "-o", str(out),
                                       "--device", "cuda", "--shard", f"{k}/{n_gpu}", *flags],
                                      env={**os.environ, "CUDA_VISIBLE_DEVICES": str(k)}) for k in range(n_gpu)]
            codes = [p.wait() for p in procs]
            if any(c not in (0, 3) for c in codes):
                raise RuntimeError(f"study shards exited with {codes}")
            mine = ([FLOOR] if plan.floor_seed is not None else []) + [r.label for r in plan.rows]
            left = [lb for lb in mine if not (out / "rows" / lb / "eval" / "metrics.json").exists()]
        else:
            left = run_study(plan, out, device=device, shard=shard or (0, 1), **kw)
    if shard is None or shard == (0, 1):
        rows = collect_rows(out, labels)
        paths = write_outputs(out, rows, full.name, FLOOR if full.floor_seed is not None else None)
        print(f"[study] {sum(r['status'] == 'ok' for r in rows)} of {len(rows)} rows done; "
              f"{', '.join(str(p) for p in paths)}")
    if left:
        print(f"[study] deadline reached: {len(left)} rows unfinished ({', '.join(left)}); "
              "re-run the same command to resume")
        return 3
    return 0


def _gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
