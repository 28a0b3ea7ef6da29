"""CPU pilot of distribution matching for the shortcut student, on the tests' tiny factorised model (minutes).

A tiny teacher is trained on toy showers; students of it are trained with the shortcut loss (teacher-ODE targets
at 0.25) and with the distribution-matching term added at several weights, all from the same data, seed and
budget. Each student's 1- and 2-jump shape codes are compared with the teacher's own 64-step Euler ODE codes (fresh
noise, the same conditions) by a classifier AUC (gradient-boosted trees on code + condition, 50/50 split, seed 0:
0.5 = indistinguishable) and by the mean squared error of the per-entry means and stds. A tiny model decides
nothing about DS2; the pilot says whether the term trains and which weights are sane.

    PYTHONPATH=src python scripts/dmd_pilot.py --weights 0,0.3,1,3 --showers 8000 -o pilot
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import tiny_data, tiny_xml  # noqa: E402

from calofast.checkpoint import load_bundle  # noqa: E402
from calofast.config import apply_overrides, get_preset  # noqa: E402
from calofast.distill import distill_shortcut, distill_sigma_range  # noqa: E402
from calofast.interval import uniform_grid  # noqa: E402
from calofast.samplers import euler  # noqa: E402
from calofast.train import load_training_data, train_model  # noqa: E402


def auc(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    x, y = np.concatenate([a, b]), np.r_[np.zeros(len(a)), np.ones(len(b))]
    idx = np.random.default_rng(0).permutation(len(x))
    tr, te = idx[: len(x) // 2], idx[len(x) // 2:]
    clf = HistGradientBoostingClassifier(max_iter=200, random_state=0).fit(x[tr], y[tr])
    return float(roc_auc_score(y[te], clf.predict_proba(x[te])[:, 1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="0,0.3,1,3")
    ap.add_argument("--showers", type=int, default=8000)
    ap.add_argument("--events", type=int, default=4096)
    ap.add_argument("-o", "--output", type=Path, default=Path("pilot"))
    a = ap.parse_args()
    a.output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = tiny_data(a.output, n=a.events, seed=0)
    cfg = apply_overrides(get_preset("tiny-factorised"), [f"geometry={tiny_xml(a.output)}", "train.showers=20000"])
    teacher_path = a.output / "teacher/model.safetensors"
    if not teacher_path.exists():
        train_model(cfg, data, a.output / "teacher")
    b = load_bundle(teacher_path)
    x0, cond = load_training_data(data, b.transform)[-1]
    _, s_max = distill_sigma_range(b, b.config)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        ref = euler(b.denoiser, torch.randn(x0.shape, generator=g), uniform_grid(64, s_max), cond)
    feats = lambda x: torch.cat([x.flatten(1), cond], 1).numpy()
    rows = []
    for w in [float(v) for v in a.weights.split(",")]:
        sets = [f"distill.sc_showers={a.showers}", "distill.sc_max_steps=8", "distill.lr=3e-4", "train.batch_size=64",
                f"train.checkpoint_showers={a.showers}", "distill.sc_teacher_fraction=0.25",
                "distill.sc_teacher_levels=2", "distill.sc_teacher_steps=8", f"distill.dmd_weight={w}"]
        out = distill_shortcut(teacher_path, data, a.output / f"w{w:g}", apply_overrides(b.config, sets))
        st = load_bundle(out)
        row = {"dmd_weight": w}
        for steps in (1, 2):
            grid = uniform_grid(steps, st.sampler["sigma_max"])
            with torch.no_grad():
                x = euler(st.denoiser.on_grid(grid), torch.randn(x0.shape, generator=g), grid, cond)
            row[f"auc_{steps}"] = round(auc(feats(ref), feats(x)), 4)
            row[f"moments_{steps}"] = round(float((x.mean(0) - ref.mean(0)).pow(2).mean()
                                                  + (x.std(0) - ref.std(0)).pow(2).mean()), 5)
        rows.append(row)
        print(json.dumps(row), flush=True)
    with torch.no_grad():
        floor = euler(b.denoiser, torch.randn(x0.shape, generator=g), uniform_grid(64, s_max), cond)
    print(json.dumps({"floor (teacher vs teacher, fresh noise)": round(auc(feats(ref), feats(floor)), 4)}))
    (a.output / "pilot.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
