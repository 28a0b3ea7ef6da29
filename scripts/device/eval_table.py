"""Device run: evaluate the shipped DS2 teacher with every sampler and the distilled students.

    python scripts/device/eval_table.py --reference ref.h5 --baseline second.h5 --out OUT --deadline 420

Work is cut into units of (row, 10,000 events): event k's noise depends only on (seed, k), so a row's
chunks can run on different GPUs and are merged into one file when all are done. One generation
process per GPU (bf16; the teacher's network optionally compiled, see --compile) claims units in
priority order through files created with O_EXCL and starts none that would end after the deadline;
units finished by an earlier run in the same folder are kept. Each chunk is timed as one batch of
10,000 (ms per shower = median over a row's chunks). Evaluation processes (features, FPD/KPD,
classifiers on the GPUs) pick finished rows up as they appear; rows evaluated by an earlier run
(eval/<label>/metrics.json present) are skipped. Rows in SAME_AS are not generated: they are the same
algorithm as another row (DDIM eta=1 on a grid = ancestral DDPM respaced to that grid, spec samplers.md
5.4, tests/test_samplers.py::test_ddpm_classic_form_equals_ddim_eta1_with_same_noise) and the table
shows that row's numbers.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from calofast.checkpoint import SHIPPED as MODELS   # the package's shipped bundles

EXTRA = Path(".carry")
TEACHER = MODELS / "ds2-teacher-ddpm400.safetensors"
CHUNK = int(os.environ.get("CALOFAST_CHUNK", "10000"))   # smaller only for CPU smoke runs of this script

# (label, family, bundle, sampler, steps, knobs) in priority order.
ROWS = [
    ("gflash-vs-gflash", "GFlash (seed 2002)", None, None, 0, {}),
    ("ddpm-400", "DDPM ancestral", TEACHER, "ddpm", 400, {}),
    ("pd-1", "progressive distillation", MODELS / "ds2-student-pd-1step.safetensors", None, None, {}),
    ("pd-2", "progressive distillation", MODELS / "ds2-student-pd-2step.safetensors", None, None, {}),
    ("pd-4", "progressive distillation", MODELS / "ds2-student-pd-4step.safetensors", None, None, {}),
    ("pd-8", "progressive distillation", EXTRA / "ds2-student-pd-8step.safetensors", None, None, {}),
    ("cd-1", "consistency distillation", EXTRA / "ds2-student-cd-1step.safetensors", None, 1, {}),
    ("cd-2", "consistency distillation", EXTRA / "ds2-student-cd-1step.safetensors", "consistency", 2, {}),
    ("dpmpp-2m-10", "DPM-Solver++(2M)", TEACHER, "dpmpp-2m", 10, {}),
    ("dpmpp-2m-20", "DPM-Solver++(2M)", TEACHER, "dpmpp-2m", 20, {}),
    ("heun-10", "Heun (EDM)", TEACHER, "heun", 10, {}),
    ("ddim-10", "DDIM eta=0", TEACHER, "ddim", 10, {"eta": 0.0}),
    ("ddim-20", "DDIM eta=0", TEACHER, "ddim", 20, {"eta": 0.0}),
    ("ddim-50", "DDIM eta=0", TEACHER, "ddim", 50, {"eta": 0.0}),
    ("ddim-eta1-10", "DDIM eta=1", TEACHER, "ddim", 10, {"eta": 1.0}),
    ("ddim-eta1-20", "DDIM eta=1", TEACHER, "ddim", 20, {"eta": 1.0}),
    ("strided-ddpm-50", "strided DDPM", TEACHER, "ddpm", 50, {}),
    ("ddim-eta1-50", "DDIM eta=1", TEACHER, "ddim", 50, {"eta": 1.0}),
    ("ddim-100", "DDIM eta=0", TEACHER, "ddim", 100, {"eta": 0.0}),
    ("strided-ddpm-100", "strided DDPM", TEACHER, "ddpm", 100, {}),
    ("ddim-eta1-100", "DDIM eta=1", TEACHER, "ddim", 100, {"eta": 1.0}),
    ("ddim-200", "DDIM eta=0", TEACHER, "ddim", 200, {"eta": 0.0}),
    ("strided-ddpm-200", "strided DDPM", TEACHER, "ddpm", 200, {}),
    ("ddim-eta1-200", "DDIM eta=1", TEACHER, "ddim", 200, {"eta": 1.0}),
    ("ddim-400", "DDIM eta=0", TEACHER, "ddim", 400, {"eta": 0.0}),
    ("ddim-eta1-400", "DDIM eta=1", TEACHER, "ddim", 400, {"eta": 1.0}),
]
SAME_AS = {"ddim-eta1-50": "strided-ddpm-50", "ddim-eta1-100": "strided-ddpm-100",
           "ddim-eta1-200": "strided-ddpm-200", "ddim-eta1-400": "ddpm-400"}
COST = {"pd-1": 1, "pd-2": 2, "pd-4": 4, "pd-8": 8, "cd-1": 1, "cd-2": 2, "heun-10": 19}


def cost(row) -> int:
    return COST.get(row[0], row[4] or 0)


def claim(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def network_ms(denoiser, x, sigma, cond, reps: int = 3) -> tuple[float, "object"]:
    """Milliseconds per network call at this batch (bf16, after two warm-up calls) and the last output."""
    import torch
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
        for _ in range(2):
            y = denoiser(x, sigma, cond)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            y = denoiser(x, sigma, cond)
        sync()
    return (time.perf_counter() - t0) / reps * 1e3, y.float()


def generate_worker(rows: list, reference: str, out: Path, n: int, deadline: float, compile_teacher: bool,
                    gpu: int) -> None:
    """Runs in a child process with one visible GPU."""
    import h5py
    import numpy as np
    import torch

    from calofast.checkpoint import load_bundle
    from calofast.data import ShowerWriter
    from calofast.generate import compile_network, resolve_sampler, sample_batch

    torch.backends.cudnn.benchmark = True                 # every bundle is warmed up at the chunk size first
    dev = "cuda" if torch.cuda.is_available() else "cpu"     # cpu: smoke runs of this script
    with h5py.File(reference, "r") as f:
        energies = f["incident_energies"][:n, 0].astype(np.float64)
    bundles: dict = {}
    speed: dict = {"gpu": gpu, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}

    def bundle(path: Path):
        if path not in bundles:
            b = load_bundle(path, dev)
            e = torch.from_numpy(energies[:CHUNK]).to(dev)
            x = torch.randn(len(e), *b.event_shape, device=dev)
            args = (x, torch.ones(len(e), device=dev), b.transform.condition(e))
            ms, y_eager = network_ms(b.denoiser, *args)
            if path == TEACHER:
                speed["eager_ms_per_nfe_batch10k"] = ms
            if path == TEACHER and compile_teacher:
                t0, speed["compiled"] = time.time(), False
                try:
                    compile_network(b)
                    ms_c, y_c = network_ms(b.denoiser, *args)
                    rel = float((y_c - y_eager).pow(2).mean().sqrt() / y_eager.pow(2).mean().sqrt())
                    speed.update(compiled_ms_per_nfe_batch10k=ms_c, compile_seconds=time.time() - t0,
                                 compiled_vs_eager_rel_rms=rel)
                    # Kept only if faster and equal to bf16 rounding (~0.4 %); anything larger is a defect.
                    if ms_c <= ms and rel <= 0.02:
                        ms, speed["compiled"] = ms_c, True
                except Exception as err:              # noqa: BLE001 - an inductor failure must not stop the run
                    speed["compile_error"] = f"{type(err).__name__}: {err}"[:500]
                if not speed["compiled"]:             # back to the eager network, warmed up again
                    b = load_bundle(path, dev)
                    network_ms(b.denoiser, *args)
                print(f"[gen {gpu}] teacher network at batch {CHUNK}: {json.dumps(speed)}", flush=True)
            bundles[path] = (b, CHUNK * 1e3 / ms)      # showers x NFE per second (network only)
        return bundles[path]

    if any(r[2] == TEACHER for r in rows):
        bundle(TEACHER)                                # compile before the clock of the first unit
    (out / f"speed_gpu{gpu}.json").write_text(json.dumps(speed))
    n_chunks = -(-n // CHUNK)
    for row in rows:
        label, _, bundle_path, sampler, steps, knobs = row
        merge(label, n_chunks, out, speed["device"])    # chunks left unmerged by an interrupted earlier run
        for k in range(n_chunks):
            part = out / "gen" / f"{label}.part{k}.json"
            if part.exists() or (out / "gen" / f"{label}.json").exists():
                continue
            lo, hi = k * CHUNK, min(n, (k + 1) * CHUNK)
            b, rate = bundle(bundle_path)
            expected = 1.15 * cost(row) * (hi - lo) / rate + 2.0
            if time.time() + expected > deadline or not claim(out / "claims" / f"{label}.{k}"):
                continue
            name, n_steps, sigmas = resolve_sampler(b, sampler, steps)
            sync()
            t0 = time.perf_counter()
            showers, nfe, _ = sample_batch(b, torch.from_numpy(energies[lo:hi]), 1, range(lo, hi), sampler=name,
                                           steps=n_steps, sigmas=sigmas, bf16=dev == "cuda", knobs=knobs)
            nfe = list(nfe.values())[-1]
            showers = showers.cpu().numpy()
            sync()
            dt = time.perf_counter() - t0
            with ShowerWriter(out / "gen" / f"{label}.part{k}.h5", showers.shape[1], force=True,
                              compression_level=0) as w:
                w.write(energies[lo:hi], showers)
            part.write_text(json.dumps({
                "seconds": dt, "events": hi - lo, "nfe": nfe, "sampler": name, "steps": n_steps, "gpu": gpu,
                "dtype": "bf16" if dev == "cuda" else "fp32",
                "compiled": speed.get("compiled", False) and bundle_path == TEACHER}))
            print(f"[gen {gpu}] {label} chunk {k}: {name} x{n_steps} NFE {nfe}, {dt:.1f} s "
                  f"({(hi - lo) / dt:.0f} showers/s)", flush=True)
            merge(label, n_chunks, out, speed["device"])


def merge(label: str, n_chunks: int, out: Path, device: str) -> None:
    """Once every chunk of a row exists: one file gen/<label>.h5, then gen/<label>.json (the signal)."""
    from calofast.data import ShowerWriter, read_showers

    parts = [out / "gen" / f"{label}.part{k}" for k in range(n_chunks)]
    h5, js = [Path(f"{p}.h5") for p in parts], [Path(f"{p}.json") for p in parts]
    if not all(j.exists() for j in js) or not claim(out / "claims" / f"{label}.merge"):
        return
    lost = [k for k, p in enumerate(h5) if not p.exists()]
    if lost:                                          # an interrupted merge: redo those chunks
        for k in lost:
            js[k].unlink()
            (out / "claims" / f"{label}.{k}").unlink(missing_ok=True)
        (out / "claims" / f"{label}.merge").unlink()
        return
    infos = [json.loads(j.read_text()) for j in js]
    chunks = (read_showers(p, validate=False) for p in h5)
    e, s = next(chunks)
    with ShowerWriter(out / "gen" / f"{label}.h5", s.shape[1], force=True, compression_level=0) as w:
        w.write(e, s)
        for e, s in chunks:
            w.write(e, s)
    ms = [i["seconds"] / i["events"] * 1e3 for i in infos]
    (out / "gen" / f"{label}.json").write_text(json.dumps(
        {"label": label, "sampler": infos[0]["sampler"], "steps": infos[0]["steps"], "nfe": infos[0]["nfe"],
         "ms_per_shower": statistics.median(ms), "ms_per_chunk_shower": ms, "batch": CHUNK, "dtype": infos[0]["dtype"],
         "compiled": infos[0]["compiled"], "device": device, "events": sum(i["events"] for i in infos)}))
    for p in h5:                                      # only once the row's record exists
        p.unlink()


def eval_worker(reference: str, baseline: str, out: Path, gpu: int, stop_at: float, labels: list[str],
                fast: bool) -> None:
    """Evaluates any finished row that no other worker has claimed, until none is left or stop_at."""
    import torch

    from calofast.evaluate import evaluate_files, prepare_reference
    from calofast.geometry import PRESETS

    geo = PRESETS["ds2"]
    if all((out / "eval" / lab / "metrics.json").exists() for lab in labels):
        return
    ref = prepare_reference(reference, geo)
    device = f"cuda:{gpu}" if torch.cuda.is_available() else "cpu"
    while time.time() < stop_at:
        finished = (out / "gen_finished").exists()      # read before looking for rows: no row appears after it
        ready = [lab for lab in labels if (lab == "gflash-vs-gflash" or (out / "gen" / f"{lab}.json").exists())
                 and not (out / "claims" / f"eval.{lab}").exists() and not (out / "eval" / lab / "metrics.json").exists()]
        label = next((lab for lab in ready if claim(out / "claims" / f"eval.{lab}")), None)
        if label is None:
            if finished:
                break
            time.sleep(2)
            continue
        gen_path = baseline if label == "gflash-vs-gflash" else out / "gen" / f"{label}.h5"
        t0 = time.time()
        m = evaluate_files(gen_path, ref, geo, out / "eval" / label, min_events=100, device=device, fast=fast,
                           label=label, progress=False, plots=label in ("ddpm-400", "pd-1", "pd-2", "gflash-vs-gflash"))
        print(f"[eval] {label}: AUC low {m['classifier_low']['auc']:.3f} high {m['classifier_high']['auc']:.3f} "
              f"FPD {m['fpd']['x1e3']:.2f} ({time.time() - t0:.0f} s: {json.dumps(m['seconds'])})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", required=True)
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=50_000, help="showers per row (the reference's first n)")
    ap.add_argument("--deadline", type=float, default=420, help="seconds from start by which generation ends")
    ap.add_argument("--eval-until", type=float, default=560, help="seconds from start after which evaluation stops")
    ap.add_argument("--compile", action="store_true", help="torch.compile the teacher's network if it is faster")
    ap.add_argument("--role", default="main")
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--results-tar", type=Path, help="keep a tarball of every metrics.json here, refreshed")
    ap.add_argument("--start", type=float, default=0)
    ap.add_argument("--rows", help="comma-separated labels to run (default: all)")
    ap.add_argument("--fast", action="store_true", help="shortened classifier (smoke tests of this script)")
    a = ap.parse_args()
    labels = [r[0] for r in ROWS if r[0] not in SAME_AS and (not a.rows or r[0] in a.rows.split(","))]
    if a.role == "gen":
        rows = [r for r in ROWS if r[0] in labels and r[2] is not None]          # priority order
        generate_worker(rows, a.reference, a.out, a.n, a.start + a.deadline, a.compile, a.gpu)
        return
    if a.role == "eval":
        eval_worker(a.reference, a.baseline, a.out, a.gpu, a.start + a.eval_until, labels, a.fast)
        return
    import torch
    n_gpu = max(1, torch.cuda.device_count())
    start = time.time()
    for d in ("gen", "claims"):
        (a.out / d).mkdir(parents=True, exist_ok=True)
    (a.out / "gen_finished").unlink(missing_ok=True)
    for c in (a.out / "claims").iterdir():           # claims of an interrupted earlier run that left no chunk
        label, k = c.name.rsplit(".", 1)
        if label == "eval":
            kept = (a.out / "eval" / k / "metrics.json").exists()
        elif k == "merge":
            kept = (a.out / "gen" / f"{label}.json").exists()
        else:
            kept = (a.out / "gen" / f"{label}.part{k}.json").exists() or (a.out / "gen" / f"{label}.json").exists()
        if not kept:
            c.unlink()
    for j in (a.out / "gen").glob("*.json"):         # carried-in records of rows whose showers are not here
        if ".part" not in j.name and not j.with_suffix(".h5").exists() and \
                not (a.out / "eval" / j.stem / "metrics.json").exists():
            j.unlink()
    todo = [lab for lab in labels[1:] if not (a.out / "gen" / f"{lab}.json").exists()]
    print(f"[main] {n_gpu} GPU(s); rows to generate: {len(todo)}, NFE x 10k-chunks left: "
          f"{sum(cost(r) for r in ROWS if r[0] in todo) * -(-a.n // CHUNK)}", flush=True)
    common = [sys.executable, __file__, "--reference", a.reference, "--baseline", a.baseline, "--out", str(a.out),
              "--n", str(a.n), "--deadline", str(a.deadline), "--eval-until", str(a.eval_until), "--start", str(start)]
    common += (["--rows", a.rows] if a.rows else []) + (["--fast"] if a.fast else []) + (["--compile"] if a.compile else [])
    procs = [subprocess.Popen(common + ["--role", "gen", "--gpu", str(g)],
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": str(g), "OMP_NUM_THREADS": "4"})
             for g in range(n_gpu)]
    n_eval = 2 * n_gpu
    evals = [subprocess.Popen(common + ["--role", "eval", "--gpu", str(w % n_gpu)],
                              env={**os.environ, "OMP_NUM_THREADS": "6"}) for w in range(n_eval)]
    while any(p.poll() is None for p in procs + evals):
        if all(p.poll() is not None for p in procs) and not (a.out / "gen_finished").exists():
            (a.out / "gen_finished").write_text("ok")
            print(f"[main] generation finished at {time.time() - start:.0f} s", flush=True)
        save_results(a.out, a.results_tar)
        time.sleep(10)
    (a.out / "gen_finished").write_text("ok")
    save_results(a.out, a.results_tar)
    print(f"[main] evaluation finished at {time.time() - start:.0f} s", flush=True)


def save_results(out: Path, tar: "Path | None") -> None:
    """Atomically refresh a tarball of gen/<label>.json, eval/<label>/metrics.json and speed_gpu*.json."""
    import tarfile
    if tar is None:
        return
    tmp = tar.with_name(f".{tar.name}.tmp")
    with tarfile.open(tmp, "w:gz") as t:
        for p in sorted([*out.glob("gen/*.json"), *out.glob("eval/*/metrics.json"), *out.glob("speed_gpu*.json")]):
            if ".part" not in p.name:
                t.add(p, arcname=str(p.relative_to(out)))
    os.replace(tmp, tar)


if __name__ == "__main__":
    main()
