"""Comparison of runs in the paper's Table I layout, with paired t-tests, the paper's claims and ROC overlays.

``fl-covid-report RUN_DIR... --out DIR [--planned N]`` reads ``final_metrics.json`` (and ``config.json``) of every
run directory found under the given paths and writes ``DIR/table.md``, ``DIR/table.csv``, ``DIR/claims.csv``,
``DIR/ttests.csv`` (when there is a test) and one ROC overlay per site, setting and protocol
(``DIR/roc_<site>[...].png``). Rows: method x site; columns: n runs (of N planned), Accuracy, F1, Sensitivity,
Precision, AUC as mean +- sample std (ddof=1) over folds and seeds, in percent, parameters and seconds per
fold-run. Corrected paired t-tests of ours (``fedbn-proto``) and of the paper's method (``contrastive``) against
every other method per site and metric, pairs matched by (fold, seed), and the paper's claims checked on them.
The paper's published AUCs stand in their own column, never mixed with ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
import torch
from scipy import stats

from fl_covid.cli import run_command
from fl_covid.config import Config
from fl_covid.methods import METHODS
from fl_covid.metrics import ROC_FPR_GRID
from fl_covid.model import bn_keys, build_model, local_keys
from fl_covid.reporting import (
    CONFIG_JSON,
    FINAL_METRICS,
    PROTOCOL_FILE,
    PROTOCOL_TEXT,
    atomic_write_bytes,
    save_figure,
    write_csv,
)

OURS = "fedbn-proto"
REFERENCES = (OURS, "contrastive")  # the methods every other row is tested against
# The paper's claims, each as (claim, the method with the higher AUC, the one with the lower)
CLAIMS = (("Joint below Single", "single", "joint"),
          ("Parallel adapter above Joint", "parallel-adapter", "joint"),
          ("Contrastive above SepNorm", "contrastive", "sepnorm"),
          ("Ours above FedBN", OURS, "fedbn"),
          ("FedBN above FedAvg", "fedbn", "fedavg"))
TABLE_METRICS = (("accuracy", "Accuracy"), ("f1", "F1"), ("sensitivity", "Sensitivity"),
                 ("precision", "Precision"), ("auc", "AUC"))
OWN_TEST = "own test fold"
FOLD_DIR = re.compile(r"fold\d+-seed\d+")  # a fold-run's folder under fl-covid-protocol --out
DEVELOPMENT_SEED = 0  # its test folds were looked at while settings were chosen; the other seeds confirm
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
    width: float = 0.25
    image_size: int = 64
    wall_seconds: float | None = None  # the fold-run's wall time on the machine that ran it


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


def variant_of(run_dir: Path, default: str) -> str:
    """The ``fl-covid-protocol --out`` folder holding a run directory: the nearest folder above it with
    protocol.json, else ``OUT`` of ``OUT/fold<f>-seed<s>/<run>/``, else ``default``."""
    for folder in run_dir.parents:
        if (folder / PROTOCOL_FILE).is_file():
            return folder.name
    if FOLD_DIR.fullmatch(run_dir.parent.name):
        return run_dir.parent.parent.name
    return default


def load_results(run_dir: Path, by_variant: bool = False) -> list[SiteResult]:
    """The per-site results of one run directory; ``by_variant``: labelled by its protocol folder (``variant_of``)
    instead of its method, so that runs of one method under different settings are rows of their own."""
    final = json.loads((run_dir / FINAL_METRICS).read_text())
    config = json.loads((run_dir / CONFIG_JSON).read_text()) if (run_dir / CONFIG_JSON).is_file() else {}
    for key in ("method", "sites", "protocol", "fold", "seed"):
        if key not in final:
            raise ReportError(f"{run_dir / FINAL_METRICS} has no '{key}' (written by an older version?)")
    arch = config.get("arch", "redesigned")
    method = final["method"]
    if by_variant:
        label = variant_of(run_dir, run_dir.name)
    else:
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
                       int(config.get("folds", 4)), float(config.get("width", 0.25)),
                       int(config.get("image-size", 64)), final.get("wall_seconds"))
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
        for part, members in (("confirmation", [r for r in rs if r.seed != DEVELOPMENT_SEED]),
                              ("development", [r for r in rs if r.seed == DEVELOPMENT_SEED])):
            m, s = mean_std([100 * r.metrics["auc"] for r in members]) if members else (float("nan"), float("nan"))
            row[f"auc_{part}_mean"], row[f"auc_{part}_std"], row[f"n_{part}"] = m, s, len(members)
        pub = PUBLISHED_AUC.get((rs[0].method, rs[0].arch), {}).get(site) if setting == OWN_TEST else None
        row["published_auc"] = pub if pub is not None else ""
        r0, sites = rs[0], len(rs[0].trained_sites)
        row["parameters_width_1"] = system_parameters(r0.method, r0.arch, 1.0, 224, sites)
        row["parameters_as_run"] = system_parameters(r0.method, r0.arch, r0.width, r0.image_size, sites)
        walls = [r.wall_seconds for r in rs if r.wall_seconds is not None]
        row["seconds_per_run"] = round(float(np.median(walls)), 1) if walls else ""
        rows.append(row)
    return rows


@functools.cache
def system_parameters(method: str, arch: str, width: float, image_size: int, num_sites: int) -> int:
    """Parameters a method trains for ``num_sites`` sites: one model per site (single), one pooled model with its
    per-site modules (joint, sepnorm, adapters, MS-Net), or the shared weights once plus each site's own modules
    (federated). Counted on the meta device: nothing is allocated."""
    spec = METHODS[method]
    config = Config(method=method, arch=arch, width=width, image_size=image_size)
    with torch.device("meta"):
        model = build_model(config, num_sites if spec.pooled and spec.per_site_bn else 1)
    params = dict(model.named_parameters())
    if spec.federated:
        local = local_keys(model) - (bn_keys(model) if spec.shares_bn else set())
        per_site = sum(p.numel() for n, p in params.items() if n in local)
        return sum(p.numel() for p in params.values()) + (num_sites - 1) * per_site
    total = sum(p.numel() for p in params.values())
    return total if spec.pooled else num_sites * total


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


def _by_method(results: list[SiteResult]) -> dict[tuple[str, str, str, str], dict[tuple[int, int], SiteResult]]:
    by: dict[tuple[str, str, str, str], dict[tuple[int, int], SiteResult]] = {}
    for r in results:
        by.setdefault(_key(r), {})[(r.fold, r.seed)] = r
    return by


def _paired(mine: dict[tuple[int, int], SiteResult], theirs: dict[tuple[int, int], SiteResult], metric: str
            ) -> dict[str, Any]:
    """Mine minus theirs in percentage points over the shared (fold, seed) pairs: n, mean, corrected t and p
    (test/train ratio 1/(K-1) of K-fold) and the plain paired p."""
    pairs = sorted(set(mine) & set(theirs))
    folds = max((mine[p].folds for p in pairs), default=2)
    d = np.array([100 * (mine[p].metrics[metric] - theirs[p].metrics[metric]) for p in pairs])
    t, p = corrected_ttest(d, 1 / max(folds - 1, 1))
    plain = float(stats.ttest_1samp(d, 0.0).pvalue) if len(d) >= 2 and np.ptp(d) > 0 else float("nan")
    return {"n_pairs": len(pairs), "mean_diff": float(np.mean(d)) if pairs else float("nan"), "t": t, "p": p,
            "p_plain": plain}


def paired_tests(results: list[SiteResult], references: Iterable[str] = REFERENCES) -> list[dict[str, Any]]:
    """Each reference method (ours, ``fedbn-proto``, and the paper's, ``contrastive``) against each other method
    per setting, protocol, site and metric, paired by (fold, seed): the mean difference (reference minus other,
    percentage points), the plain paired t-test (``p_plain``), Nadeau & Bengio's corrected t-test (``t``, ``p``)
    and ``p_holm``: ``p`` adjusted by Holm over every test of the report. A pair of methods is tested once. t and
    p are NaN with fewer than 2 pairs or when every difference is equal."""
    by = _by_method(results)
    out, done = [], set()
    for ours in references:
        for (setting, protocol, site, label), mine in sorted(by.items()):
            if label != ours:
                continue
            for (s2, p2, site2, other), theirs in sorted(by.items()):
                if (s2, p2, site2) != (setting, protocol, site) or other == ours or (other, ours, setting,
                                                                                      protocol, site) in done:
                    continue
                done.add((ours, other, setting, protocol, site))
                for metric, _ in TABLE_METRICS:
                    out.append({"setting": setting, "protocol": protocol, "site": site, "metric": metric,
                                "ours": ours, "other": other, **_paired(mine, theirs, metric)})
    for test, adjusted in zip(out, holm([t["p"] for t in out])):
        test["p_holm"] = adjusted
    return out


def check_claims(results: list[SiteResult]) -> list[dict[str, Any]]:
    """The paper's claims (``CLAIMS``: the better method's AUC above the worse one's) on each site's own test
    fold: the paired AUC difference, the corrected p and the verdict (holds / does not hold: significant at 0.05
    either way; not significant; no data: no shared fold-runs)."""
    by = _by_method(results)
    out = []
    for claim, better, worse in CLAIMS:
        for protocol, site in sorted({(k[1], k[2]) for k in by if k[0] == OWN_TEST}):
            mine, theirs = by.get((OWN_TEST, protocol, site, better), {}), by.get((OWN_TEST, protocol, site, worse), {})
            test = _paired(mine, theirs, "auc")
            if test["n_pairs"] < 2:
                verdict = "no data" if not test["n_pairs"] else "not significant"
            elif np.isfinite(test["p"]) and test["p"] < 0.05:
                verdict = "holds" if test["mean_diff"] > 0 else "does not hold"
            else:
                verdict = "not significant"
            out.append({"claim": claim, "better": better, "worse": worse, "protocol": protocol, "site": site,
                        "n_pairs": test["n_pairs"], "auc_diff": test["mean_diff"], "p": test["p"],
                        "verdict": verdict})
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


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def markdown(results: list[SiteResult], rows: list[dict[str, Any]], tests: list[dict[str, Any]],
             claims: list[dict[str, Any]], planned: int = 0) -> str:
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
              "seeds, in percent; n = runs per row. Seed 0's test folds were looked at while settings were chosen "
              "(development); the other seeds confirm: their AUC stands beside it.",
              "- Published: AUC from the paper (Wang, Liu, Dou, JBHI 2020) at its own protocol (image-level 4-fold, "
              "224 px, full model, 100 epochs); not measured here and not comparable to ours unless the protocol "
              "and settings match.", ""]
    lines += ["- Parameters: what the method trains for its sites (one model per site for Single, the shared weights "
              "once plus each site's own modules for the federated methods), at width 1.0 and 224 px and at the "
              "runs' own width and size; s / run: median wall time of a fold-run on the machine that ran it.", ""]
    header = ["Setting", "Protocol", "Site", "Method", "n" + (f" / {planned}" if planned else ""),
              *[name for _, name in TABLE_METRICS], "AUC, seeds > 0 (confirmation)", "AUC, seed 0 (development)",
              "AUC, published (paper)", "Parameters (1.0, 224 px)",
              "Parameters (as run)", "s / run"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["setting"], row["protocol"], row["site"], row["method"],
                 f"{row['n_runs']}" + (f" / {planned}" if planned else ""),
                 *[_fmt(row[f"{m}_mean"], row[f"{m}_std"]) for m, _ in TABLE_METRICS],
                 *[f"{_fmt(row[f'auc_{part}_mean'], row[f'auc_{part}_std'])} (n={row[f'n_{part}']})"
                   if row[f"n_{part}"] else "" for part in ("confirmation", "development")],
                 f"{row['published_auc']:.2f}" if row["published_auc"] != "" else "",
                 _fmt_params(row["parameters_width_1"]), _fmt_params(row["parameters_as_run"]),
                 f"{row['seconds_per_run']:.0f}" if row["seconds_per_run"] != "" else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## The paper's claims on this protocol (AUC, own test fold)", "",
              "Paired by (fold, seed), corrected t-test as below; holds / does not hold: p < 0.05 in the claimed / "
              "the other direction; not significant otherwise.", "",
              "| Claim | Protocol | Site | pairs | AUC difference | p | Verdict |", "|---|---|---|---|---|---|---|"]
    for c in claims:
        diff = f"{c['auc_diff']:+.2f}" if np.isfinite(c["auc_diff"]) else "n/a"
        lines.append(f"| {c['claim']} ({c['better']} - {c['worse']}) | {c['protocol']} | {c['site']} | "
                     f"{c['n_pairs']} | {diff} | {_fmt_p(c['p'])} | {c['verdict']} |")
    lines += ["", "## Published anchors (paper, not ours)", "", "| Method | Site | AUC, published |", "|---|---|---|"]
    for key, per_site in PUBLISHED_AUC.items():
        for site, auc in per_site.items():
            lines.append(f"| {PUBLISHED_TEXT[key]} | {site} | {auc:.2f} |")
    lines += ["", f"## Paired t-tests: {' and '.join(REFERENCES)} vs each method", "",
              "Runs paired by (fold, seed); difference = reference - other in percentage points. t and p: Nadeau & Bengio's "
              "corrected resampled t-test (variance scaled by 1/J + 1/(K-1): K-fold splits share training data); "
              "p Holm: p adjusted by Holm over every test of this report; p plain: the uncorrected paired t-test, "
              "for reference. n/a: fewer than 2 pairs or identical differences.", ""]
    if tests:
        lines += ["| Setting | Protocol | Site | Metric | Reference | Other | pairs | mean diff | t | p | p Holm | "
                  "p plain |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in tests:
            lines.append(f"| {t['setting']} | {t['protocol']} | {t['site']} | {t['metric']} | {t['ours']} | {t['other']} | "
                         f"{t['n_pairs']} | {t['mean_diff']:+.2f} | {t['t']:.3f} | {_fmt_p(t['p'])} | "
                         f"{_fmt_p(t['p_holm'])} | {_fmt_p(t['p_plain'])} |")
    else:
        lines.append(f"No t-tests: no runs of {', '.join(REFERENCES)}, or no other method in the same setting.")
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


def write_report(paths: Iterable[str | Path], out: str | Path, planned: int = 0, by_variant: bool = False
                 ) -> list[Path]:
    """Everything of ``fl-covid-report``; returns the files written. ``planned``: fold-runs planned per row;
    ``by_variant``: one row per protocol folder (``variant_of``) instead of per method."""
    out = Path(out)
    results = mark_partial_training([r for d in find_run_dirs(paths) for r in load_results(d, by_variant)])
    check_unique(results)
    rows, tests, claims = aggregate(results), paired_tests(results), check_claims(results)
    for row in rows:
        row["n_planned"] = planned or ""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "table.md", markdown(results, rows, tests, claims, planned).encode())
    write_csv(out / "table.csv", rows)
    write_csv(out / "claims.csv", claims)
    files = [out / "table.md", out / "table.csv", out / "claims.csv"]
    if tests:
        write_csv(out / "ttests.csv", tests)
        files.append(out / "ttests.csv")
    return [*files, *plot_roc_overlays(results, out)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-covid-report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories, or folders searched for them")
    parser.add_argument("--out", required=True,
                        help="folder for table.md, table.csv, claims.csv, ttests.csv, roc_*.png")
    parser.add_argument("--planned", type=int, default=0, metavar="N",
                        help="fold-runs planned per row (folds x seeds), shown beside n")
    parser.add_argument("--variants", action="store_true",
                        help="one row per fl-covid-protocol --out folder (named after it) instead of per method: runs "
                             "of one method with different settings side by side")
    args = parser.parse_args(argv)

    def work() -> int:
        files = write_report(args.runs, args.out, args.planned, args.variants)
        print((Path(args.out) / "table.md").read_text().strip())
        print(*files, sep="\n")
        return 0

    return run_command(work, (ReportError, json.JSONDecodeError, KeyError), log=False)


if __name__ == "__main__":
    sys.exit(main())
