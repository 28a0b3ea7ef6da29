"""The command line's arguments: one subparser per subcommand (the commands themselves are in cli.py)."""
from __future__ import annotations

import argparse
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """An argument error is one line, like every other refusal: `calofast: error: ...`, exit code 2; the usage
    stays one `--help` away. No prefix matching: `--energy 50` is not `--energy-sampler 50`. The subcommands'
    parsers are of this class too (argparse makes them of the parent's)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"calofast: error: {message} (see {self.prog} --help)\n")


def build_parser(handlers: dict) -> argparse.ArgumentParser:
    """The argument parser; `handlers` maps each subcommand to its function (cli.py)."""
    shipped = ", ".join(sorted(f.stem for f in (Path(__file__).parent / "models").glob("*.safetensors")))
    model_help = f"model bundle (.safetensors) or a shipped model's name ({shipped})"
    p = _Parser(prog="calofast", description="Fast calorimeter-shower simulation with "
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
    g.set_defaults(func=handlers["gflash"])

    i = sub.add_parser("info", help="check a CaloChallenge file and print its summary",
                       description="Validate a CaloChallenge HDF5 file and summarise its showers.")
    i.add_argument("file", type=Path, help="a CaloChallenge HDF5 file")
    i.add_argument("--geometry", help="geometry (default: from the voxel count)")
    i.add_argument("--max-events", type=int, help="only the first N showers")
    i.add_argument("--plot", type=Path, help="write a summary plot (PNG) here")
    i.add_argument("--force", action="store_true", help="overwrite an existing plot")
    i.set_defaults(func=handlers["info"])

    t = sub.add_parser("train", help="train a diffusion model (torchrun for several GPUs/processes)",
                       description="Train a denoiser on a CaloChallenge file. Resumes when re-run with the "
                       "same output folder. Multi-GPU: torchrun --nproc-per-node N -m calofast train ...")
    t.add_argument("--data", required=True, help="training file (CaloChallenge HDF5)")
    t.add_argument("--preset", help="named config (tiny, ds2-unet, ds2-factorised, ...; default ds2-unet)")
    t.add_argument("--init", help="continue from this bundle's weights, transform and config (fresh optimiser "
                   "and schedule from its train.* options and --set)")
    t.add_argument("--stages", help="with --init: train only these stages (comma list, e.g. energy), copy the "
                   "others unchanged; a listed stage whose network or diffusion --set changes starts fresh")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=2e-4 (repeatable)")
    t.add_argument("-o", "--output", required=True, help="run folder (config.json, stats.jsonl, model.safetensors)")
    t.set_defaults(func=handlers["train"])

    gen = sub.add_parser("generate", help="sample showers from a model bundle into a CaloChallenge file",
                         description="Generate showers with any sampler. Distilled bundles bring their own "
                         "sampler and steps.")
    gen.add_argument("--model", required=True, help=model_help)
    gen.add_argument("--sampler", help="ddpm, ddim, euler, heun, dpmpp-2m, dpmpp-2m-sde, unipc, consistency "
                     "(default: the bundle's own, else dpmpp-2m)")
    gen.add_argument("--steps", type=int, help="sampler steps (default: the bundle's own, else 20)")
    gen.add_argument("--eta", type=float, help="DDIM eta in [0, 1] (default 0)")
    gen.add_argument("--n", type=int, help="number of showers")
    gen.add_argument("--energies", help="spectrum, e.g. log-uniform:1GeV:1TeV (default: the model's range)")
    gen.add_argument("--energies-from", help="take incident energies event by event from this file")
    gen.add_argument("--seed", type=int, default=0, help="seed; shower k depends only on (seed, k)")
    gen.add_argument("--batch-size", type=int, help="showers per batch (default: 100 on a CPU; on a GPU as many as "
                     "fit a quarter of its memory, at most 10,000)")
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    gen.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="network precision (default fp32)")
    gen.add_argument("--compile", action="store_true", help="torch.compile the network (slow first batch)")
    gen.add_argument("--energy-sampler", metavar="NAME:STEPS",
                     help="sampler of a factorised model's energy stage, e.g. dpmpp-2m:16 (default: the bundle's)")
    gen.add_argument("--cuda-graph", action="store_true",
                     help="replay each batch size from one CUDA graph (GPU; removes per-step overhead at small batches)")
    gen.add_argument("--deep-cache", metavar="KEEP:INTERVAL",
                     help="DeepCache of a transformer stage: reuse the deep blocks' residual, recomputed every INTERVAL "
                     "calls (or KEEP:i,j,... at those calls); the first KEEP blocks always run")
    gen.add_argument("--tome", metavar="RATIO", type=float,
                     help="token merging in every block of a transformer main stage: merge this share of the tokens "
                     "(0-0.5) around attention and MLP (inference only; 0: the plain network)")
    gen.add_argument("--force", action="store_true", help="overwrite the output")
    gen.add_argument("--shard", help="K/N: only events K*n/N .. (K+1)*n/N - 1 (a SLURM array); 'torchrun': one shard "
                     "per rank, written to OUTPUT.partRRRR-of-NNNN.h5; join with calofast merge (bit-identical to one run when "
                     "each shard holds whole batches)")
    gen.add_argument("-o", "--output", required=True, help="the CaloChallenge HDF5 file to write")
    gen.set_defaults(func=handlers["generate"])

    ds = sub.add_parser("distill", help="a few-step student from a teacher (progressive, consistency or shortcut)",
                        description="Progressive distillation down to 1 step, consistency distillation, or a shortcut "
                        "model (one run for every step count, from a flow-matching teacher; generate it with any "
                        "--steps; --set distill.sc_loss=meanflow trains the same network with the MeanFlow loss). "
                        "Resumable; multi-GPU through torchrun like training.")
    ds.add_argument("method", choices=("progressive", "consistency", "shortcut"), help="the distillation method")
    ds.add_argument("--teacher", required=True, help=f"teacher: {model_help}")
    ds.add_argument("--data", required=True, help="training showers (CaloChallenge HDF5)")
    ds.add_argument("--start-steps", type=int, default=128, help="progressive: teacher steps of the first stage")
    ds.add_argument("--to-steps", type=int, default=1, help="progressive: final student steps")
    ds.add_argument("--targets-from", metavar="BUNDLE",
                    help="shortcut: the bundle whose ODE gives the teacher-ODE targets (distill.sc_teacher_fraction "
                    "> 0), e.g. the original teacher when --teacher is a shortcut student trained further; default "
                    "--teacher (a shortcut student's own h = 0 velocity)")
    ds.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override, e.g. distill.showers_per_stage=200000, distill.cm_steps=40, distill.sc_showers=4000000")
    ds.add_argument("-o", "--output", required=True, help="run folder")
    ds.set_defaults(func=handlers["distill"])

    ev = sub.add_parser("evaluate", help="CaloChallenge evaluation of generated vs reference showers",
                        description="Features, separation powers, classifier AUCs, FPD/KPD, plots and report.html.")
    ev.add_argument("--generated", required=True, help="the generated showers (CaloChallenge HDF5, MeV)")
    ev.add_argument("--reference", required=True, help="the truth to compare with (GFlash or Geant4, same format)")
    ev.add_argument("--geometry", help="ds1-photons, ds1-pions, ds2, ds3 or a binning XML (default: the built-in "
                    "geometry with the reference file's voxel count)")
    ev.add_argument("--fast", action="store_true", help="shortened classifier (smoke runs; not comparable)")
    ev.add_argument("--min-events", type=int, help="accept files smaller than the official protocol's size "
                    "(100,000 events for DS2 and DS3, 121,000 / 120,800 for DS1 photons / pions)")
    ev.add_argument("--classifiers", default="low,high", help="which classifier tests (low,high; empty: none)")
    ev.add_argument("--classifier-seeds", type=int, default=1, metavar="N",
                    help="repeat each classifier test with N seeds and record the AUCs' mean and spread (default 1)")
    ev.add_argument("--device", help="classifier device (default: cuda if available)")
    ev.add_argument("--label", help="name in the report (default: the model, sampler and steps the file records)")
    ev.add_argument("--baseline", metavar="METRICS_JSON",
                    help="another evaluation's metrics.json (e.g. GFlash against GFlash) shown beside these numbers")
    ev.add_argument("--force", action="store_true", help="replace an evaluation already in the report folder")
    ev.add_argument("-o", "--output", required=True, help="report folder")
    ev.set_defaults(func=handlers["evaluate"])

    be = sub.add_parser("bench", help="time per shower (CaloChallenge timing protocol)",
                        description="Warm-up, then repeated timed batches; CUDA synchronised; mean, std, median.")
    be.add_argument("--model", required=True, help=model_help)
    be.add_argument("--sampler", help="sampler name, as for generate (default: the bundle's own)")
    be.add_argument("--steps", type=int, help="sampler steps (default: the bundle's own)")
    be.add_argument("--batch-sizes", default="1,100,10000", help="comma-separated batch sizes (default 1,100,10000)")
    be.add_argument("--repeats", type=int, default=10, help="timed repeats per batch size, after one warm-up (default 10)")
    be.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    be.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="network precision (default fp32)")
    be.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    be.add_argument("--compile", action="store_true", help="torch.compile the network (compiled in the warm-up)")
    be.add_argument("--energy-sampler", metavar="NAME:STEPS", help="sampler of a factorised model's energy stage")
    be.add_argument("--cuda-graph", action="store_true", help="time the pipeline replayed from a CUDA graph (GPU)")
    be.add_argument("--deep-cache", metavar="KEEP:INTERVAL", help="DeepCache of a transformer stage (see generate)")
    be.add_argument("--tome", metavar="RATIO", type=float, help="token merging of a transformer main stage (see generate)")
    be.add_argument("-o", "--output", help="write the table (.csv or .json)")
    be.add_argument("--force", action="store_true", help="overwrite the table")
    be.set_defaults(func=handlers["bench"])

    ex = sub.add_parser("export", help="export a bundle + few-step sampler to ONNX (Geant4 Par04) or TorchScript",
                        description="One ONNX file (opset 17) with preprocessing, the unrolled sampler and the "
                        "inverse transform. Distilled bundles bring their own sampler and steps.")
    ex.add_argument("--model", required=True, help=model_help)
    ex.add_argument("--sampler", help="euler, ddim, heun, dpmpp-2m or consistency (deterministic only)")
    ex.add_argument("--steps", type=int, help="sampler steps unrolled into the graph (default: the bundle's own)")
    ex.add_argument("--flavour", choices=("par04", "reproducible"), default="reproducible",
                    help="par04: Par04's input [B, 8] (E in GeV, angles, detector) and output in GeV, Par04 cell order, noise "
                    "drawn in the graph; reproducible: energies in MeV and the noise as inputs, output in MeV, "
                    "CaloChallenge order (default reproducible; docs/export.md)")
    ex.add_argument("--format", choices=("onnx", "torchscript"), default="onnx",
                    help="torchscript is a secondary path (reproducible signature)")
    ex.add_argument("--par04-energy-scale", type=float, default=1.0,
                    help="par04 flavour: factor on the output (1 = CaloChallenge scale; 0.033 = silicon only)")
    ex.add_argument("--force", action="store_true", help="overwrite the output (and the ONNX .json sidecar)")
    ex.add_argument("-o", "--output", required=True,
                    help="the .onnx file (a .json sidecar is written beside it), or the .pt file with --format torchscript")
    ex.set_defaults(func=handlers["export"])

    mg = sub.add_parser("merge", help="join the part files of a sharded generate run (validated, atomic)")
    mg.add_argument("parts", nargs="+", type=Path, help="the part files, in any order")
    mg.add_argument("-o", "--output", required=True, type=Path, help="the joined file")
    mg.add_argument("--force", action="store_true", help="overwrite the output")
    mg.set_defaults(func=handlers["merge"])

    st = sub.add_parser("study", help="generate, time and evaluate every row of a plan; one table and plot",
                        description="Run a study plan (TOML: [reference], [defaults], [[rows]]; see studies/): "
                        "each row generated in chunks, timed, evaluated against the reference; writes DIR/table.csv, "
                        "table.md, pareto.png, index.html. Re-run the same command to resume. Exit 3: a deadline "
                        "left rows unfinished.")
    st.add_argument("plan", type=Path, help="the plan (TOML; see docs/study.md and studies/)")
    st.add_argument("-o", "--output", required=True, type=Path, help="study folder (resumed if it exists)")
    st.add_argument("--device", default="cpu", help="cpu or cuda (every visible GPU: one shard each)")
    st.add_argument("--fast", action="store_true", help="small classifier and fewer bootstraps (smoke runs only)")
    st.add_argument("--eval-jobs", type=int, default=0, help="evaluations in this many worker processes "
                    "while the next row generates (default 0: in turn)")
    st.add_argument("--deadline", type=float, default=0, help="stop starting work after this many seconds")
    st.add_argument("--workers", type=int, default=1, help="processes for GFlash reference showers")
    st.add_argument("--keep-showers", action="store_true", help="keep each row's showers.h5 after evaluation")
    st.add_argument("--table-only", action="store_true", help="only rewrite the table, plot and index")
    st.add_argument("--only", help="comma-separated row labels to run (gflash-floor included only if named)")
    st.add_argument("--events", type=int, help="events per row instead of the plan's n (smoke runs; new folder)")
    st.add_argument("--shard", help="K/N: run rows K, K+N, ... only (one process per GPU; no table)")
    st.set_defaults(func=handlers["study"])

    ss = sub.add_parser("set-sampler", help="copy a bundle with another default sampler for one stage",
                        description="Write a copy of a bundle whose stage STAGE runs with NAME:STEPS by default "
                        "(e.g. a factorised student's energy stage with dpmpp-2m:16); the weights are unchanged.")
    ss.add_argument("--model", required=True, help=model_help)
    ss.add_argument("--stage", required=True, help="stage name, e.g. energy")
    ss.add_argument("--sampler", required=True, metavar="NAME:STEPS", help="e.g. dpmpp-2m:16")
    ss.add_argument("--force", action="store_true", help="overwrite the output")
    ss.add_argument("-o", "--output", required=True, help="the new bundle (.safetensors)")
    ss.set_defaults(func=handlers["set-sampler"])

    pr = sub.add_parser("prune", help="structural pruning of a transformer main stage (Taylor importance)",
                        description="Cut every block's MLP of the main stage to its most important hidden channels "
                        "(first-order Taylor importance from the stage's denoising loss on DATA, Diff-Pruning) and "
                        "write an ordinary, smaller bundle; fine-tune it with calofast train --init PRUNED.")
    pr.add_argument("--model", required=True, help=model_help)
    pr.add_argument("--data", required=True, help="training showers (CaloChallenge HDF5) for the importance")
    pr.add_argument("--keep", type=float, required=True, help="share of MLP channels kept, in (0, 1], e.g. 0.5")
    pr.add_argument("--batches", type=int, default=32, help="batches of gradients accumulated (default 32)")
    pr.add_argument("--batch-size", type=int, default=256, help="showers per batch (default 256)")
    pr.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    pr.add_argument("--force", action="store_true", help="overwrite the output")
    pr.add_argument("-o", "--output", required=True, help="the pruned bundle (.safetensors)")
    pr.set_defaults(func=handlers["prune"])

    d = sub.add_parser("demo", help="the main job: GFlash truth, shipped model, evaluation report",
                       description="Simulate fresh GFlash DS2 truth, generate the same events with a shipped model "
                       "through a few-step sampler, evaluate them with the CaloChallenge protocol and print the "
                       "path of report.html.")
    d.add_argument("--n", type=int, default=2000, help="showers (default 2000)")
    d.add_argument("--model", default="ds2-shortcut",
                   help="bundle or shipped name (default ds2-shortcut, the 2-jump student, fast on a CPU; "
                        "ds2-factorised is the better model: its default is DPM-Solver++(2M) with 32 steps)")
    d.add_argument("--sampler", help="shape-stage sampler (default: the model's own)")
    d.add_argument("--steps", type=int, help="sampler steps (default: the model's own)")
    d.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    d.add_argument("--full", dest="fast", action="store_false",
                   help="full classifier protocol (default: the fast one, minutes on a CPU)")
    d.add_argument("--seed", type=int, default=1, help="seed of the GFlash truth; the model samples with seed + 1 (default 1)")
    d.add_argument("-o", "--output", default="demo", help="output folder (default demo/)")
    d.set_defaults(func=handlers["demo"])
    return p
