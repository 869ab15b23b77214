"""Run directories: resolved config, per-epoch/round metrics (CSV + JSON), final metrics, ROC and curve PNGs.

Everything is written atomically (temporary file, then rename) so a crash never leaves half a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fl_covid.metrics import METRIC_NAMES, OPERATING_POINT_NAMES, ROC_FPR_GRID

FINAL_METRICS = "final_metrics.json"
HISTORY_CSV = "metrics.csv"
HISTORY_JSON = "metrics.json"
CONFIG_JSON = "config.json"
PROTOCOL_FILE = "protocol.json"  # fl-covid-protocol's record of its fold-runs, in its --out folder
PROTOCOL_TEXT = {  # how each split protocol (config key protocol) splits a site, for reports
    "grouped": "stratified K-fold with every patient (Site B) and near-duplicate cluster (Site A) in one part "
               "(StratifiedGroupKFold); validation carved from the training folds the same way",
    "image": "stratified K-fold over single images, as in the paper (near-duplicate slices can leak between parts)",
    "official": "the manifest's train/val/test split (one split; fold is ignored)",
}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    rows = list(rows)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def write_predictions(path: Path, site: Any, indices: Any, probs: Any) -> None:
    """Per-image P(COVID) of a site's images ``indices`` as CSV (path, label, prob_covid); stays at the site."""
    write_csv(path, [{"path": site.paths[i], "label": int(site.labels[i]), "prob_covid": float(p)}
                     for i, p in zip([int(i) for i in indices], probs)])


def new_run_dir(output_dir: Path, method: str, tag: str = "") -> Path:
    """Create ``output_dir/<time>-<method>[-<tag>]-<random>`` and return it."""
    name = "-".join(p for p in (time.strftime("%Y%m%d-%H%M%S"), method, tag, secrets.token_hex(2)) if p)
    run = output_dir / name
    run.mkdir(parents=True, exist_ok=False)
    return run


def final_metrics(method: str, per_site: Mapping[str, Mapping[str, float]], **extra: Any) -> dict[str, Any]:
    """The ``final_metrics.json`` schema: method, per site the test fold's five metrics + specificity and n (at
    threshold 0.5), under ``validation`` the same metrics on each site's validation split (where the per-site
    mapping has them as ``val_<name>``), and under ``operating_point`` each site's threshold chosen on its
    validation split with the test fold's accuracy, f1, sensitivity, precision and specificity at it (where the
    mapping has them as ``op_<name>``: sites whose validation split has both classes)."""
    sites = {s: {k: m[k] for k in (*METRIC_NAMES, "n")} for s, m in per_site.items()}
    validation = {s: {k: m[f"val_{k}"] for k in METRIC_NAMES} for s, m in per_site.items()
                  if all(f"val_{k}" in m for k in METRIC_NAMES)}
    operating = {s: {k: m[f"op_{k}"] for k in OPERATING_POINT_NAMES} for s, m in per_site.items()
                 if all(f"op_{k}" in m for k in OPERATING_POINT_NAMES)}
    return {"method": method, "sites": sites, "validation": validation, "operating_point": operating, **extra}


def summary_lines(final: Mapping[str, Any]) -> list[str]:
    """One line per site of a ``final_metrics`` result: the test fold's AUC and, at threshold 0.5, accuracy, F1,
    sensitivity, specificity and precision; then, for a site with an operating point, its threshold and the
    sensitivity and specificity there."""
    lines = []
    for site, m in final["sites"].items():
        line = (f"{site}: AUC {m['auc']:.4f} accuracy {m['accuracy']:.4f} F1 {m['f1']:.4f} sensitivity "
                f"{m['sensitivity']:.4f} specificity {m['specificity']:.4f} precision {m['precision']:.4f} "
                f"(n={m['n']})")
        if (op := final.get("operating_point", {}).get(site)) is not None:
            line += (f"; at the validation-chosen threshold {op['threshold']:.3f}: sensitivity "
                     f"{op['sensitivity']:.4f} specificity {op['specificity']:.4f}")
        lines.append(line)
    return lines


class RunWriter:
    """Owns one run directory: config, history rows, final metrics and figures."""

    def __init__(self, run_dir: Path, config_json: str) -> None:
        self.dir = run_dir
        self.rows: list[dict[str, Any]] = []
        atomic_write_bytes(run_dir / CONFIG_JSON, config_json.encode())

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one row (an epoch or round of one site) and rewrite metrics.csv/json."""
        self.rows.append(dict(row))
        write_csv(self.dir / HISTORY_CSV, self.rows)
        write_json(self.dir / HISTORY_JSON, self.rows)

    def finish(self, method: str, per_site: Mapping[str, Mapping[str, float]],
               roc_tpr: Mapping[str, list[float]], **extra: Any) -> dict[str, Any]:
        """Write final_metrics.json (with each site's ROC TPR on ROC_FPR_GRID), roc.png and curves.png."""
        result = final_metrics(method, per_site, roc_tpr={s: [float(v) for v in t] for s, t in roc_tpr.items()},
                               **extra)
        write_json(self.dir / FINAL_METRICS, result)
        plot_roc(self.dir / "roc.png", {s: (roc_tpr[s], per_site[s]["auc"]) for s in roc_tpr}, method)
        plot_curves(self.dir / "curves.png", self.rows)
        return result


def plot_roc(path: Path, curves: Mapping[str, tuple[list[float], float]], title: str) -> None:
    """One ROC curve per site from TPR values on the fixed FPR grid."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for site, (tpr, auc) in curves.items():
        ax.plot(ROC_FPR_GRID, tpr, label=f"{site} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="False positive rate", ylabel="True positive rate (sensitivity)", title=title)
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def plot_curves(path: Path, rows: list[dict[str, Any]]) -> None:
    """Training loss and evaluation AUC per site against epoch/round."""
    if not rows:
        return
    step_key = "round" if "round" in rows[0] else "epoch"
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for site in sorted({r["site"] for r in rows}):
        rs = [r for r in rows if r["site"] == site]
        for ax, key in zip(axes, ("loss", "auc")):
            pts = [(r[step_key], r[key]) for r in rs if r.get(key) not in (None, "")]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=site)
    for ax, key in zip(axes, ("training loss", "evaluation AUC")):
        ax.set(xlabel=step_key, ylabel=key)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

