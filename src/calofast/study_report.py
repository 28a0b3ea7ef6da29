"""The study's outputs from its row folders: table.csv, table.md, pareto.png, index.html (see study.py)."""
from __future__ import annotations

import csv
import html
import io
import json
import os
from pathlib import Path

__all__ = ["collect_rows", "write_outputs", "COLUMNS"]

COLUMNS = ["label", "family", "model", "sampler", "steps", "nfe", "nfe_stages", "auc_low", "auc_high", "fpd_x1e3",
           "fpd_err_x1e3", "kpd_x1e3", "kpd_err_x1e3", "sep_response", "sep_E_layer", "sep_EC_r", "sep_width_r",
           "sep_voxel", "resp_mean", "resp_ref", "clipped", "ms_per_shower", "ms_std", "device", "events", "fast",
           "status", "auc_low_std", "auc_high_std", "auc_seeds"]


def _row(label: str, d: Path) -> dict:
    gen_path, m_path = d / "generation.json", d / "eval" / "metrics.json"
    g = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    r = {"label": label, "family": g.get("family", ""), "model": g.get("model", ""), "sampler": g.get("sampler", ""),
         "steps": g.get("steps", ""), "nfe_stages": json.dumps(g["nfe"]) if "nfe" in g else "",
         "nfe": list(g["nfe"].values())[-1] if g.get("nfe") else 0, "clipped": g.get("clipped", ""),
         "ms_per_shower": g.get("ms_per_shower"), "ms_std": g.get("ms_std"), "device": g.get("device", ""),
         "status": "not evaluated"}
    if not m_path.exists():
        return r
    m = json.loads(m_path.read_text())
    sp = m["separation_power"]
    r.update(status="ok", events=m["events"], fast=m["fast"],
             auc_low=m.get("classifier_low", {}).get("auc"), auc_high=m.get("classifier_high", {}).get("auc"),
             sep_response=sp["response"], sep_E_layer=sp["E_layer"]["mean"], sep_EC_r=sp["EC_r"]["mean"],
             sep_width_r=sp["width_r"]["mean"], sep_voxel=sp.get("voxel_energy"),
             resp_mean=m["response"]["generated"]["mean"], resp_ref=m["response"]["reference"]["mean"])
    for side in ("low", "high"):
        seeds = m.get(f"classifier_{side}", {}).get("auc_seeds")
        if seeds:            # several classifier seeds: the AUC is their mean, its spread beside it
            r.update({f"auc_{side}": seeds["mean"], f"auc_{side}_std": seeds["std"], "auc_seeds": len(seeds["values"])})
    if "fpd" in m:
        r.update(fpd_x1e3=m["fpd"]["x1e3"], fpd_err_x1e3=m["fpd"]["error"] * 1e3,
                 kpd_x1e3=m["kpd"]["x1e3"], kpd_err_x1e3=m["kpd"]["error"] * 1e3)
    return r


def collect_rows(out: "str | Path", labels: list[str]) -> list[dict]:
    """One dict per label, in plan order (rows without results say so in `status`)."""
    return [_row(label, Path(out) / "rows" / label) for label in labels]


def _fmt(v, p: int) -> str:
    return "–" if v is None or v == "" else f"{v:.{p}f}"


def _auc(r: dict, side: str) -> str:
    std = r.get(f"auc_{side}_std")
    return _fmt(r[f"auc_{side}"], 3) + (f" ± {std:.3f}" if std is not None else "")


def _markdown(rows: list[dict]) -> str:
    lines = ["| row | NFE | AUC low | AUC high | FPD×10³ | KPD×10³ | sep E_tot/E_inc | sep E_layer | sep EC_r | "
             "sep width_r | sep voxel E | E_tot/E_inc (ref) | clipped | ms/shower | events |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['status']} |" + " |" * 13)
            continue
        stages = json.loads(r["nfe_stages"]) if r["nfe_stages"] else {}
        nfe = " + ".join(str(v) for v in reversed(stages.values())) or "–"
        fpd = f"{r['fpd_x1e3']:.1f} ± {r['fpd_err_x1e3']:.1f}" if r.get("fpd_x1e3") is not None else "–"
        kpd = f"{r['kpd_x1e3']:.3f} ± {r['kpd_err_x1e3']:.3f}" if r.get("kpd_x1e3") is not None else "–"
        lines.append(f"| {r['label']} | {nfe} | {_auc(r, 'low')} | {_auc(r, 'high')} | {fpd} | {kpd} | "
                     f"{r['sep_response']:.4f} | {r['sep_E_layer']:.4f} | {r['sep_EC_r']:.4f} | {r['sep_width_r']:.4f} | "
                     f"{_fmt(r['sep_voxel'], 4)} | {r['resp_mean']:.4f} ({r['resp_ref']:.4f}) | {r['clipped'] if r['clipped'] != '' else '–'} | "
                     f"{_fmt(r['ms_per_shower'], 4)} | {r['events']:,}{' (fast)' if r['fast'] else ''} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: "str | Path", rows: list[dict], title: str, floor_label: str | None = None) -> list[Path]:
    """table.csv, table.md, pareto.png (if any row has results) and index.html, each written atomically."""
    from .checkpoint import atomic_write_bytes
    from .plots import plot_pareto
    out = Path(out)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / "table.csv", buf.getvalue().encode())
    md = f"# {title}\n\n" + _markdown(rows)
    atomic_write_bytes(out / "table.md", md.encode())
    written = [out / "table.csv", out / "table.md"]
    floor = next((r for r in rows if r["label"] == floor_label and r["status"] == "ok"), None)
    points = [r for r in rows if r["status"] == "ok" and r["label"] != floor_label and r["nfe"]]
    if points:
        tmp = out / f".pareto.{os.getpid()}.tmp.png"
        plot_pareto(points, tmp, floor, title)
        os.replace(tmp, out / "pareto.png")
        written.append(out / "pareto.png")
    links = "".join(f"<tr><td>{html.escape(r['label'])}</td><td>{html.escape(r['status'])}</td><td>"
                    + (f"<a href=\"rows/{html.escape(r['label'])}/eval/report.html\">report</a>"
                       if (out / "rows" / r["label"] / "eval" / "report.html").is_file() else "")
                    + f"</td><td>{_fmt(r.get('auc_low'), 3)}</td><td>{_fmt(r.get('auc_high'), 3)}</td>"
                    f"<td>{_fmt(r.get('fpd_x1e3'), 1)}</td><td>{_fmt(r.get('ms_per_shower'), 4)}</td></tr>" for r in rows)
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>"
            + ("<img src=\"pareto.png\" style=\"max-width:100%\">" if points else "")
            + "<table border=1 cellpadding=4><tr><th>row</th><th>status</th><th>report</th><th>AUC low</th>"
            "<th>AUC high</th><th>FPD×10³</th><th>ms/shower</th></tr>" + links + "</table>"
            "<p>Full table: <a href=\"table.md\">table.md</a>, <a href=\"table.csv\">table.csv</a>.</p>")
    atomic_write_bytes(out / "index.html", page.encode())
    return written + [out / "index.html"]
