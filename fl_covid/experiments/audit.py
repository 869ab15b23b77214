"""Shortcut audit: which trivial image statistics separate COVID from NonCOVID inside each site, and across sites.

``python -m fl_covid.experiments.audit --data /work/shared/data --out docs/audit`` decodes every image once (shorter
side at most 256 px, aspect kept), computes cheap statistics that a network could use instead of the lungs (source
size and upscaling, intensity histogram, border and padding, annotation marks, JPEG grid strength, source format),
and writes ``audit.md`` (tables and findings) and ``audit.json`` (the numbers) to ``--out``:

1. per site and class: the statistics, each with its univariate AUC for COVID;
2. trivial-feature classifiers (logistic regression, gradient boosting) with grouped cross-validation inside each
   site (the loader's patient / near-duplicate groups), and their transfer AUC from one site to the other;
3. a site classifier on the same statistics, and the statistics whose COVID-vs-NonCOVID difference has opposite
   signs in the two sites.

A within-site AUC far above 0.5 with a transfer AUC below 0.5 is the signature of a dataset shortcut. The
measurements are ``fl_covid.experiments.shortcuts``; this module runs them over the sites and writes the report.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fl_covid.cli import run_command
from fl_covid.cues import BRIGHT, DARK, FLAT_STD, FRAME, MARK_RANGE
from fl_covid.errors import DataError
from fl_covid.experiments.shortcuts import (
    BLOCK,
    DESCRIPTIONS,
    FEATURES,
    MAX_SIDE,
    audit_pair,
    audit_site,
    site_features,
)
from fl_covid.reporting import atomic_write_bytes, write_json

log = logging.getLogger(__name__)

DEFAULT_SITES = ("site_a_sarscov2", "site_b_covidct")


def _clean(v: Any) -> Any:
    """NaN -> None, numpy scalars -> Python numbers, recursively (strict JSON)."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else round(float(v), 5)
    if isinstance(v, np.integer):
        return int(v)
    return v


def run_audit(data: str | Path, out: str | Path, sites: tuple[str, ...] = DEFAULT_SITES, max_per_class: int = 0,
              folds: int = 5, seed: int = 0, workers: int = 2, importance_repeats: int = 3,
              progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Compute the audit of ``sites`` under ``data`` and write ``audit.json`` and ``audit.md`` into ``out``."""
    started = time.perf_counter()
    data, out = Path(data).expanduser().resolve(), Path(out)
    feats = []
    for name in sites:
        t = time.perf_counter()
        feats.append(site_features(data / name, name, max_per_class, seed, workers))
        progress(f"{name}: {len(feats[-1].labels)} images decoded and measured in {time.perf_counter() - t:.0f} s")
    result: dict[str, Any] = {
        "data": str(data), "sites": {}, "settings": {
            "max_side": MAX_SIDE, "frame": FRAME, "folds": folds, "seed": seed, "max_per_class": max_per_class,
            "flat_std": FLAT_STD, "dark": DARK, "bright": BRIGHT, "mark_range": MARK_RANGE,
            "importance_repeats": importance_repeats},
        "descriptions": DESCRIPTIONS,
    }
    for f in feats:
        result["sites"][f.name] = audit_site(f, folds, seed, importance_repeats)
        progress(f"{f.name}: within-site classifiers done")
    if len(feats) == 2:
        result["pair"] = audit_pair(feats[0], feats[1], folds, seed)
        progress("transfer and site classifier done")
    result["seconds"] = time.perf_counter() - started
    result = _clean(result)
    write_json(out / "audit.json", result)
    atomic_write_bytes(out / "audit.md", render_markdown(result).encode())
    return result


# ---------------------------------------------------------------------------------------------------------------
# Report


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1000 or abs(v) < 10 ** -digits):
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]


def _strong(site: dict[str, Any], k: int = 5) -> list[tuple[str, float]]:
    aucs = [(f, v["auc"]) for f, v in site["features"].items() if v["auc"] is not None]
    return sorted(aucs, key=lambda e: -abs(e[1] - 0.5))[:k]


def findings(result: dict[str, Any]) -> list[str]:
    """Short findings, one sentence each, read off the numbers."""
    lines = []
    for name, site in result["sites"].items():
        w = site["within"]["all"]
        if "logistic" not in w:
            continue
        cues = ", ".join(f"`{f}` (AUC {_fmt(v, 2)})" for f, v in _strong(site, 4))
        pix = site["within"]["pixels"]
        pix_txt = (f"; pixel statistics alone reach {_fmt(max(pix['logistic']['auc'], pix['boosting']['auc']), 2)}"
                   if "logistic" in pix else "")
        blk_txt = (f" ({_fmt(w['logistic']['auc_blocks'], 2)} / {_fmt(w['boosting']['auc_blocks'], 2)} with "
                   f"pseudo-patient blocks of {BLOCK} consecutive files)" if "auc_blocks" in w["logistic"] else "")
        lines.append(f"**{name}**: trivial features predict COVID with grouped-CV AUC "
                     f"{_fmt(w['logistic']['auc'], 2)} (logistic) / {_fmt(w['boosting']['auc'], 2)} (boosting)"
                     f"{blk_txt}{pix_txt}. Strongest single cues: {cues}.")
    pair = result.get("pair")
    if pair:
        for key, t in pair["transfer"].items():
            raw = [t[m]["raw"] for m in t]
            std = [t[m]["site_standardised"] for m in t]
            below = sum(v < 0.5 for v in raw + std)
            verdict = ("inverted: every classifier scores below chance there" if below == len(raw + std) else
                       f"{below} of {len(raw + std)} below 0.5, best {_fmt(max(raw + std), 2)}: the within-site "
                       "cues do not carry over" if below else "not inverted")
            lines.append(f"Transfer {key}: AUC {', '.join(_fmt(v, 2) for v in raw)} (logistic, boosting; raw) and "
                         f"{', '.join(_fmt(v, 2) for v in std)} (features standardised per site): {verdict}.")
        sc = pair["site_classifier"]
        top = ", ".join(f"`{e['feature']}`" for e in sc["separating_features"][:4])
        lines.append(f"The two sites are separable from these statistics alone: site-classifier AUC "
                     f"{_fmt(sc['logistic']['auc'], 3)} (logistic) / {_fmt(sc['boosting']['auc'], 3)} (boosting); "
                     f"most separating: {top}.")
        if pair["opposite"]:
            ops = ", ".join(f"`{e['feature']}`" for e in pair["opposite"][:6])
            lines.append(f"{len(pair['opposite'])} statistics differ between COVID and NonCOVID in opposite "
                         f"directions at the two sites (strongest: {ops}); a model using them on one site is "
                         "pushed below chance on the other.")
        else:
            lines.append("No statistic differs between the classes in opposite directions at the two sites.")
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    """The readable report of ``run_audit``'s result."""
    sites = list(result["sites"])
    md = ["# Shortcut audit", "",
          ("Cheap image statistics that a classifier could use instead of the lungs, per site and class, and how "
           "well they predict the label within each site and across sites. Made by "
           "`python -m fl_covid.experiments.audit`; the numbers are in `audit.json`."), "",
          f"Data: `{result['data']}`. Images decoded once with the shorter side at most "
          f"{result['settings']['max_side']} px (aspect kept); border frame {result['settings']['frame']:.0%} of each "
          f"side; {result['settings']['folds']}-fold StratifiedGroupKFold on the loader's patient / near-duplicate "
          f"groups (seed {result['settings']['seed']})"
          + (f"; at most {result['settings']['max_per_class']} images per class" if result['settings']['max_per_class']
             else "") + f". Took {result['seconds']:.0f} s.", "",
          "## Findings", ""]
    md += [f"- {line}" for line in findings(result)]
    md += ["", "## Data", ""]
    md += _table(["site", "images", "COVID", "NonCOVID", "groups (patient / near-duplicate)",
                  f"groups with pseudo-patients of {BLOCK} files"],
                 [[s, v["n"], v["n_covid"], v["n_noncovid"], v["n_groups"], v["n_blocks"]]
                  for s, v in result["sites"].items()])
    md += ["", "## Image statistics per site and class", "",
           ("Mean per class; AUC: the statistic alone as a score for COVID (0.5 = no information, below 0.5 = "
            "lower in COVID). **Bold**: |AUC - 0.5| >= 0.2."), ""]
    header = ["statistic"] + [f"{s} {c}" for s in sites for c in ("COVID", "NonCOVID", "AUC")] + ["meaning"]
    rows = []
    for f in FEATURES:
        row: list[Any] = [f"`{f}`"]
        for s in sites:
            v = result["sites"][s]["features"][f]
            auc = v["auc"]
            row += [v["COVID"]["mean"], v["NonCOVID"]["mean"],
                    "n/a" if auc is None else (f"**{auc:.3f}**" if abs(auc - 0.5) >= 0.2 else f"{auc:.3f}")]
        rows.append(row + [result["descriptions"][f]])
    md += _table(header, rows)
    md += ["", "## Trivial-feature classifiers within each site", "",
           ("AUC of the pooled out-of-fold scores (grouped cross-validation), in brackets the per-fold range. "
            "*pixels*: statistics of the decoded image; *manifest*: source size, upscaling and source format. "
            f"Last column: the same with images that have no patient ID grouped in blocks of {BLOCK} consecutive "
            "files of their class (pseudo-patients), a stricter split for a site without patient IDs."), ""]
    rows = []
    for s in sites:
        for set_name, w in result["sites"][s]["within"].items():
            for m in ("logistic", "boosting"):
                if m in w:
                    fa, fb = w[m]["fold_aucs"], w[m].get("fold_aucs_blocks")
                    blocks = (f"{w[m]['auc_blocks']:.3f} [{min(fb):.2f}-{max(fb):.2f}]" if fb
                              else "same groups (all images have patient IDs)")
                    rows.append([s, set_name, m, f"{w[m]['auc']:.3f} [{min(fa):.2f}-{max(fa):.2f}]",
                                 len(w["features"]), blocks])
                elif m == "logistic":
                    rows.append([s, set_name, "-", w.get("note", "n/a"), 0, ""])
    md += _table(["site", "features", "model", "AUC", "n features", "AUC, pseudo-patient blocks"], rows)
    md += ["", "### Most important features (boosting, all features)", "",
           "Mean drop of held-out AUC when the feature is permuted.", ""]
    for s in sites:
        imp = result["sites"][s]["importance"][:8]
        md += [f"- **{s}**: " + (", ".join(f"`{e['feature']}` {e['auc_drop']:.3f}" for e in imp) or "n/a")]
    pair = result.get("pair")
    if pair:
        md += ["", "## Transfer between sites", "",
               ("Train the trivial-feature classifier on all of one site, score all of the other. *raw*: features "
                "as measured; *site-standardised*: each site's features z-scored on that site alone (removes "
                "site-wide offsets; tests whether each cue's direction carries over). Below 0.5 = inverted."), ""]
        rows = [[k, m, t[m]["raw"], t[m]["site_standardised"]] for k, t in pair["transfer"].items() for m in t]
        md += _table(["train -> test", "model", "AUC raw", "AUC site-standardised"], rows)
        sc = pair["site_classifier"]
        md += ["", "## Site classifier", "",
               f"Predict the site ({sc['sites'][1]} = 1) from the same statistics, grouped 5-fold CV.", ""]
        md += _table(["model", "AUC"], [[m, sc[m]["auc"]] for m in ("logistic", "boosting")])
        md += ["", "Most separating single statistics (AUC for the second site; separation = |AUC - 0.5| x 2):", ""]
        md += _table(["statistic", "AUC", "separation"],
                     [[f"`{e['feature']}`", e["auc"], e["separation"]] for e in sc["separating_features"][:10]])
        md += ["", "## Cues that point opposite ways", "",
               ("Statistics whose COVID-vs-NonCOVID difference has opposite signs at the two sites (both "
                "univariate AUCs at least 0.05 from 0.5); Cohen's d = (COVID - NonCOVID) / pooled std."), ""]
        if pair["opposite"]:
            md += _table(["statistic"] + [f"AUC {s}" for s in sites] + [f"d {s}" for s in sites],
                         [[f"`{e['feature']}`"] + [e["auc"][s] for s in sites] + [e["cohen_d"][s] for s in sites]
                          for e in pair["opposite"]])
        else:
            md += ["None."]
    md += ["", "## Caveats", "",
           ("- Site A has no patient IDs: its groups are only near-duplicate clusters, so adjacent slices of one "
            "patient can sit in different folds and its within-site AUCs are optimistic; the pseudo-patient "
            "blocks are a stricter guess, not the truth."),
           ("- These are summary statistics; a network can find finer cues (figure layout, text shapes, "
            "reconstruction kernels). A low AUC here does not prove a cue is absent."), ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl_covid.experiments.audit", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder holding one subfolder per site")
    parser.add_argument("--out", required=True, help="folder for audit.md and audit.json")
    parser.add_argument("--sites", nargs="+", default=list(DEFAULT_SITES), help="site subfolders (two for transfer)")
    parser.add_argument("--max-per-class", type=int, default=0, help="seeded subset per class (0: all images)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--importance-repeats", type=int, default=3, help="permutations per feature and fold")
    args = parser.parse_args(argv)

    def work() -> int:
        run_audit(args.data, args.out, tuple(args.sites), args.max_per_class, args.folds, args.seed, args.workers,
                  args.importance_repeats)
        print(Path(args.out) / "audit.md")
        return 0

    return run_command(work, (DataError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
