"""Comparison of runs in the paper's Table I layout, with paired t-tests and ROC overlays.

``fl-covid-report RUN_DIR... --out DIR`` reads ``final_metrics.json`` (and ``config.json``) of every run directory
found under the given paths and writes ``DIR/table.md``, ``DIR/table.csv``, ``DIR/ttests.csv`` (when there is a
test) and one ROC overlay per site, setting and protocol (``DIR/roc_<site>[...].png``). Rows: method x site;
columns: Accuracy, F1, Sensitivity, Precision, AUC as mean +- sample std (ddof=1) over folds and seeds, in
percent. Paired t-tests (``scipy.stats.ttest_rel``) of ours (``fedbn-proto``) against every other method per
site and metric, pairs matched by (fold, seed). The paper's published AUCs stand in their own column, never
mixed with ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

from fl_covid.config import PROTOCOL_TEXT
from fl_covid.metrics import ROC_FPR_GRID
from fl_covid.reporting import CONFIG_JSON, FINAL_METRICS, atomic_write_bytes, save_figure, write_csv

OURS = "fedbn-proto"
TABLE_METRICS = (("accuracy", "Accuracy"), ("f1", "F1"), ("sensitivity", "Sensitivity"),
                 ("precision", "Precision"), ("auc", "AUC"))
OWN_TEST = "own test fold"
# Published AUCs (Wang, Liu, Dou, JBHI 2020; SPEC section 6), in percent, keyed by (method, arch) and site.
# Their protocol: image-level 4-fold CV, 224 px, full-width model, 100 epochs, 3 runs.
PUBLISHED_AUC = {
    ("contrastive", "redesigned"): {"site_a_sarscov2": 96.24, "site_b_covidct": 85.32},
    ("single", "covidnet"): {"site_a_sarscov2": 84.08, "site_b_covidct": 71.09},  # 96.24-12.16, 85.32-14.23
}
PUBLISHED_TEXT = {
    ("contrastive", "redesigned"): "contrastive joint learning (the paper's method)",
    ("single", "covidnet"): "original COVID-Net, each site alone (approx.: 12.16 / 14.23 AUC points below)",
}


class ReportError(ValueError):
    """Runs that cannot be compared; the message names the run directories."""


@dataclasses.dataclass(frozen=True)
class SiteResult:
    """One site of one run: which method/setting it belongs to and its metrics (fractions)."""

    run_dir: Path
    method: str
    arch: str
    label: str
    setting: str
    protocol: str
    fold: int
    seed: int
    site: str
    metrics: dict[str, float]
    roc_tpr: tuple[float, ...] | None
    exclude_label_conflicts: bool | None
    trained_sites: tuple[str, ...]
    folds: int = 4  # K of the run's K-fold split


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every folder holding ``final_metrics.json`` at or below the given paths, sorted, without repeats."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p} does not exist")
        found.update(f.parent.resolve() for f in ([p / FINAL_METRICS] if (p / FINAL_METRICS).is_file()
                                                   else p.rglob(FINAL_METRICS)))
    if not found:
        raise ReportError(f"no {FINAL_METRICS} under {', '.join(map(str, paths))}")
    return sorted(found)


def load_results(run_dir: Path) -> list[SiteResult]:
    """The per-site results of one run directory."""
    final = json.loads((run_dir / FINAL_METRICS).read_text())
    config = json.loads((run_dir / CONFIG_JSON).read_text()) if (run_dir / CONFIG_JSON).is_file() else {}
    for key in ("method", "sites", "protocol", "fold", "seed"):
        if key not in final:
            raise ReportError(f"{run_dir / FINAL_METRICS} has no '{key}' (written by an older version?)")
    arch = config.get("arch", "redesigned")
    method = final["method"]
    label = method if arch == "redesigned" else f"{method} [{arch}]"
    if final["protocol"] == "unseen-site":
        trained = tuple(final.get("trained_sites", ()))
        setting = f"unseen site, BN {final.get('bn')}, trained on {'+'.join(trained)}"
        protocol = final.get("trained_protocol", "")
    else:
        trained = tuple(config.get("sites", final["sites"]))
        setting, protocol = OWN_TEST, final["protocol"]
    roc = final.get("roc_tpr", {})
    return [SiteResult(run_dir, method, arch, label, setting, protocol, int(final["fold"]), int(final["seed"]),
                       site, {k: float(m[k]) for k, _ in TABLE_METRICS},
                       tuple(roc[site]) if site in roc else None, config.get("exclude-label-conflicts"), trained,
                       int(config.get("folds", 4)))
            for site, m in final["sites"].items()]


def mark_partial_training(results: list[SiteResult]) -> list[SiteResult]:
    """Own-test results of runs that trained on fewer sites than the others get their own setting."""
    every = {s for r in results if r.setting == OWN_TEST for s in r.trained_sites}
    return [dataclasses.replace(r, setting=f"{OWN_TEST}, trained on {'+'.join(r.trained_sites)}")
            if r.setting == OWN_TEST and set(r.trained_sites) != every else r for r in results]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def _key(r: SiteResult) -> tuple[str, str, str, str]:
    return (r.setting, r.protocol, r.site, r.label)


def aggregate(results: list[SiteResult]) -> list[dict[str, Any]]:
    """One row per (setting, protocol, site, method): n runs and mean/std of each metric in percent."""
    groups: dict[tuple[str, str, str, str], list[SiteResult]] = {}
    for r in results:
        groups.setdefault(_key(r), []).append(r)
    rows = []
    for (setting, protocol, site, label), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != OWN_TEST, kv[0])):
        row: dict[str, Any] = {"setting": setting, "protocol": protocol, "site": site, "method": label,
                               "n_runs": len(rs)}
        for metric, _ in TABLE_METRICS:
            m, s = mean_std([100 * r.metrics[metric] for r in rs])
            row[f"{metric}_mean"], row[f"{metric}_std"] = m, s
        pub = PUBLISHED_AUC.get((rs[0].method, rs[0].arch), {}).get(site) if setting == OWN_TEST else None
        row["published_auc"] = pub if pub is not None else ""
        rows.append(row)
    return rows


def corrected_ttest(diffs: np.ndarray, test_train_ratio: float) -> tuple[float, float]:
    """Nadeau & Bengio's corrected resampled t-test (Machine Learning 52, 2003) of paired differences from J
    resampled train/test splits: t = mean / sqrt((1/J + n_test/n_train) * var), J - 1 degrees of freedom.
    Splits of repeated K-fold cross-validation share training data, so the plain paired t-test (1/J alone)
    understates the variance. Returns (t, two-sided p); NaN with fewer than 2 pairs or zero variance."""
    j = len(diffs)
    if j < 2 or np.ptp(diffs) == 0:
        return float("nan"), float("nan")
    t = float(np.mean(diffs) / np.sqrt((1 / j + test_train_ratio) * np.var(diffs, ddof=1)))
    return t, float(2 * stats.t.sf(abs(t), j - 1))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN and is not counted)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def paired_tests(results: list[SiteResult], ours: str = OURS) -> list[dict[str, Any]]:
    """Ours against each other method per setting, protocol, site and metric, paired by (fold, seed): the mean
    difference (ours minus other, percentage points), the plain paired t-test (``p_plain``), Nadeau & Bengio's
    corrected t-test (``t``, ``p``; test/train ratio 1/(K-1) of K-fold), and ``p_holm``: ``p`` adjusted by Holm
    over every test of the report. t and p are NaN with fewer than 2 pairs or when every difference is equal."""
    by: dict[tuple[str, str, str, str], dict[tuple[int, int], SiteResult]] = {}
    for r in results:
        by.setdefault(_key(r), {})[(r.fold, r.seed)] = r
    out = []
    for (setting, protocol, site, label), mine in sorted(by.items()):
        if label != ours:
            continue
        for (s2, p2, site2, other), theirs in sorted(by.items()):
            if (s2, p2, site2) != (setting, protocol, site) or other == ours:
                continue
            pairs = sorted(set(mine) & set(theirs))
            folds = max((mine[p].folds for p in pairs), default=2)
            for metric, _ in TABLE_METRICS:
                d = np.array([100 * (mine[p].metrics[metric] - theirs[p].metrics[metric]) for p in pairs])
                t, p = corrected_ttest(d, 1 / max(folds - 1, 1))
                plain = float(stats.ttest_1samp(d, 0.0).pvalue) if len(d) >= 2 and np.ptp(d) > 0 else float("nan")
                out.append({"setting": setting, "protocol": protocol, "site": site, "metric": metric,
                            "ours": ours, "other": other, "n_pairs": len(pairs),
                            "mean_diff": float(np.mean(d)) if pairs else float("nan"), "t": t, "p": p,
                            "p_plain": plain})
    for test, adjusted in zip(out, holm([t["p"] for t in out])):
        test["p_holm"] = adjusted
    return out


def check_unique(results: list[SiteResult]) -> None:
    """Each (setting, protocol, site, method, fold, seed) once: a repeat would make the pairing ambiguous."""
    seen: dict[tuple, Path] = {}
    for r in results:
        k = (*_key(r), r.fold, r.seed)
        if k in seen:
            raise ReportError(f"{r.label} fold {r.fold} seed {r.seed} on {r.site} ({r.setting}, {r.protocol}) "
                              "appears twice: "
                              f"{seen[k]} and {r.run_dir}; pass only one of them")
        seen[k] = r.run_dir


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}" if np.isfinite(std) else f"{mean:.2f}"


def _fmt_p(p: float) -> str:
    return "n/a" if not np.isfinite(p) else (f"{p:.2e}" if p < 1e-3 else f"{p:.3f}")


def markdown(results: list[SiteResult], rows: list[dict[str, Any]], tests: list[dict[str, Any]]) -> str:
    """The report as Markdown: protocol statement, Table I, published anchors and t-tests."""
    protocols = sorted({r.protocol for r in results})
    excl = {r.exclude_label_conflicts for r in results}
    lines = ["# Comparison (Table I layout)", ""]
    lines += [f"- Protocol: {', '.join(f'`{p}` = {PROTOCOL_TEXT.get(p, p)}' for p in protocols)}."]
    if excl == {True}:
        lines.append("- Label conflicts: the 4 Site B images whose near-duplicate has the other label are excluded "
                     "(`exclude-label-conflicts: true`, the default).")
    elif excl == {False}:
        lines.append("- Label conflicts: the 4 Site B label-conflict images are **included** "
                     "(`exclude-label-conflicts: false`).")
    else:
        lines.append("- Label conflicts: runs differ in `exclude-label-conflicts` (see each run's config.json).")
    lines += [f"- {len({r.run_dir for r in results})} result directories; mean ± sample std (ddof=1) over folds and "
              "seeds, in percent; n = runs per row.",
              "- Published: AUC from the paper (Wang, Liu, Dou, JBHI 2020) at its own protocol (image-level 4-fold, "
              "224 px, full model, 100 epochs); not measured here and not comparable to ours unless the protocol "
              "and settings match.", ""]
    header = ["Setting", "Protocol", "Site", "Method", "n", *[name for _, name in TABLE_METRICS],
              "AUC, published (paper)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["setting"], row["protocol"], row["site"], row["method"], str(row["n_runs"]),
                 *[_fmt(row[f"{m}_mean"], row[f"{m}_std"]) for m, _ in TABLE_METRICS],
                 f"{row['published_auc']:.2f}" if row["published_auc"] != "" else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Published anchors (paper, not ours)", "", "| Method | Site | AUC, published |", "|---|---|---|"]
    for key, per_site in PUBLISHED_AUC.items():
        for site, auc in per_site.items():
            lines.append(f"| {PUBLISHED_TEXT[key]} | {site} | {auc:.2f} |")
    lines += ["", f"## Paired t-tests: {OURS} (ours) vs each method", "",
              "Runs paired by (fold, seed); difference = ours - other in percentage points. t and p: Nadeau & Bengio's "
              "corrected resampled t-test (variance scaled by 1/J + 1/(K-1): K-fold splits share training data); "
              "p Holm: p adjusted by Holm over every test of this report; p plain: the uncorrected paired t-test, "
              "for reference. n/a: fewer than 2 pairs or identical differences.", ""]
    if tests:
        lines += ["| Setting | Protocol | Site | Metric | Other | pairs | mean diff | t | p | p Holm | p plain |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in tests:
            lines.append(f"| {t['setting']} | {t['protocol']} | {t['site']} | {t['metric']} | {t['other']} | "
                         f"{t['n_pairs']} | {t['mean_diff']:+.2f} | {t['t']:.3f} | {_fmt_p(t['p'])} | "
                         f"{_fmt_p(t['p_holm'])} | {_fmt_p(t['p_plain'])} |")
    else:
        lines.append(f"No t-tests: no `{OURS}` runs, or no other method in the same setting.")
    return "\n".join(lines) + "\n"


def plot_roc_overlays(results: list[SiteResult], out: Path) -> list[Path]:
    """Per site, setting and protocol: the mean ROC (TPR on the fixed FPR grid) of each method, +- std shaded."""
    groups: dict[tuple[str, str, str], dict[str, list[tuple[float, ...]]]] = {}
    for r in results:
        if r.roc_tpr is not None:
            groups.setdefault((r.setting, r.protocol, r.site), {}).setdefault(r.label, []).append(r.roc_tpr)
    several_protocols = len({r.protocol for r in results}) > 1
    files = []
    for (setting, protocol, site), curves in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(5, 5))
        for label, tprs in sorted(curves.items()):
            a = np.asarray(tprs)
            if a.shape[1] != len(ROC_FPR_GRID):
                raise ReportError(f"ROC of {label} on {site} has {a.shape[1]} points, expected {len(ROC_FPR_GRID)}")
            m = a.mean(0)
            ax.plot(ROC_FPR_GRID, m, label=f"{label} (n={len(a)})")
            if len(a) > 1:
                s = a.std(0, ddof=1)
                ax.fill_between(ROC_FPR_GRID, np.clip(m - s, 0, 1), np.clip(m + s, 0, 1), alpha=0.15)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="False positive rate", ylabel="True positive rate (sensitivity)",
               title=f"{site}\n{setting} ({protocol})")
        ax.title.set_fontsize(8)
        ax.legend(loc="lower right", fontsize=7)
        name = "_".join([f"roc_{site}", *([protocol] if several_protocols else []),
                         *([] if setting == OWN_TEST else [re.sub(r"[^A-Za-z0-9]+", "-", setting).strip("-")])])
        save_figure(fig, out / f"{name}.png")
        files.append(out / f"{name}.png")
    return files


def write_report(paths: Iterable[str | Path], out: str | Path) -> list[Path]:
    """Everything of ``fl-covid-report``; returns the files written."""
    out = Path(out)
    results = mark_partial_training([r for d in find_run_dirs(paths) for r in load_results(d)])
    check_unique(results)
    rows, tests = aggregate(results), paired_tests(results)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "table.md", markdown(results, rows, tests).encode())
    write_csv(out / "table.csv", rows)
    files = [out / "table.md", out / "table.csv"]
    if tests:
        write_csv(out / "ttests.csv", tests)
        files.append(out / "ttests.csv")
    return [*files, *plot_roc_overlays(results, out)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-covid-report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories, or folders searched for them")
    parser.add_argument("--out", required=True, help="folder for table.md, table.csv, ttests.csv, roc_*.png")
    args = parser.parse_args(argv)
    try:
        files = write_report(args.runs, args.out)
    except (ReportError, json.JSONDecodeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "table.md").read_text().strip())
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
