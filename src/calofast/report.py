"""The self-contained HTML report of one evaluation: every number with what it means and which way is good,
a one-line verdict, an optional baseline column (another evaluation's metrics.json, e.g. GFlash against
GFlash), how the showers were made, and the plots (embedded as base64)."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

__all__ = ["write_report", "verdict", "load_baseline", "report_title"]

# What each number means, shown beside it.
MEANING = {
    "classifier_low": "A DNN trained to tell generated from reference showers, from every voxel (E_v / E_inc) and "
                      "log10 E_inc; AUC on held-out events after isotonic calibration. 0.5: indistinguishable; "
                      "1: always told apart. JSD = (ln 2 - BCE) / ln 2 of the calibrated classifier: 0 "
                      "indistinguishable, 1 separable; the uncalibrated AUC is the raw network output's.",
    "classifier_high": "The same test on the CaloChallenge high-level features (layer energies, centres of energy "
                       "and widths per layer). 0.5: indistinguishable; 1: always told apart.",
    "by_energy": "The same classifier's AUC on the held-out events of each incident-energy decade: where the "
                 "difference is.",
    "fpd": "Frechet physics distance on the high-level features (Gaussian fits compared), extrapolated to "
           "infinite samples. Lower is better; two samples of the same distribution give about 0 plus a small "
           "finite-sample rest.",
    "kpd": "Kernel physics distance (polynomial-kernel MMD) on the same features. Lower is better; 0 within its "
           "error means no difference seen.",
    "separation": "Separation power 1/2 sum (p - q)^2 / (p + q) of the two normalised histograms (official "
                  "binnings): 0 identical, 1 disjoint; per-layer features are averaged over layers.",
    "response": "Total deposited energy over incident energy: its mean and spread should match the reference's.",
    "clipped": "Generated showers that were non-finite or held more than 2 x E_inc and had to be clipped (should "
               "be 0).",
}


def verdict(metrics: dict) -> str:
    """One sentence from the worse of the two classifier AUCs (thresholds are a reading aid, not a standard)."""
    aucs = [metrics[k]["auc"] for k in ("classifier_low", "classifier_high") if k in metrics]
    if not aucs:
        return "No classifier test was run: compare the separation powers and distances below."
    worst = max(aucs)
    for limit, text in ((0.55, "the classifiers can hardly tell these showers from the reference"),
                        (0.65, "a classifier tells them apart, but only weakly"),
                        (0.85, "a classifier tells them apart clearly"),
                        (1.01, "a classifier tells them apart easily")):
        if worst < limit:
            return f"Verdict: {text} (worst AUC {worst:.3f}; 0.5 would be indistinguishable)."
    return ""


def report_title(m: dict) -> str:
    """The label given, else the model, sampler and steps the generated file records, else its name."""
    g = m.get("generation", {})
    return m["label"] or (f"{g['model']}, {g.get('sampler', '?')} {g.get('steps', '?')} steps" if g.get("model")
                          else Path(m["generated"]).stem)


def load_baseline(path: "str | Path") -> dict:
    """Another evaluation's metrics.json, checked to be one (the file is named in any error)."""
    path = Path(path)
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--baseline {path}: not a readable metrics.json ({err})") from None
    if not isinstance(m, dict) or not isinstance(m.get("separation_power"), dict):
        raise ValueError(f"--baseline {path}: not a calofast metrics.json (no separation_power)")
    return m


def _fmt_classifier(c: dict) -> str:
    return f"{c['auc']:.4f} (JSD {c['jsd']:.4f}; uncalibrated AUC {c['auc_uncalibrated']:.4f})"


def _rows(m: dict) -> list[tuple[str, str, str, object]]:
    """(name, meaning key, formatted value, getter for the same number in another metrics dict)."""
    rows = []
    for key, name in (("classifier_low", "classifier AUC, low-level (voxels)"), ("classifier_high", "classifier AUC, high-level")):
        if key in m:
            rows.append((name, key, _fmt_classifier(m[key]), lambda b, key=key: _fmt_classifier(b[key])))
            if m[key].get("auc_by_energy"):
                rows.append((f"{name}, by incident energy", "by_energy",
                             "; ".join(f"{k}: {v['auc']:.4f}" for k, v in m[key]["auc_by_energy"].items()),
                             lambda b, key=key: "; ".join(f"{k}: {v['auc']:.4f}" for k, v in b[key]["auc_by_energy"].items())))
    for key in ("fpd", "kpd"):
        if key in m:
            fmt = lambda d, key=key: f"{d[key]['x1e3']:.3f} &plusmn; {d[key]['error'] * 1e3:.3f}"
            rows.append((f"{key.upper()} x 10^3", key, fmt(m), fmt))
    sp = m["separation_power"]
    rows.append(("separation power E_tot/E_inc", "separation", f"{sp['response']:.5f}",
                 lambda b: f"{b['separation_power']['response']:.5f}"))
    for k, v in sp.items():
        if isinstance(v, dict):
            rows.append((f"separation power {k} (mean over layers)", "separation", f"{v['mean']:.5f}",
                         lambda b, k=k: f"{b['separation_power'][k]['mean']:.5f}"))
    if "voxel_energy" in sp:
        rows.append(("separation power voxel energy", "separation", f"{sp['voxel_energy']:.5f}",
                     lambda b: f"{b['separation_power']['voxel_energy']:.5f}"))
    resp = lambda d: (f"generated {d['response']['generated']['mean']:.4f} ({d['response']['generated']['std']:.4f}); "
                      f"reference {d['response']['reference']['mean']:.4f} ({d['response']['reference']['std']:.4f})")
    rows.append(("E_tot/E_inc mean (rms)", "response", resp(m), resp))
    if "clipped_showers" in m.get("generation", {}):
        rows.append(("clipped showers (generation)", "clipped", str(m["generation"]["clipped_showers"]),
                     lambda b: str(b["generation"]["clipped_showers"])))
    return rows


def _provenance(m: dict) -> str:
    g = m.get("generation", {})
    if not g:
        return "The generated file carries no calofast generation attributes."
    parts = [f"model <code>{html.escape(str(g.get('model', '?')))}</code>",
             f"sampler {html.escape(str(g.get('sampler', '?')))}, {g.get('steps', '?')} steps"]
    if g.get("early_sampler"):
        parts.append(f"earlier stages {html.escape(str(g['early_sampler']))}")
    if g.get("nfe"):
        nfe = g["nfe"] if isinstance(g["nfe"], dict) else json.loads(g["nfe"])
        parts.append("NFE " + ", ".join(f"{k} {v}" for k, v in nfe.items()))
    if "seed" in g:
        parts.append(f"seed {g['seed']}")
    if "ms_per_shower" in g:
        parts.append(f"{float(g['ms_per_shower']):.3g} ms per shower while generating on {html.escape(str(g.get('device', '?')))} "
                     "(not a benchmark: use calofast bench)")
    return "Generated with " + "; ".join(parts) + "."


def _img(path: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" style="max-width:100%">'


PLOT_NOTES = {
    "histograms": "Each panel: normalised distributions of one feature (black reference, red generated), log "
                  "scale; below it the ratio generated / reference, drawn between 0.5 and 1.5 (bins outside are "
                  "cut off).",
    "response": "Mean and rms of E_tot / E_inc in bins of the incident energy.",
    "mean_showers": "The average shower per incident-energy range, summed over angle: energy per (layer, radial "
                    "bin); the ratio map's colours saturate at 0.5 and 1.5.",
}


def write_report(metrics: dict, out_dir: Path, baseline: dict | None = None) -> Path:
    """report.html in out_dir: one self-contained page."""
    from .checkpoint import atomic_write_bytes
    m = metrics
    base_name = (baseline.get("label") or Path(str(baseline.get("generated", "baseline"))).name) if baseline else ""
    head = "<tr><th>metric</th><th>value</th>" + (f"<th>baseline: {html.escape(base_name)}</th>" if baseline else "") \
        + "<th>what it means</th></tr>"
    body, explained = [], set()
    for name, key, value, getter in _rows(m):
        cells = [html.escape(name), value]
        if baseline is not None:
            try:
                cells.append(getter(baseline))
            except (KeyError, TypeError, ValueError):
                cells.append("&ndash;")
        cells.append("" if key in explained else html.escape(MEANING[key]))      # each meaning once
        explained.add(key)
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    imgs = "\n".join(f"<h2>{html.escape(k.replace('_', ' '))}</h2><p>{html.escape(PLOT_NOTES.get(k, ''))}</p>"
                     f"{_img(out_dir / v)}" for k, v in m.get("plots", {}).items())
    imgs += "".join(f"<p>plot <b>{html.escape(k)}</b> skipped: {html.escape(e)}</p>" for k, e in m.get("plot_errors", {}).items())
    note = ("<p><b>Fast mode</b>: the classifiers are 256 wide and train 10 epochs (the protocol: 2048 wide, 50 "
            "epochs), and FPD/KPD use fewer draws; the numbers are for smoke runs only and not comparable to "
            "published ones.</p>" if m.get("fast") else "")
    small = (f"<p>With {m['events']:,} events per file{' and the fast classifier' if m.get('fast') else ''}, the "
             "classifiers see only large differences: the protocol uses 50,000 or more.</p>"
             if m.get("fast") or m["events"] < 50_000 else "")
    title = report_title(m)
    page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>calofast evaluation {html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;font-size:16px}}
td,th{{padding:4px 10px;border-bottom:1px solid #ddd;vertical-align:top;text-align:left}}
td:last-child{{color:#555;font-size:14px}} .verdict{{font-size:18px;font-weight:bold}}</style>
</head><body><h1>calofast evaluation: {html.escape(title)}</h1>
<p class="verdict">{html.escape(verdict(m))}</p>{small}
<p>generated: <code>{html.escape(m['generated'])}</code><br>reference: <code>{html.escape(m['reference'])}</code><br>
geometry {html.escape(m['geometry'])}, {m['events']} events per file; definitions of {html.escape(m['protocol'])};
calofast {html.escape(m['calofast_version'])}, {html.escape(m['created'])}</p>
<p>{_provenance(m)}</p>{note}
<table>{head}{''.join(body)}</table>{imgs}</body></html>"""
    path = out_dir / "report.html"
    atomic_write_bytes(path, page.encode())
    return path
