"""The `calofast` command line: thin wrappers over library functions, one per subcommand.

Errors in user input (bad files, bad options) print one line, `calofast: error: ...`, and exit 2;
set CALOFAST_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .cli_checks import (_count, _cpus, _device, _energies, _energy_stage, _geometry, _graph_ok, _model_side,
                         _positive, _seed, _shard, _showers, _spectrum)

__all__ = ["main"]

log = logging.getLogger("calofast")


# ---------------------------------------------------------------------- subcommands
def cmd_gflash(a: argparse.Namespace) -> int:
    from .gflash import GFlashConfig, write_gflash
    _positive(chunk=a.chunk, workers=a.workers)
    _showers(a.n)
    _cpus("--workers", a.workers)
    _seed(a.seed)
    geo = _geometry(a.geometry)
    if a.summary:                      # the plot beside the file follows the file's rule, checked before any work
        from .data import claim_output
        claim_output(Path(a.output).with_suffix(".png"), a.force)
    _spectrum(a.energies)
    path = write_gflash(a.output, geo, a.n, a.energies, a.seed, chunk=a.chunk, force=a.force,
                        config=GFlashConfig(c_s=a.c_s, substeps=a.substeps), workers=a.workers,
                        compression_level=0 if a.no_compress else 4)
    print(f"wrote {a.n} {geo.name} showers to {path}")
    if a.summary:
        return cmd_info(argparse.Namespace(file=path, geometry=None, plot=Path(path).with_suffix(".png"),
                                           max_events=None, force=a.force))
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from .data import claim_output, inspect_file
    from .metrics.features import file_features
    _positive(max_events=a.max_events)
    if a.plot:
        from matplotlib.backend_bases import FigureCanvasBase
        kinds = FigureCanvasBase.get_supported_filetypes()
        if Path(a.plot).suffix.lstrip(".").lower() not in kinds:
            raise ValueError(f"--plot {a.plot}: name a picture file ({', '.join(sorted(kinds))})")
        claim_output(Path(a.plot), a.force)
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
    stages = tuple(s.strip() for s in a.stages.split(",") if s.strip()) if a.stages is not None else None
    path = train_model(cfg, a.data, a.output, preset=preset, init=a.init, stages=stages)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"bundle: {path}")
    return 0


def cmd_distill(a: argparse.Namespace) -> int:
    from .checkpoint import load_bundle
    from .config import apply_overrides
    from .distill import distill_consistency, distill_progressive, distill_shortcut
    if a.targets_from and a.method != "shortcut":
        raise ValueError(f"--targets-from is for the shortcut method, not {a.method}")
    if a.method == "progressive" and not (1 <= a.to_steps < a.start_steps):
        raise ValueError(f"--to-steps {a.to_steps} --start-steps {a.start_steps}: progressive distillation halves "
                         "the steps, so 1 <= --to-steps < --start-steps")
    base = load_bundle(a.teacher).config
    sets = list(a.set or [])
    if a.method == "progressive":
        sets += [f"distill.start_steps={a.start_steps}", f"distill.to_steps={a.to_steps}"]
    cfg = apply_overrides(base, sets)
    if a.method == "progressive":
        out = distill_progressive(a.teacher, a.data, a.output, cfg)
    elif a.method == "consistency":
        out = [distill_consistency(a.teacher, a.data, a.output, cfg)]
    else:
        out = [distill_shortcut(a.teacher, a.data, a.output, cfg, targets_from=a.targets_from)]
    if int(os.environ.get("RANK", "0")) == 0:
        print("bundles: " + ", ".join(str(p) for p in out))
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from .checkpoint import load_bundle
    from .generate import (check_batch_memory, compile_network, default_batch_size, generate_file, nfe_text,
                           parse_stage_sampler, shard_range)
    shard, output, device = _shard(a.shard), Path(a.output), a.device
    if a.shard == "torchrun":
        output = output.with_name(f"{output.stem}.part{shard[0]:04d}-of-{shard[1]:04d}{output.suffix}")
        if device == "cuda":
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    _positive(batch_size=a.batch_size, steps=a.steps)
    _showers(a.n)
    if a.energies is not None and a.energies_from:
        raise ValueError("--energies and --energies-from both give the incident energies: choose one")
    if a.energies_from and Path(a.energies_from).resolve() == output.resolve():
        raise ValueError(f"-o {a.output}: is the --energies-from file itself; write the showers elsewhere")
    if a.eta is not None and not 0 <= a.eta <= 1:
        raise ValueError(f"--eta {a.eta}: must be in [0, 1] (0: deterministic DDIM, 1: as noisy as DDPM)")
    _seed(a.seed)
    bundle = _model_side(load_bundle(a.model, device=_device(device)), a)
    batch = a.batch_size or default_batch_size(device, bundle.geometry.n_voxels)
    check_batch_memory(device, bundle.geometry.n_voxels, min(batch, a.n or batch))
    _energy_stage(bundle, a)
    energies, first = _energies(a, bundle), 0
    total = len(energies)
    if shard is not None:
        events = shard_range(len(energies), *shard)
        if not len(events):
            raise ValueError(f"--shard {a.shard}: this shard of {len(energies)} events holds none (use fewer shards)")
        energies, first = energies[events.start:events.stop], events.start
    if a.compile:
        compile_network(bundle, bf16=a.dtype == "bf16")
    knobs = {"eta": a.eta} if a.eta is not None else {}
    stats = generate_file(bundle, output, energies, seed=a.seed, sampler=a.sampler, steps=a.steps,
                          batch_size=batch, bf16=a.dtype == "bf16", force=a.force, knobs=knobs, first_event=first,
                          total_events=total, early=parse_stage_sampler(a.energy_sampler),
                          cuda_graph=_graph_ok(a.cuda_graph, device))
    print(f"wrote {stats.n} showers to {stats.path}: sampler {stats.sampler}, {_count(stats.steps, 'step')}, "
          f"{nfe_text(stats.nfe)}, {stats.showers_per_s:.1f} showers/s on {a.device} ({a.dtype}); "
          f"{_count(stats.clipped, 'clipped shower')}")
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from .generate import merge_files
    path = merge_files(a.parts, a.output, force=a.force)
    print(f"merged {len(a.parts)} files into {path}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .data import inspect_file
    from .evaluate import evaluate_files
    if a.geometry:
        geo = _geometry(a.geometry)
    else:                   # the built-in geometry with the reference's voxel count
        info = inspect_file(a.reference)
        try:
            geo = info.geometry()
        except ValueError as e:
            raise ValueError(f"{e}; give --geometry (a name or a binning XML)") from None
    classifiers = tuple(c for c in a.classifiers.split(",") if c) if a.classifiers else ()
    if bad := [c for c in classifiers if c not in ("low", "high")]:
        raise ValueError(f"--classifiers {a.classifiers}: unknown {', '.join(bad)} (choose low, high or both)")
    if a.device:
        _device(a.device)
    baseline = None
    if a.baseline:
        from .report import load_baseline
        baseline = load_baseline(a.baseline)
    m = evaluate_files(a.generated, a.reference, geo, a.output, fast=a.fast, min_events=a.min_events,
                       classifiers=classifiers, device=a.device, label=a.label or "", baseline=baseline,
                       classifier_seeds=a.classifier_seeds, force=a.force)
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
    sizes = a.batch_sizes.split(",")
    if not all(b.strip().isdigit() and int(b) >= 1 for b in sizes):
        raise ValueError(f"--batch-sizes {a.batch_sizes}: expected positive integers, e.g. 1,100,10000")
    _positive(repeats=a.repeats, steps=a.steps, threads=a.threads)
    _cpus("--threads", a.threads)
    if a.output:
        from .data import claim_output
        claim_output(Path(a.output), a.force)             # before the work, not after it
    if a.threads:
        torch.set_num_threads(a.threads)
    bundle = _model_side(load_bundle(a.model, device=_device(a.device)), a)
    _energy_stage(bundle, a)
    from .generate import check_batch_memory
    check_batch_memory(a.device, bundle.geometry.n_voxels, max(int(b) for b in sizes), "--batch-sizes")
    if a.compile:
        from .generate import compile_network
        compile_network(bundle, bf16=a.dtype == "bf16")
    from .generate import parse_stage_sampler
    rows = bench(bundle, a.sampler, a.steps, [int(b) for b in sizes], a.repeats, bf16=a.dtype == "bf16", progress=True,
                 early=parse_stage_sampler(a.energy_sampler), cuda_graph=_graph_ok(a.cuda_graph, a.device))
    print(f"{'sampler':>14} {'NFE':>5} {'batch':>6} {'ms/shower':>12} {'std':>9} {'showers/s':>11}  device")
    for r in rows:
        print(f"{r['label']:>14} {r['nfe']:5d} {r['batch']:6d} {r['ms_per_shower']:12.5f} {r['std']:9.5f} "
              f"{r['showers_per_s']:11.1f}  {r['device']} {r['dtype']}")
    if a.output:
        print(f"table: {write_table(rows, a.output, force=a.force)}")
    return 0


def cmd_set_sampler(a: argparse.Namespace) -> int:
    from .checkpoint import set_stage_sampler
    from .generate import parse_stage_sampler
    name, steps = parse_stage_sampler(a.sampler, "--sampler")
    out = set_stage_sampler(a.model, a.output, a.stage, name, steps, force=a.force)
    print(f"wrote {out}: stage {a.stage} defaults to {name} with {_count(steps, 'step')}")
    return 0


def cmd_prune(a: argparse.Namespace) -> int:
    from .checkpoint import load_bundle
    from .data import claim_output
    from .prune import check_keep, prune_bundle
    _positive(batches=a.batches, batch_size=a.batch_size)
    check_keep(a.keep)
    claim_output(Path(a.output), a.force)             # before the work, not after it
    bundle = load_bundle(a.model, device=_device(a.device))
    before = sum(p.numel() for p in bundle.denoiser.parameters())
    out = prune_bundle(bundle, a.data, a.output, a.keep, batches=a.batches, batch_size=a.batch_size)
    after = sum(p.numel() for p in load_bundle(out).denoiser.parameters())
    print(f"wrote {out}: main stage {before:,} -> {after:,} parameters; fine-tune it with "
          f"calofast train --init {out} --data {a.data} -o RUN")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .checkpoint import load_bundle
    from .export import export_onnx, export_torchscript
    _positive(steps=a.steps)
    bundle = load_bundle(a.model)
    if a.format == "torchscript":
        path = export_torchscript(bundle, a.output, sampler=a.sampler, steps=a.steps, force=a.force, progress=True)
    else:
        path = export_onnx(bundle, a.output, sampler=a.sampler, steps=a.steps, flavour=a.flavour,
                           par04_energy_scale=a.par04_energy_scale, force=a.force, progress=True)
    print(f"wrote {path}" + ("" if a.format == "torchscript" else f" and {Path(path).with_suffix('.json')}"))
    return 0


def cmd_study(a: argparse.Namespace) -> int:
    from .study import study
    shard = _shard(a.shard)
    if a.eval_jobs < 0 or not a.deadline >= 0 or a.workers < 1:           # (not >= 0: refuses NaN too)
        raise ValueError(f"--eval-jobs {a.eval_jobs}, --deadline {a.deadline}, --workers {a.workers}: the first two "
                         "must be >= 0 and --workers >= 1")
    only = [x for x in a.only.split(",") if x] if a.only else None
    return study(a.plan, a.output, device=_device(a.device), shard=shard, table_only=a.table_only, fast=a.fast,
                 only=only, events=a.events,
                 eval_jobs=a.eval_jobs, deadline=a.deadline, keep_showers=a.keep_showers, workers=a.workers)


def cmd_demo(a: argparse.Namespace) -> int:
    """GFlash truth -> shipped model through a few-step sampler -> CaloChallenge evaluation -> report."""
    from .checkpoint import load_bundle
    from .data import claim_folder, read_energies
    from .evaluate import evaluate_files
    from .generate import generate_file, nfe_text
    from .geometry import get_geometry
    from .gflash import write_gflash
    _positive(steps=a.steps)
    _showers(a.n)
    _seed(a.seed)
    bundle = load_bundle(a.model, device=_device(a.device))      # a bad model is refused before any work
    out = Path(a.output)
    claim_folder(out)
    truth = out / "ds2_gflash_truth.h5"           # its writer makes the folder: a refused truth leaves none
    if not truth.exists():
        write_gflash(truth, get_geometry("ds2"), a.n, "log-uniform:1GeV:1TeV", a.seed, chunk=1000,
                     workers=min(4, os.cpu_count() or 1))
    # The demo owns its folder: a re-run reuses the truth and replaces its own plot and outputs.
    cmd_info(argparse.Namespace(file=truth, geometry="ds2", max_events=None, plot=out / "ds2_gflash_truth.png",
                                force=True))
    energies = read_energies(truth)
    generated = out / f"generated_{Path(a.model).stem}.h5"
    stats = generate_file(bundle, generated, energies, seed=a.seed + 1, sampler=a.sampler,
                          steps=a.steps, batch_size=500, force=True, bf16=a.device.startswith("cuda"))
    print(f"generated {stats.n} showers with {Path(a.model).stem}: {stats.sampler} x{stats.steps}, "
          f"{nfe_text(stats.nfe)}, {stats.showers_per_s:.1f} showers/s on {a.device}")
    m = evaluate_files(generated, truth, bundle.geometry, out / "report", fast=a.fast, min_events=min(a.n, 1000),
                       label=f"{Path(a.model).stem} {stats.sampler} x{stats.steps}", force=True)
    for key in ("classifier_low", "classifier_high"):
        print(f"{key}: AUC {m[key]['auc']:.3f}" + ("  (fast classifier)" if a.fast else ""))
    print(f"FPD x 1e3 {m['fpd']['x1e3']:.1f} +- {m['fpd']['error'] * 1e3:.1f};  E_tot/E_inc generated "
          f"{m['response']['generated']['mean']:.4f}, truth {m['response']['reference']['mean']:.4f}")
    print(f"report: {m['report']}")
    return 0


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .cli_parser import build_parser as parser
    return parser({"gflash": cmd_gflash, "info": cmd_info, "train": cmd_train, "generate": cmd_generate,
                   "distill": cmd_distill, "evaluate": cmd_evaluate, "bench": cmd_bench,
                   "export": cmd_export, "merge": cmd_merge, "study": cmd_study, "demo": cmd_demo,
                   "set-sampler": cmd_set_sampler, "prune": cmd_prune})


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every open output is cleaned up the same way."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _unraisable(previous):
    """A sys.unraisablehook that does not lose an interrupt: Python ignores an exception raised where it cannot
    propagate (a weakref callback, a __del__ during garbage collection), so a Ctrl-C or SIGTERM whose handler ran
    there would be swallowed and the work would go on. The signal is sent again a moment later, from a thread, so
    that it lands in ordinary code (sent from here it would be handled, and ignored, inside this hook)."""
    def hook(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            sig = signal.SIGTERM if issubclass(unraisable.exc_type, Terminated) else signal.SIGINT
            again = threading.Timer(0.05, os.kill, (os.getpid(), sig))
            again.daemon = True
            again.start()
        else:
            previous(unraisable)
    return hook


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    old_hook, sys.unraisablehook = sys.unraisablehook, _unraisable(sys.unraisablehook)
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError) as err:
        if os.environ.get("CALOFAST_DEBUG"):
            raise
        msg = (str(err).strip("'\"") if isinstance(err, KeyError) else str(err)) or type(err).__name__   # KeyError quotes
        print(f"calofast: error: {msg}", file=sys.stderr)
        data = sys.modules.get("calofast.data")
        if data is not None and data.hdf5_unusable():   # HDF5's clean-up at exit would crash after a failed write
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt as err:   # Ctrl-C (130) or SIGTERM (143): outputs were removed or left untouched
        term = isinstance(err, Terminated)
        print(f"calofast: interrupted ({'SIGTERM' if term else 'SIGINT'}); no partial output was kept", file=sys.stderr)
        return 143 if term else 130
    finally:
        sys.unraisablehook = old_hook
        if in_main:
            signal.signal(signal.SIGTERM, old)
