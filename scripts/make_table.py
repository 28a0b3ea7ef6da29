"""Build the evaluation table and the quality-versus-NFE plot from an evaluation run's results.

    python scripts/make_table.py RESULTS_DIR --out docs/
RESULTS_DIR holds gen/<label>.json, eval/<label>/metrics.json and optionally bench.json (as written by
scripts/device/eval_table.py). Writes evaluation_table.md, evaluation_table.csv, quality_vs_nfe.png
and (if bench.json exists) bench_table.md. Rows listed in eval_table.SAME_AS show the numbers of the
row they are identical to; rows without results are marked "not run".
"""
import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "device"))
from eval_table import ROWS, SAME_AS  # noqa: E402

from calofast.plots import plot_quality_vs_nfe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs"))
    a = ap.parse_args()
    rows = []
    for label, family, *_ in ROWS:
        source = SAME_AS.get(label, label)
        m_path = a.results / "eval" / source / "metrics.json"
        g_path = a.results / "gen" / f"{source}.json"
        if not m_path.exists():
            rows.append({"label": label, "family": family, "status": "not run"})
            continue
        m = json.loads(m_path.read_text())
        g = json.loads(g_path.read_text()) if g_path.exists() else {}
        sp = m["separation_power"]
        rows.append({
            "label": label, "family": family, "status": "ok", "nfe": g.get("nfe", 0),
            "auc_low": m["classifier_low"]["auc"], "auc_high": m["classifier_high"]["auc"],
            "fpd_x1e3": m["fpd"]["x1e3"], "fpd_err_x1e3": m["fpd"]["error"] * 1e3,
            "kpd_x1e3": m["kpd"]["x1e3"], "kpd_err_x1e3": m["kpd"]["error"] * 1e3,
            "sep_response": sp["response"], "sep_E_layer": sp["E_layer"]["mean"], "sep_voxel": sp.get("voxel_energy"),
            "sep_EC_eta": sp["EC_eta"]["mean"], "sep_width_eta": sp["width_eta"]["mean"], "sep_sparsity": sp["sparsity"]["mean"],
            "resp_mean": m["response"]["generated"]["mean"], "resp_ref": m["response"]["reference"]["mean"],
            "ms_per_shower": g.get("ms_per_shower"), "events": m["events"], "device": g.get("device", ""),
            "same_as": source if source != label else ""})
    a.out.mkdir(parents=True, exist_ok=True)
    keys = ["label", "family", "status", "nfe", "auc_low", "auc_high", "fpd_x1e3", "fpd_err_x1e3", "kpd_x1e3",
            "kpd_err_x1e3", "sep_response", "sep_E_layer", "sep_voxel", "sep_EC_eta", "sep_width_eta", "sep_sparsity",
            "resp_mean", "resp_ref", "ms_per_shower", "events", "device", "same_as"]
    with open(a.out / "evaluation_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v, p: "–" if v is None else f"{v:.{p}f}"
    lines = ["| row | NFE | AUC low | AUC high | FPD×10³ | KPD×10³ | sep E_tot/E_inc | sep E_layer | sep voxel E | "
             "sep EC_η | sep width_η | sep sparsity | E_tot/E_inc mean | ms/shower (bs 10k) | events |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | not run | | | | | | | | | | | | | |")
            continue
        name = f"{r['label']} (= {r['same_as']})" if r.get("same_as") else r["label"]
        lines.append(
            f"| {name} | {r['nfe'] or '–'} | {r['auc_low']:.3f} | {r['auc_high']:.3f} | "
            f"{r['fpd_x1e3']:.1f} ± {r['fpd_err_x1e3']:.1f} | {r['kpd_x1e3']:.3f} ± {r['kpd_err_x1e3']:.3f} | "
            f"{r['sep_response']:.4f} | {r['sep_E_layer']:.4f} | {fmt(r['sep_voxel'], 5)} | {r['sep_EC_eta']:.4f} | "
            f"{r['sep_width_eta']:.4f} | {r['sep_sparsity']:.4f} | {r['resp_mean']:.4f} (ref {r['resp_ref']:.4f}) | "
            f"{fmt(r['ms_per_shower'], 4)} | {r['events']:,} |")
    (a.out / "evaluation_table.md").write_text("\n".join(lines) + "\n")
    # The plot shows each generated set once (no duplicates of SAME_AS rows).
    ok = [r for r in rows if r["status"] == "ok" and r["nfe"] and not r.get("same_as")]
    plot_quality_vs_nfe(ok, a.out / "quality_vs_nfe.png", "auc_low")
    plot_quality_vs_nfe(ok, a.out / "quality_vs_nfe_high.png", "auc_high")
    bench = a.results / "bench.json"
    if bench.exists():
        b = json.loads(bench.read_text())
        blines = ["| model / sampler | NFE | batch | dtype | ms per shower (mean ± std) | median | showers/s | repeats | device |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in b:
            blines.append(f"| {r['label']} | {r['nfe']} | {r['batch']} | {r['dtype']} | {r['ms_per_shower']:.5f} ± "
                          f"{r['std']:.5f} | {r['median']:.5f} | {r['showers_per_s']:.0f} | {r['repeats']} | {r['device']} |")
        (a.out / "bench_table.md").write_text("\n".join(blines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
