"""Decisions on validation pooled over folds, and the frontier of the round shape.

``fl-covid-decide RUN_DIR... --out DIR [--seeds 1,2] [--reference VARIANT]`` groups fold-runs into *variants*: the folder that
``fl-covid-protocol --out`` wrote (the parent of ``fold<f>-seed<s>/``), else the run's method. It writes:

- ``validation.md`` / ``validation.csv``: per variant and site, the validation predictions of all its fold-runs
  (``site-<name>/val_predictions.csv``, kept at the site) pooled into one AUC: about 4 x 56 Site B images instead
  of 56 per fold, which a single fold's AUC cannot resolve. Beside it the variant's worst-site pooled AUC and the
  choice of the rule stated in docs/results.md before the runs: **the variant with the highest worst-site pooled
  validation AUC** (a federation is for every hospital, not the larger one's average). Test folds are not read.
- with ``--reference VARIANT`` (a decision's default), ``differences.csv`` and a section of ``validation.md``: per
  other variant and site, its pooled validation AUC minus the reference's on the images both hold (same fold,
  seed and image), with a 95% interval from a paired bootstrap over those images (resampled within each class):
  what the pooled validation can resolve. The rule does not read it.
- ``frontier.md`` / ``frontier.png``: each site's test AUC (mean +- std over fold-runs) of the federated variants
  against local steps per round, one line per method, the centralized variants as horizontal lines, and the
  megabytes of weights each site sends and receives over the run on a second axis. For the final tables only.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fl_covid.checkpoint import VAL_PREDICTIONS_CSV
from fl_covid.cli import run_command
from fl_covid.config import Config
from fl_covid.experiments.report import OWN_TEST, ReportError, find_run_dirs, load_results, mean_std, variant_of
from fl_covid.federated import shared_keys
from fl_covid.methods import METHODS
from fl_covid.model import build_model
from fl_covid.reporting import CONFIG_JSON, atomic_write_bytes, save_figure, write_csv

BYTES_PER_VALUE = {"none": 4, "fp16": 2, "int8": 1}  # int8 adds one float32 scale per 16384 values
BOOTSTRAP_RESAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class FoldRun:
    """One fold-run of a variant: its test AUC per site and where its validation predictions are."""

    variant: str
    method: str
    fold: int
    seed: int
    run_dir: Path
    test_auc: dict[str, float]
    config: dict[str, Any]

    @property
    def federated(self) -> bool:
        return METHODS[self.method].federated

    @property
    def local_steps(self) -> int:
        return int(self.config.get("local-steps", 0))

    @property
    def rounds(self) -> int:
        return int(self.config.get("num-server-rounds", 0))


def load_fold_runs(paths: Iterable[str | Path], seeds: set[int] | None = None) -> list[FoldRun]:
    """Every own-test-fold run under ``paths`` (of ``seeds`` only, when given)."""
    runs = []
    for run_dir in find_run_dirs(paths):
        results = [r for r in load_results(run_dir) if r.setting == OWN_TEST]
        if not results or (seeds is not None and results[0].seed not in seeds):
            continue
        r0 = results[0]
        config = json.loads((run_dir / CONFIG_JSON).read_text()) if (run_dir / CONFIG_JSON).is_file() else {}
        runs.append(FoldRun(variant_of(run_dir, r0.method), r0.method, r0.fold, r0.seed, run_dir,
                            {r.site: r.metrics["auc"] for r in results}, config))
    if not runs:
        raise ReportError(f"no fold-runs{'' if seeds is None else f' of seeds {sorted(seeds)}'} under "
                          f"{', '.join(map(str, paths))}")
    return runs


def read_validation(run_dir: Path, site: str) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(image paths, labels (n,), P(COVID) (n,)) of one site's validation split in one fold-run, None when not
    written."""
    path = run_dir / f"site-{site}" / VAL_PREDICTIONS_CSV
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return ([r["path"] for r in rows], np.array([int(r["label"]) for r in rows], dtype=np.int64),
            np.array([float(r["prob_covid"]) for r in rows], dtype=np.float64))


Validations = dict[tuple[str, str], list[tuple[FoldRun, tuple[list[str], np.ndarray, np.ndarray]]]]


def read_validations(runs: list[FoldRun]) -> Validations:
    """(variant, site) -> the (fold-run, ``read_validation``) of every fold-run that wrote validation predictions."""
    pools: Validations = {}
    for run in runs:
        for site in run.test_auc:
            if (read := read_validation(run.run_dir, site)) is not None:
                pools.setdefault((run.variant, site), []).append((run, read))
    return pools


def pooled_validation(pools: Validations) -> list[dict[str, Any]]:
    """Per variant and site: fold-runs with validation predictions, images pooled, the pooled AUC (percent; NaN
    when the pool holds one class only) and the mean of the per-fold validation AUCs for comparison."""
    rows = []
    for (variant, site), parts in sorted(pools.items()):
        labels, probs = np.concatenate([p[1] for _, p in parts]), np.concatenate([p[2] for _, p in parts])
        per_fold = [100 * roc_auc_score(y, p) for _, (_, y, p) in parts if len(np.unique(y)) == 2]
        rows.append({"variant": variant, "site": site, "fold_runs": len(parts), "images": len(labels),
                     "pooled_val_auc": 100 * roc_auc_score(labels, probs) if len(np.unique(labels)) == 2
                     else float("nan"),
                     "mean_fold_val_auc": float(np.mean(per_fold)) if per_fold else float("nan")})
    return rows


def paired_differences(pools: Validations, reference: str, seed: int = 0) -> list[dict[str, Any]]:
    """Per variant other than ``reference`` and site: the pooled validation AUC difference (variant minus
    reference, percent) on the images both hold, keyed by (fold, seed, image), and its 95% paired bootstrap
    interval (``BOOTSTRAP_RESAMPLES`` resamples, positives and negatives resampled separately)."""
    by_image = {key: {(run.fold, run.seed, path): (int(y), float(p))
                      for run, read in parts for path, y, p in zip(*read)} for key, parts in pools.items()}
    if not any(variant == reference for variant, _ in by_image):
        raise ReportError(f"--reference {reference!r}: no variant of that name with validation predictions among "
                          f"{sorted({v for v, _ in by_image})}")
    rng = np.random.default_rng(seed)
    rows = []
    for (variant, site), pool in sorted(by_image.items()):
        base = by_image.get((reference, site), {})
        keys = sorted(pool.keys() & base.keys())
        if variant == reference or not keys:
            continue
        labels = np.array([base[k][0] for k in keys])
        ours, theirs = np.array([pool[k][1] for k in keys]), np.array([base[k][1] for k in keys])
        if len(np.unique(labels)) < 2:
            continue
        diff = 100 * (roc_auc_score(labels, ours) - roc_auc_score(labels, theirs))
        pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
        resampled = []
        for _ in range(BOOTSTRAP_RESAMPLES):
            i = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
            resampled.append(100 * (roc_auc_score(labels[i], ours[i]) - roc_auc_score(labels[i], theirs[i])))
        low, high = np.percentile(resampled, [2.5, 97.5])
        rows.append({"variant": variant, "reference": reference, "site": site, "images": len(keys),
                     "difference": diff, "ci_low": float(low), "ci_high": float(high)})
    return rows


def choose(rows: list[dict[str, Any]], sites: Iterable[str]) -> list[dict[str, Any]]:
    """Variants ranked by the rule: the worst-site pooled validation AUC, highest first; variants missing a site
    are ranked last (their worst site is unknown)."""
    sites = sorted(set(sites))
    by: dict[str, dict[str, float]] = {}
    for r in rows:
        by.setdefault(r["variant"], {})[r["site"]] = r["pooled_val_auc"]
    ranked = []
    for variant, aucs in by.items():
        complete = all(s in aucs and np.isfinite(aucs[s]) for s in sites)
        worst = min(aucs[s] for s in sites) if complete else float("nan")
        ranked.append({"variant": variant, "worst_site_pooled_val_auc": worst,
                       **{f"pooled_val_auc_{s}": aucs.get(s, float("nan")) for s in sites}})
    return sorted(ranked, key=lambda r: (not np.isfinite(r["worst_site_pooled_val_auc"]),
                                         -np.nan_to_num(r["worst_site_pooled_val_auc"]), r["variant"]))


@functools.cache
def shared_values(method: str, arch: str, width: float) -> int:
    """Values a site sends (and receives) per round: the method's shared weights, counted on the meta device."""
    config = Config(method=method, arch=arch, width=width)
    with torch.device("meta"):
        model = build_model(config)
    state = model.state_dict()
    return sum(state[k].numel() for k in shared_keys(model, config))


def megabytes_per_site(run: FoldRun) -> float:
    """Weights one site receives plus sends over the run (once each way per round), in MB (1e6 bytes)."""
    values = shared_values(run.method, str(run.config.get("arch", "redesigned")), float(run.config.get("width", 0.25)))
    per_value = BYTES_PER_VALUE[str(run.config.get("compression", "none"))]
    return 2 * run.rounds * values * per_value / 1e6


def frontier(runs: list[FoldRun]) -> list[dict[str, Any]]:
    """One row per federated variant and site: method, local steps, rounds, n, test AUC mean / std (percent),
    MB per site; one row per centralized variant and site with its steps as empty."""
    groups: dict[tuple[str, str], list[FoldRun]] = {}
    for run in runs:
        for site in run.test_auc:
            groups.setdefault((run.variant, site), []).append(run)
    rows = []
    for (variant, site), rs in sorted(groups.items()):
        r0 = rs[0]
        mean, std = mean_std([100 * r.test_auc[site] for r in rs])
        rows.append({"variant": variant, "method": r0.method, "site": site, "federated": r0.federated,
                     "local_steps": r0.local_steps if r0.federated else "",
                     "rounds": r0.rounds if r0.federated else "", "n_runs": len(rs), "test_auc_mean": mean,
                     "test_auc_std": std, "mb_per_site": round(megabytes_per_site(r0), 1) if r0.federated else ""})
    return rows


def plot_frontier(rows: list[dict[str, Any]], out: Path) -> Path:
    """Test AUC against local steps per round, one panel per site, one coloured line per federated method, the
    centralized variants as grey horizontal lines; MB per site on the right axis (dashed, the method's colour)."""
    sites = sorted({r["site"] for r in rows})
    fig, axes = plt.subplots(1, len(sites), figsize=(5.5 * len(sites), 5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = (":", "-.", (0, (5, 2)), (0, (1, 3)))
    for ax, site in zip(axes[0], sites):
        mine = [r for r in rows if r["site"] == site]
        bytes_ax = ax.twinx()
        ax.set_zorder(bytes_ax.get_zorder() + 1)  # the AUC lines above the byte counts
        ax.patch.set_visible(False)
        methods = sorted({r["method"] for r in mine if r["federated"]})
        for i, method in enumerate(methods):
            line = sorted((r for r in mine if r["federated"] and r["method"] == method), key=lambda r: r["local_steps"])
            x = [r["local_steps"] for r in line]
            ax.errorbar(x, [r["test_auc_mean"] for r in line], yerr=np.nan_to_num([r["test_auc_std"] for r in line]),
                        marker="o", capsize=3, color=colours[i % len(colours)], label=method)
            bytes_ax.plot(x, [r["mb_per_site"] for r in line], ls="--", color=colours[i % len(colours)], alpha=0.4)
        for j, r in enumerate(r for r in mine if not r["federated"]):
            ax.axhline(r["test_auc_mean"], ls=styles[j % len(styles)], color=str(0.15 + 0.12 * (j % 5)), lw=1.2,
                       label=f"{r['variant']} (centralized, n={r['n_runs']})")
        ax.set(xscale="log", xlabel="local steps per round (same image budget)", ylabel="test AUC (%)", title=site)
        bytes_ax.set(yscale="log", ylabel="MB of weights per site over the run (dashed)")
    axes[0][0].legend(fontsize=7, loc="best", framealpha=0.8)
    path = out / "frontier.png"
    save_figure(fig, path)
    return path


def _fmt(x: Any, digits: int = 1) -> str:
    return "" if x == "" else ("n/a" if isinstance(x, float) and not np.isfinite(x) else
                               (f"{x:.{digits}f}" if isinstance(x, float) else str(x)))


def markdown(validation: list[dict[str, Any]], ranked: list[dict[str, Any]], front: list[dict[str, Any]],
             seeds: set[int] | None, differences: list[dict[str, Any]] | None = None) -> tuple[str, str]:
    """(validation.md, frontier.md)."""
    which = "all seeds" if seeds is None else f"seeds {', '.join(map(str, sorted(seeds)))}"
    v = ["# Validation pooled over folds", "",
         (f"Fold-runs of {which}. Each site's validation predictions of every fold-run of a variant pooled into one "
          "AUC (percent); mean per-fold AUC beside it. Rule, fixed before the runs: the variant with the highest "
          "worst-site pooled validation AUC."), "",
         "| Variant | Site | fold-runs | images | pooled val AUC | mean per-fold val AUC |", "|---|---|---|---|---|---|"]
    v += [f"| {r['variant']} | {r['site']} | {r['fold_runs']} | {r['images']} | {_fmt(r['pooled_val_auc'])} | "
          f"{_fmt(r['mean_fold_val_auc'])} |" for r in validation]
    v += ["", "## Ranked by the rule", "", "| Rank | Variant | worst-site pooled val AUC |", "|---|---|---|"]
    v += [f"| {i} | {r['variant']} | {_fmt(r['worst_site_pooled_val_auc'])} |" for i, r in enumerate(ranked, 1)]
    if ranked and np.isfinite(ranked[0]["worst_site_pooled_val_auc"]):
        v += ["", f"**Choice: {ranked[0]['variant']}**."]
    if differences:
        v += ["", f"## Against {differences[0]['reference']} (paired bootstrap)", "",
              (f"Pooled validation AUC of each variant minus the reference's on the images both hold, with a 95% "
               f"interval from {BOOTSTRAP_RESAMPLES} paired bootstrap resamples of those images: what the pooled "
               "validation can resolve (not read by the rule)."), "",
              "| Variant | Site | images | difference | 95% interval |", "|---|---|---|---|---|"]
        v += [f"| {r['variant']} | {r['site']} | {r['images']} | {r['difference']:+.1f} | "
              f"{r['ci_low']:+.1f} to {r['ci_high']:+.1f} |" for r in differences]
    f = ["# Frontier: test AUC against local steps per round", "",
         (f"Fold-runs of {which}; test AUC mean ± std (percent). MB per site: weights received plus sent over the "
          "run (one copy each way per round, at the run's compression)."), "",
         "| Variant | Method | Site | local steps | rounds | n | test AUC | MB per site |", "|---|---|---|---|---|---|---|---|"]
    f += [f"| {r['variant']} | {r['method']} | {r['site']} | {_fmt(r['local_steps'])} | {_fmt(r['rounds'])} | "
          f"{r['n_runs']} | {_fmt(r['test_auc_mean'])} ± {_fmt(r['test_auc_std'])} | {_fmt(r['mb_per_site'])} |"
          for r in front]
    return "\n".join(v) + "\n", "\n".join(f) + "\n"


def write_decision(paths: Iterable[str | Path], out: str | Path, seeds: set[int] | None = None,
                   reference: str = "") -> list[Path]:
    """Everything of ``fl-covid-decide``; returns the files written."""
    out = Path(out)
    runs = load_fold_runs(paths, seeds)
    pools = read_validations(runs)
    validation = pooled_validation(pools)
    ranked = choose(validation, {s for r in runs for s in r.test_auc})
    differences = paired_differences(pools, reference) if reference else []
    front = frontier(runs)
    out.mkdir(parents=True, exist_ok=True)
    v_md, f_md = markdown(validation, ranked, front, seeds, differences)
    atomic_write_bytes(out / "validation.md", v_md.encode())
    atomic_write_bytes(out / "frontier.md", f_md.encode())
    write_csv(out / "validation.csv", validation)
    write_csv(out / "frontier.csv", front)
    files = [out / "validation.md", out / "validation.csv", out / "frontier.md", out / "frontier.csv"]
    if differences:
        write_csv(out / "differences.csv", differences)
        files.append(out / "differences.csv")
    if any(r["federated"] for r in front):
        files.append(plot_frontier(front, out))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-covid-decide", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="protocol folders (fl-covid-protocol --out) or run directories")
    parser.add_argument("--out", required=True, help="folder for validation.md/csv, frontier.md/csv/png")
    parser.add_argument("--seeds", default="", help="comma-separated seeds to include (default: all)")
    parser.add_argument("--reference", default="", help="a variant (a decision's default): every other variant's "
                        "pooled validation AUC difference against it, with a paired bootstrap interval")
    args = parser.parse_args(argv)
    if not all(s.strip().isdigit() for s in args.seeds.split(",") if s.strip()):
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")

    def work() -> int:
        files = write_decision(args.runs, args.out, {int(s) for s in args.seeds.split(",") if s.strip()} or None,
                               args.reference)
        print((Path(args.out) / "validation.md").read_text().strip())
        print(*files, sep="\n")
        return 0

    return run_command(work, (ReportError, json.JSONDecodeError, KeyError), log=False)


if __name__ == "__main__":
    sys.exit(main())
