"""The `calofast` command line: thin wrappers over library functions, one per subcommand.

Errors in user input (bad files, bad options) print one line, `calofast: error: ...`, and exit 2;
set CALOFAST_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("calofast")


def _geometry(text: str):
    from .geometry import get_geometry
    return get_geometry(text)


# ---------------------------------------------------------------------- subcommands
def cmd_gflash(a: argparse.Namespace) -> int:
    from .gflash import GFlashConfig, write_gflash
    geo = _geometry(a.geometry)
    path = write_gflash(a.output, geo, a.n, a.energies, a.seed, chunk=a.chunk, force=a.force,
                        config=GFlashConfig(c_s=a.c_s, substeps=a.substeps), workers=a.workers,
                        compression_level=0 if a.no_compress else 4)
    print(f"wrote {a.n} {geo.name} showers to {path}")
    if a.summary:
        return cmd_info(argparse.Namespace(file=path, geometry=None, plot=Path(path).with_suffix(".png"),
                                           max_events=None))
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from .data import inspect_file
    from .metrics.features import file_features
    info = inspect_file(a.file)
    geo = _geometry(a.geometry) if a.geometry else info.geometry()
    ff = file_features(a.file, geo, max_events=a.max_events, progress=True)
    f = ff.features
    resp = f["E_tot"] / f["E_inc"]
    print(f"{a.file}: {info.n_events} showers x {info.n_voxels} voxels ({geo.name}), dtype {info.dtype}")
    print(f"  incident energy  {f['E_inc'].min() / 1e3:.4g} - {f['E_inc'].max() / 1e3:.4g} GeV")
    print(f"  E_tot/E_inc      mean {resp.mean():.4f}  rms {resp.std():.4f}")
    print(f"  sparsity         mean {f['sparsity'].mean():.4f} (fraction of empty voxels)")
    print(f"  max voxel        {ff.voxel_max:.4g} MeV")
    depth = (f["E_layer"] * geo.relevant_layers).sum(1) / (f["E_layer"].sum(1) + 1e-16)
    print(f"  mean depth       layer {depth.mean():.2f} (energy-weighted)")
    if a.plot:
        from .plots import plot_summary
        print(f"  plot             {plot_summary(ff, geo, a.plot)}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from .config import apply_overrides, get_preset
    from .train import train_model
    if a.init is not None and a.preset is not None:
        raise ValueError("--init continues a bundle with its own config: give --set train.* options, not --preset")
    if a.init is not None:
        from .checkpoint import load_bundle
        start = load_bundle(a.init)
        base, preset = start.config, start.meta.get("preset", "")
    else:
        preset = a.preset or "ds2-unet"
        base = get_preset(preset)
    cfg = apply_overrides(base, a.set or [])
    path = train_model(cfg, a.data, a.output, preset=preset, init=a.init)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"bundle: {path}")
    return 0


def cmd_distill(a: argparse.Namespace) -> int:
    from .checkpoint import load_bundle
    from .config import apply_overrides
    from .distill import distill_consistency, distill_progressive
    base = load_bundle(a.teacher).config
    sets = list(a.set or [])
    if a.method == "progressive":
        sets += [f"distill.start_steps={a.start_steps}", f"distill.to_steps={a.to_steps}"]
    cfg = apply_overrides(base, sets)
    if a.method == "progressive":
        out = distill_progressive(a.teacher, a.data, a.output, cfg)
    else:
        out = [distill_consistency(a.teacher, a.data, a.output, cfg)]
    if int(os.environ.get("RANK", "0")) == 0:
        print("bundles: " + ", ".join(str(p) for p in out))
    return 0


def _energies(a: argparse.Namespace, bundle):
    import numpy as np
    from .data import read_showers
    from .energies import parse_spectrum
    if a.energies_from:
        e, _ = read_showers(a.energies_from, stop=a.n, validate=False)
        return e.astype(np.float64)
    if a.n is None:
        raise ValueError("--n is required unless --energies-from gives the events")
    if a.energies:
        return parse_spectrum(a.energies).sample(a.seed, range(a.n))
    lo, hi = bundle.transform.energy_range
    return np.exp(np.log(lo) + np.random.default_rng(a.seed).random(a.n) * np.log(hi / lo))


def cmd_generate(a: argparse.Namespace) -> int:
    from .checkpoint import load_bundle
    from .generate import compile_network, generate_file, nfe_text
    bundle = load_bundle(a.model, device=a.device)
    if a.compile:
        compile_network(bundle)
    knobs = {"eta": a.eta} if a.eta is not None else {}
    stats = generate_file(bundle, a.output, _energies(a, bundle), seed=a.seed, sampler=a.sampler, steps=a.steps,
                          batch_size=a.batch_size, bf16=a.dtype == "bf16", force=a.force, knobs=knobs)
    print(f"wrote {stats.n} showers to {stats.path}: sampler {stats.sampler}, {stats.steps} steps, "
          f"{nfe_text(stats.nfe)}, {stats.showers_per_s:.1f} showers/s on {a.device} ({a.dtype}); "
          f"{stats.clipped} clipped showers")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import evaluate_files
    geo = _geometry(a.geometry)
    classifiers = tuple(c for c in a.classifiers.split(",") if c) if a.classifiers else ()
    m = evaluate_files(a.generated, a.reference, geo, a.output, fast=a.fast, min_events=a.min_events,
                       classifiers=classifiers, device=a.device, label=a.label or Path(a.generated).stem)
    for key in ("classifier_low", "classifier_high"):
        if key in m:
            print(f"{key}: AUC {m[key]['auc']:.4f}  JSD {m[key]['jsd']:.4f}")
    for key in ("fpd", "kpd"):
        if key in m:
            print(f"{key.upper()} x 1e3: {m[key]['x1e3']:.3f} +- {m[key]['error'] * 1e3:.3f}")
    print(f"separation power E_tot/E_inc: {m['separation_power']['response']:.5f}")
    print(f"report: {m.get('report', Path(a.output) / 'metrics.json')}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    import torch

    from .bench import bench, write_table
    from .checkpoint import load_bundle
    if a.threads:
        torch.set_num_threads(a.threads)
    bundle = load_bundle(a.model, device=a.device)
    if a.compile:
        from .generate import compile_network
        compile_network(bundle)
    rows = bench(bundle, a.sampler, a.steps, [int(b) for b in a.batch_sizes.split(",")], a.repeats,
                 bf16=a.dtype == "bf16")
    print(f"{'sampler':>14} {'NFE':>5} {'batch':>6} {'ms/shower':>12} {'std':>9} {'showers/s':>11}  device")
    for r in rows:
        print(f"{r['label']:>14} {r['nfe']:5d} {r['batch']:6d} {r['ms_per_shower']:12.5f} {r['std']:9.5f} "
              f"{r['showers_per_s']:11.1f}  {r['device']} {r['dtype']}")
    if a.output:
        print(f"table: {write_table(rows, a.output)}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .checkpoint import load_bundle
    from .export import export_onnx, export_torchscript
    bundle = load_bundle(a.model)
    if a.format == "torchscript":
        path = export_torchscript(bundle, a.output, sampler=a.sampler, steps=a.steps, force=a.force)
    else:
        path = export_onnx(bundle, a.output, sampler=a.sampler, steps=a.steps, flavour=a.flavour,
                           par04_energy_scale=a.par04_energy_scale, force=a.force)
    print(f"wrote {path}" + ("" if a.format == "torchscript" else f" and {Path(path).with_suffix('.json')}"))
    return 0


def cmd_study(a: argparse.Namespace) -> int:
    from .study import study
    shard = None
    if a.shard:
        k, _, n = a.shard.partition("/")
        if not (k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
            raise ValueError(f"--shard {a.shard}: expected K/N with 0 <= K < N")
        shard = (int(k), int(n))
    if a.eval_jobs < 0 or a.deadline < 0 or a.workers < 1:
        raise ValueError("--eval-jobs and --deadline must be >= 0 and --workers >= 1")
    return study(a.plan, a.output, device=a.device, shard=shard, table_only=a.table_only, fast=a.fast,
                 eval_jobs=a.eval_jobs, deadline=a.deadline, keep_showers=a.keep_showers, workers=a.workers)


def cmd_demo(a: argparse.Namespace) -> int:
    """GFlash truth -> shipped model through a few-step sampler -> CaloChallenge evaluation -> report."""
    import numpy as np

    from .checkpoint import load_bundle
    from .data import read_showers
    from .evaluate import evaluate_files
    from .generate import generate_file, nfe_text
    from .geometry import get_geometry
    from .gflash import write_gflash
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    truth = out / "ds2_gflash_truth.h5"
    if not truth.exists():
        write_gflash(truth, get_geometry("ds2"), a.n, "log-uniform:1GeV:1TeV", a.seed, chunk=1000,
                     workers=min(4, os.cpu_count() or 1))
    cmd_info(argparse.Namespace(file=truth, geometry="ds2", max_events=None, plot=out / "ds2_gflash_truth.png"))
    bundle = load_bundle(a.model, device=a.device)
    energies, _ = read_showers(truth, validate=False)
    generated = out / f"generated_{Path(a.model).stem}.h5"
    stats = generate_file(bundle, generated, energies.astype(np.float64), seed=a.seed + 1, sampler=a.sampler,
                          steps=a.steps, batch_size=500, force=True, bf16=a.device.startswith("cuda"))
    print(f"generated {stats.n} showers with {Path(a.model).stem}: {stats.sampler} x{stats.steps}, "
          f"{nfe_text(stats.nfe)}, {stats.showers_per_s:.1f} showers/s on {a.device}")
    m = evaluate_files(generated, truth, bundle.geometry, out / "report", fast=a.fast, min_events=min(a.n, 1000),
                       label=f"{Path(a.model).stem} {stats.sampler} x{stats.steps}")
    for key in ("classifier_low", "classifier_high"):
        print(f"{key}: AUC {m[key]['auc']:.3f}" + ("  (fast classifier)" if a.fast else ""))
    print(f"FPD x 1e3 {m['fpd']['x1e3']:.1f} +- {m['fpd']['error'] * 1e3:.1f};  E_tot/E_inc generated "
          f"{m['response']['generated']['mean']:.4f}, truth {m['response']['reference']['mean']:.4f}")
    print(f"report: {m['report']}")
    return 0


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calofast", description="Fast calorimeter-shower simulation with "
                                "diffusion models (CaloChallenge format).")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("gflash", help="simulate GFlash showers into a CaloChallenge HDF5 file",
                       description="Simulate parameterised (GFlash) EM showers in the Par04 W/Si "
                       "calorimeter, written in the CaloChallenge format.")
    g.add_argument("--geometry", default="ds2", help="ds2, ds3 or a binning XML (default ds2)")
    g.add_argument("--n", type=int, default=10_000, help="number of showers (default 10000)")
    g.add_argument("--energies", default="log-uniform:1GeV:1TeV",
                   help="spectrum: log-uniform:1GeV:1TeV (default), uniform:A:B, fixed:E, ds1-photons")
    g.add_argument("--seed", type=int, default=0, help="random seed (event k depends only on seed, k)")
    g.add_argument("--chunk", type=int, default=5000, help="showers per written chunk")
    g.add_argument("--workers", type=int, default=1, help="parallel simulation processes (default 1)")
    g.add_argument("--no-compress", action="store_true", help="write without gzip (fast scratch files)")
    g.add_argument("--c-s", type=float, default=0.12, help="sampling term c_s (default 0.12)")
    g.add_argument("--substeps", type=int, default=8, help="longitudinal sub-steps per layer")
    g.add_argument("--summary", action="store_true", help="print a summary and plot it beside the file")
    g.add_argument("--force", action="store_true", help="overwrite an existing output file")
    g.add_argument("-o", "--output", required=True, help="output .h5 file")
    g.set_defaults(func=cmd_gflash)

    i = sub.add_parser("info", help="check a CaloChallenge file and print its summary",
                       description="Validate a CaloChallenge HDF5 file and summarise its showers.")
    i.add_argument("file", type=Path)
    i.add_argument("--geometry", help="geometry (default: from the voxel count)")
    i.add_argument("--max-events", type=int, help="only the first N showers")
    i.add_argument("--plot", type=Path, help="write a summary plot (PNG) here")
    i.set_defaults(func=cmd_info)

    t = sub.add_parser("train", help="train a diffusion model (torchrun for several GPUs/processes)",
                       description="Train a denoiser on a CaloChallenge file. Resumes when re-run with the "
                       "same output folder. Multi-GPU: torchrun --nproc-per-node N -m calofast train ...")
    t.add_argument("--data", required=True, help="training file (CaloChallenge HDF5)")
    t.add_argument("--preset", help="named config (tiny, ds2-unet, ds2-factorised, ...; default ds2-unet)")
    t.add_argument("--init", help="continue from this bundle's weights, transform and config (fresh optimiser "
                   "and schedule from its train.* options and --set)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=2e-4 (repeatable)")
    t.add_argument("-o", "--output", required=True, help="run folder (config.json, stats.jsonl, model.safetensors)")
    t.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="sample showers from a model bundle into a CaloChallenge file",
                         description="Generate showers with any sampler. Distilled bundles bring their own "
                         "sampler and steps.")
    gen.add_argument("--model", required=True, help="model bundle (.safetensors)")
    gen.add_argument("--sampler", help="ddpm, ddim, euler, heun, dpmpp-2m, dpmpp-2m-sde, consistency "
                     "(default: the bundle's own, else dpmpp-2m)")
    gen.add_argument("--steps", type=int, help="sampler steps (default: the bundle's own, else 20)")
    gen.add_argument("--eta", type=float, help="DDIM eta in [0, 1] (default 0)")
    gen.add_argument("--n", type=int, help="number of showers")
    gen.add_argument("--energies", help="spectrum, e.g. log-uniform:1GeV:1TeV (default: the model's range)")
    gen.add_argument("--energies-from", help="take incident energies event by event from this file")
    gen.add_argument("--seed", type=int, default=0, help="seed; shower k depends only on (seed, k)")
    gen.add_argument("--batch-size", type=int, default=1000)
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    gen.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    gen.add_argument("--compile", action="store_true", help="torch.compile the network (slow first batch)")
    gen.add_argument("--force", action="store_true", help="overwrite the output")
    gen.add_argument("-o", "--output", required=True)
    gen.set_defaults(func=cmd_generate)

    ds = sub.add_parser("distill", help="distil a teacher into a few-step student (progressive or consistency)",
                        description="Progressive distillation down to 1 step, or consistency distillation. "
                        "Resumable; multi-GPU through torchrun like training.")
    ds.add_argument("method", choices=("progressive", "consistency"))
    ds.add_argument("--teacher", required=True, help="teacher bundle (.safetensors)")
    ds.add_argument("--data", required=True, help="training showers (CaloChallenge HDF5)")
    ds.add_argument("--start-steps", type=int, default=128, help="progressive: teacher steps of the first stage")
    ds.add_argument("--to-steps", type=int, default=1, help="progressive: final student steps")
    ds.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override, e.g. distill.showers_per_stage=200000, distill.cm_steps=40")
    ds.add_argument("-o", "--output", required=True, help="run folder")
    ds.set_defaults(func=cmd_distill)

    ev = sub.add_parser("evaluate", help="CaloChallenge evaluation of generated vs reference showers",
                        description="Features, separation powers, classifier AUCs, FPD/KPD, plots and report.html.")
    ev.add_argument("--generated", required=True)
    ev.add_argument("--reference", required=True)
    ev.add_argument("--geometry", default="ds2")
    ev.add_argument("--fast", action="store_true", help="shortened classifier (smoke runs; not comparable)")
    ev.add_argument("--min-events", type=int, help="accept files smaller than the official protocol's size")
    ev.add_argument("--classifiers", default="low,high", help="which classifier tests (low,high; empty: none)")
    ev.add_argument("--device", help="classifier device (default: cuda if available)")
    ev.add_argument("--label", help="name in the report")
    ev.add_argument("-o", "--output", required=True, help="report folder")
    ev.set_defaults(func=cmd_evaluate)

    be = sub.add_parser("bench", help="time per shower (CaloChallenge timing protocol)",
                        description="Warm-up, then repeated timed batches; CUDA synchronised; mean, std, median.")
    be.add_argument("--model", required=True)
    be.add_argument("--sampler")
    be.add_argument("--steps", type=int)
    be.add_argument("--batch-sizes", default="1,100,10000")
    be.add_argument("--repeats", type=int, default=10)
    be.add_argument("--device", default="cpu")
    be.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    be.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    be.add_argument("--compile", action="store_true", help="torch.compile the network (compiled in the warm-up)")
    be.add_argument("-o", "--output", help="write the table (.csv or .json)")
    be.set_defaults(func=cmd_bench)

    ex = sub.add_parser("export", help="export a bundle + few-step sampler to ONNX (Geant4 Par04) or TorchScript",
                        description="One ONNX file (opset 17) with preprocessing, the unrolled sampler and the "
                        "inverse transform. Distilled bundles bring their own sampler and steps.")
    ex.add_argument("--model", required=True)
    ex.add_argument("--sampler", help="euler, ddim, heun, dpmpp-2m or consistency (deterministic only)")
    ex.add_argument("--steps", type=int)
    ex.add_argument("--flavour", choices=("par04", "reproducible"), default="reproducible")
    ex.add_argument("--format", choices=("onnx", "torchscript"), default="onnx",
                    help="torchscript is a secondary path (reproducible signature)")
    ex.add_argument("--par04-energy-scale", type=float, default=1.0,
                    help="par04 flavour: factor on the output (1 = CaloChallenge scale; 0.033 = silicon only)")
    ex.add_argument("--force", action="store_true")
    ex.add_argument("-o", "--output", required=True)
    ex.set_defaults(func=cmd_export)

    st = sub.add_parser("study", help="generate, time and evaluate every row of a plan; one table and plot",
                        description="Run a study plan (TOML: [reference], [defaults], [[rows]]; see studies/): "
                        "each row generated in chunks, timed, evaluated against the reference; writes DIR/table.csv, "
                        "table.md, pareto.png, index.html. Re-run the same command to resume. Exit 3: a deadline "
                        "left rows unfinished.")
    st.add_argument("plan", type=Path)
    st.add_argument("-o", "--output", required=True, type=Path, help="study folder (resumed if it exists)")
    st.add_argument("--device", default="cpu", help="cpu or cuda (every visible GPU: one shard each)")
    st.add_argument("--fast", action="store_true", help="small classifier and fewer bootstraps (smoke runs only)")
    st.add_argument("--eval-jobs", type=int, default=0, help="evaluations in this many worker processes "
                    "while the next row generates (default 0: in turn)")
    st.add_argument("--deadline", type=float, default=0, help="stop starting work after this many seconds")
    st.add_argument("--workers", type=int, default=1, help="processes for GFlash reference showers")
    st.add_argument("--keep-showers", action="store_true", help="keep each row's showers.h5 after evaluation")
    st.add_argument("--table-only", action="store_true", help="only rewrite the table, plot and index")
    st.add_argument("--shard", help="K/N: run rows K, K+N, ... only (one process per GPU; no table)")
    st.set_defaults(func=cmd_study)

    d = sub.add_parser("demo", help="the main job: GFlash truth, shipped model, evaluation report",
                       description="Simulate fresh GFlash DS2 truth, generate the same events with a shipped model "
                       "through a few-step sampler, evaluate them with the CaloChallenge protocol and print the "
                       "path of report.html.")
    d.add_argument("--n", type=int, default=2000, help="showers (default 2000)")
    d.add_argument("--model", default="ds2-student-pd-2step",
                   help="bundle or shipped name (default ds2-student-pd-2step, fast on a CPU; on a GPU use "
                        "ds2-factorised, the better model: its default is DPM-Solver++(2M) with 32 steps)")
    d.add_argument("--sampler")
    d.add_argument("--steps", type=int)
    d.add_argument("--device", default="cpu")
    d.add_argument("--full", dest="fast", action="store_false",
                   help="full classifier protocol (default: the fast one, minutes on a CPU)")
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("-o", "--output", default="demo", help="output folder (default demo/)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError) as err:
        if os.environ.get("CALOFAST_DEBUG"):
            raise
        msg = str(err).strip("'\"") or type(err).__name__
        print(f"calofast: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("calofast: interrupted", file=sys.stderr)
        return 130
