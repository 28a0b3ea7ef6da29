"""Study plans (TOML): the reference, defaults and rows of a `calofast study`, checked before any work."""
from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

__all__ = ["Row", "Plan", "load_plan", "select", "FLOOR"]

FLOOR = "gflash-floor"
_ROW_KEYS = {"label", "model", "sampler", "steps", "knobs", "family", "seed", "batch_size", "dtype", "compile",
             "energy_sampler", "cuda_graph", "deep_cache", "tome"}
_NEW_KEYS = ("energy_sampler", "cuda_graph", "deep_cache", "tome")   # left out of a row's identity when unset (older folders)
_TOP_KEYS = {"name", "geometry", "reference", "defaults", "rows", "chunk", "timing_repeats", "classifier_seeds"}
_REF_KEYS = {"file", "gflash_seed", "energies", "n", "floor_seed"}


@dataclass(frozen=True)
class Row:
    label: str
    model: str
    sampler: str | None = None
    steps: int | None = None
    knobs: dict = field(default_factory=dict)
    family: str = ""
    seed: int = 1
    batch_size: int = 10_000
    dtype: str = "auto"          # bf16 on CUDA, fp32 on CPU
    compile: bool = False
    energy_sampler: str = ""     # NAME:STEPS for a factorised model's energy stage ("": the bundle's own)
    cuda_graph: bool = False     # generate and time from CUDA graphs (CUDA only)
    deep_cache: str = ""         # KEEP:INTERVAL or KEEP:i,j,... (DeepCache of a transformer main stage)
    tome: float = 0.0            # token-merging ratio of a transformer main stage (0: none)

    def spec(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "family" and not (k in _NEW_KEYS and not v)}


@dataclass(frozen=True)
class Plan:
    path: Path
    name: str
    rows: list[Row]
    n: int                                # events per row (= reference events used)
    geometry: str = ""                    # preset or XML; default: the first row's model's
    ref_file: Path | None = None
    gflash_seed: int = 1001
    energies: str = "log-uniform:1GeV:1TeV"
    floor_seed: int | None = None         # a GFlash-vs-GFlash row with this seed
    chunk: int = 10_000
    timing_repeats: int = 3
    classifier_seeds: int = 1             # each classifier test repeated with this many seeds (mean and spread)


def _fail(path: Path, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def load_plan(path: "str | Path") -> Plan:
    """Read and check a plan; every problem is one line naming the file and the key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise _fail(path, "no such plan file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise _fail(path, f"not a valid TOML plan ({err})") from None
    if bad := set(raw) - _TOP_KEYS:
        raise _fail(path, f"unknown key(s) {', '.join(sorted(bad))} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    ref = raw.get("reference", {})
    if not isinstance(ref, dict) or (bad := set(ref) - _REF_KEYS):
        raise _fail(path, f"[reference]: unknown key(s) {', '.join(sorted(bad)) if isinstance(ref, dict) else ref}")
    if "n" not in ref or not isinstance(ref["n"], int) or ref["n"] < 2:
        raise _fail(path, "[reference] needs n, the number of events (an integer >= 2)")
    defaults = raw.get("defaults", {})
    rows, seen = [], set()
    for k, r in enumerate(raw.get("rows", [])):
        merged = {**defaults, **r}
        where = f"rows[{k}]" + (f" ({merged.get('label')})" if "label" in merged else "")
        if bad := set(merged) - _ROW_KEYS:
            raise _fail(path, f"{where}: unknown key(s) {', '.join(sorted(bad))} (allowed: {', '.join(sorted(_ROW_KEYS))})")
        for key in ("label", "model"):
            if key not in merged:
                raise _fail(path, f"{where}: needs {key}")
        label = str(merged["label"])
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", label) or label == FLOOR:
            raise _fail(path, f"{where}: label {label!r} must be letters, digits, '.', '_', '-' (and not {FLOOR})")
        if label in seen:
            raise _fail(path, f"{where}: label {label!r} is used twice")
        seen.add(label)
        if merged.get("steps") is not None and (not isinstance(merged["steps"], int) or merged["steps"] < 1):
            raise _fail(path, f"{where}: steps must be a positive integer")
        if merged.get("dtype", "auto") not in ("auto", "bf16", "fp32"):
            raise _fail(path, f"{where}: dtype must be auto, bf16 or fp32")
        if not isinstance(merged.get("batch_size", 1), int) or merged.get("batch_size", 1) < 1:
            raise _fail(path, f"{where}: batch_size must be a positive integer")
        if not isinstance(merged.get("knobs", {}), dict):
            raise _fail(path, f"{where}: knobs must be a table, e.g. knobs = {{ eta = 0.5 }}")
        if merged.get("sampler") is not None or merged.get("knobs"):
            from .generate import check_knobs
            try:
                check_knobs(merged.get("sampler") or "dpmpp-2m", merged.get("knobs"))
            except ValueError as err:
                raise _fail(path, f"{where}: {err}") from None
        from .deepcache import parse_deep_cache
        from .generate import parse_stage_sampler
        from .tome import parse_tome
        for key, parse in (("energy_sampler", parse_stage_sampler), ("deep_cache", parse_deep_cache), ("tome", parse_tome)):
            if merged.get(key):
                try:
                    parse(merged[key], key)
                except ValueError as err:
                    raise _fail(path, f"{where}: {err}") from None
        if "tome" in merged:
            merged["tome"] = parse_tome(merged["tome"])        # one spelling of a ratio: one row identity
        rows.append(Row(**merged))
    if not rows:
        raise _fail(path, "no [[rows]]")
    chunk, reps = raw.get("chunk", 10_000), raw.get("timing_repeats", 3)
    if not isinstance(chunk, int) or chunk < 1 or not isinstance(reps, int) or reps < 0:
        raise _fail(path, "chunk must be a positive and timing_repeats a non-negative integer")
    seeds = raw.get("classifier_seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise _fail(path, f"classifier_seeds = {seeds!r}: must be a positive integer")
    ref_file = Path(ref["file"]) if "file" in ref else None
    if ref_file is not None and not ref_file.is_absolute():
        ref_file = path.parent / ref_file
    return Plan(path, str(raw.get("name", path.stem)), rows, ref["n"], str(raw.get("geometry", "")), ref_file,
                int(ref.get("gflash_seed", 1001)), str(ref.get("energies", "log-uniform:1GeV:1TeV")),
                ref.get("floor_seed"), chunk, reps, seeds)


def select(plan: Plan, only: list[str] | None = None, events: int | None = None) -> Plan:
    """The plan restricted to the rows named in `only` (gflash-floor included only if named) and/or run at
    `events` events instead of its n (smoke runs; a study folder keeps one event count)."""
    if only:
        known = {r.label for r in plan.rows} | ({FLOOR} if plan.floor_seed is not None else set())
        if bad := [lb for lb in only if lb not in known]:
            raise ValueError(f"{plan.path}: no row {', '.join(bad)} (rows: {', '.join(sorted(known))})")
        plan = replace(plan, rows=[r for r in plan.rows if r.label in only],
                       floor_seed=plan.floor_seed if FLOOR in only else None)
        if not plan.rows and plan.floor_seed is None:
            raise ValueError(f"{plan.path}: --only selects no row")
    if events is not None:
        if events < 2:
            raise ValueError(f"--events {events}: at least 2")
        plan = replace(plan, n=events)
    return plan
