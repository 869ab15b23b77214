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

A within-site AUC far above 0.5 with a transfer AUC below 0.5 is the signature of a dataset shortcut.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.inspection import permutation_importance
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from fl_covid.cli import run_command
from fl_covid.cues import (
    BRIGHT,
    DARK,
    FLAT_STD,
    FRAME,
    JPEG_BLOCK,
    MARK_RANGE,
    PIXEL_DESCRIPTIONS,
    PIXEL_FEATURES,
    image_features,
)

# the loader's own rows, grouping and subset, so that the audit's folds match training's
from fl_covid.data import CLASSES, class_subset, group_keys, site_rows
from fl_covid.errors import DataError
from fl_covid.reporting import atomic_write_bytes, write_json

log = logging.getLogger(__name__)

DEFAULT_SITES = ("site_a_sarscov2", "site_b_covidct")
# Models are fitted with one OpenMP thread: the boosting's threads spin while they wait, which on a machine busy
# with other work made it about ten times slower than one thread on these small tables.
FIT_THREADS = 1
MAX_SIDE = 256  # decode so the shorter side is at most this (the full-resolution PNGs already have 256)
BLOCK = 25  # consecutive files per pseudo-patient where the manifest has no patient IDs (~ Site A's slices/patient)

MANIFEST_FEATURES = ("orig_width", "orig_height", "orig_short", "orig_aspect", "orig_megapixels", "upscaled",
                     "source_jpeg")
FEATURES = PIXEL_FEATURES + MANIFEST_FEATURES
FEATURE_SETS = {"all": FEATURES, "pixels": PIXEL_FEATURES, "manifest": MANIFEST_FEATURES}

DESCRIPTIONS = PIXEL_DESCRIPTIONS | {
    "orig_width": "source width (px)", "orig_height": "source height (px)", "orig_short": "source shorter side",
    "orig_aspect": "source width / height", "orig_megapixels": "source width x height / 1e6",
    "upscaled": "source shorter side < file's (upscaled when preprocessed)",
    "source_jpeg": "source file was a JPEG (manifest source_file)",
}


@dataclass(frozen=True)
class SiteFeatures:
    """One site's statistics. ``x``: (N, F) float64 in FEATURES order (NaN: not available); ``labels``: (N,) 1 =
    COVID; ``groups``: (N,) patient / near-duplicate group keys as the loader makes them; ``blocks``: (N,) the same
    with every image that has no patient ID put in a pseudo-patient of BLOCK consecutive files of its class."""

    name: str
    paths: tuple[str, ...]
    x: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    blocks: np.ndarray


# ---------------------------------------------------------------------------------------------------------------
# Per-image statistics (the pixel ones are fl_covid.cues')


def _number(row: dict[str, str], key: str) -> float:
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        return math.nan


def manifest_features(row: dict[str, str], file_size: tuple[int, int]) -> dict[str, float]:
    """MANIFEST_FEATURES of one manifest row; ``file_size``: (width, height) of the image file. NaN where the
    manifest lacks the column (``orig_width`` / ``orig_height`` / ``source_file``)."""
    ow, oh = _number(row, "orig_width"), _number(row, "orig_height")
    fw, fh = _number(row, "width"), _number(row, "height")
    if math.isnan(fw) or math.isnan(fh):
        fw, fh = file_size
    short = min(ow, oh)
    source = (row.get("source_file") or "").strip().lower()
    return {
        "orig_width": ow, "orig_height": oh, "orig_short": short, "orig_aspect": ow / oh,
        "orig_megapixels": ow * oh / 1e6,
        "upscaled": float(short < min(fw, fh)) if not math.isnan(short) else math.nan,
        "source_jpeg": float(source.endswith((".jpg", ".jpeg"))) if source else math.nan,
    }


def decode_for_audit(path: Path, max_side: int = MAX_SIDE) -> tuple[np.ndarray, tuple[int, int]]:
    """Grey uint8 (H, W) with the shorter side at most ``max_side`` (aspect kept, Lanczos), and the file's
    (width, height)."""
    try:
        with Image.open(path) as im:
            size = im.size
            scale = max_side / min(size)
            if scale < 1:
                target = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
                im.draft("L", target)
                return np.asarray(im.convert("L").resize(target, Image.LANCZOS)), size
            return np.asarray(im.convert("L")), size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}; replace or remove the file") from e


def row_features(root: Path, row: dict[str, str], max_side: int = MAX_SIDE) -> np.ndarray:
    """All FEATURES of one manifest row's image: (F,) float64."""
    img, file_size = decode_for_audit(root / row["path"], max_side)
    ow = _number(row, "orig_width")
    source_w = ow if not math.isnan(ow) else file_size[0]
    period = JPEG_BLOCK * img.shape[1] / source_w  # source 8-px blocks in decoded pixels
    feats = image_features(img, period) | manifest_features(row, file_size)
    return np.array([feats[k] for k in FEATURES], dtype=np.float64)


def _pseudo_patients(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Rows with an empty ``patient_id`` get ``block:<label>:<k>``, k = their position among such rows of their
    class // BLOCK: consecutive file numbers are often slices of one scan, so this keeps neighbours together."""
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        if (row.get("patient_id") or "").strip():
            out.append(row)
            continue
        label = row["label"].strip()
        k = seen[label] = seen.get(label, -1) + 1
        out.append(row | {"patient_id": f"block:{label}:{k // BLOCK}"})
    return out


def site_features(root: str | Path, name: str | None = None, max_per_class: int = 0, seed: int = 0,
                  workers: int = 2, max_side: int = MAX_SIDE) -> SiteFeatures:
    """Decode a site folder once and compute FEATURES for every image, with the loader's rows and groups.

    Like ``fl_covid.data.load_site``: images whose duplicate group has both labels are left out, and
    ``max_per_class`` takes the same seeded subset."""
    root = Path(root).expanduser().resolve()
    name = name or root.name
    if not root.is_dir():
        raise DataError(f"site '{name}': folder {root} does not exist (check --data and --sites)")
    rows = site_rows(root, name)
    groups = group_keys(rows)
    blocks = group_keys(_pseudo_patients(rows))
    if max_per_class:
        keep = class_subset(rows, max_per_class, seed)
        rows, groups, blocks = [rows[i] for i in keep], [groups[i] for i in keep], [blocks[i] for i in keep]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        x = np.stack(list(pool.map(lambda r: row_features(root, r, max_side), rows)))
    labels = np.array([CLASSES.index(r["label"].strip()) for r in rows], dtype=np.int64)
    return SiteFeatures(name, tuple(r["path"] for r in rows), x, labels, np.array(groups), np.array(blocks))


# ---------------------------------------------------------------------------------------------------------------
# Predictiveness


def univariate_auc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUC of each feature alone as a score for class 1. ``x``: (N, F), ``y``: (N,) -> (F,); NaN rows of a
    feature are skipped; NaN where a feature is constant or missing."""
    out = np.full(x.shape[1], math.nan)
    for j in range(x.shape[1]):
        ok = ~np.isnan(x[:, j])
        if len(np.unique(y[ok])) == 2 and np.ptp(x[ok, j]) > 0:
            out[j] = roc_auc_score(y[ok], x[ok, j])
    return out


def cohens_d(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Standardised mean difference (class 1 - class 0) / pooled std per feature: (N, F), (N,) -> (F,)."""
    out = np.full(x.shape[1], math.nan)
    for j in range(x.shape[1]):
        a, b = (x[(y == c) & ~np.isnan(x[:, j]), j] for c in (1, 0))
        if len(a) > 1 and len(b) > 1:
            pooled = math.sqrt((a.var(ddof=1) * (len(a) - 1) + b.var(ddof=1) * (len(b) - 1)) / (len(a) + len(b) - 2))
            out[j] = (a.mean() - b.mean()) / pooled if pooled > 0 else math.nan
    return out


def usable(x: np.ndarray) -> np.ndarray:
    """Columns of ``x`` (N, F) that are not all NaN and not constant: (F,) bool."""
    keep = np.zeros(x.shape[1], dtype=bool)
    for j in range(x.shape[1]):
        col = x[~np.isnan(x[:, j]), j]
        keep[j] = col.size > 0 and np.ptp(col) > 0
    return keep


def make_models(seed: int = 0) -> dict[str, Any]:
    """The trivial-feature classifiers: a linear one and a non-linear one (both take NaN)."""
    return {
        "logistic": make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                                  LogisticRegression(C=1.0, max_iter=5000)),
        "boosting": HistGradientBoostingClassifier(max_iter=150, learning_rate=0.05, max_leaf_nodes=15,
                                                   min_samples_leaf=10, early_stopping=False, random_state=seed),
    }


def grouped_cv(model: Any, x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5, seed: int = 0,
               importance_repeats: int = 0) -> dict[str, Any]:
    """Out-of-fold predictions with StratifiedGroupKFold (no group in two folds).

    ``x``: (N, F), ``y``: (N,), ``groups``: (N,). Returns ``auc`` (of the pooled out-of-fold scores),
    ``fold_aucs``, ``oof`` (N,) and, with ``importance_repeats``, ``importance`` (F,): the mean drop of held-out AUC
    when one feature is permuted (sklearn permutation importance), averaged over folds."""
    folds = min(folds, *(len(set(groups[y == c])) for c in (0, 1)))
    if folds < 2:
        raise ValueError("grouped cross-validation needs at least 2 groups of each class")
    oof = np.zeros(len(y))
    fold_aucs, importances = [], []
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with threadpool_limits(limits=FIT_THREADS):
        for train, test in splitter.split(x, y, groups):
            fitted = clone(model).fit(x[train], y[train])
            oof[test] = fitted.predict_proba(x[test])[:, 1]
            if len(np.unique(y[test])) == 2:
                fold_aucs.append(float(roc_auc_score(y[test], oof[test])))
                if importance_repeats:
                    r = permutation_importance(fitted, x[test], y[test], scoring="roc_auc",
                                               n_repeats=importance_repeats, random_state=seed)
                    importances.append(r.importances_mean)
    out: dict[str, Any] = {"auc": float(roc_auc_score(y, oof)), "fold_aucs": fold_aucs, "folds": folds, "oof": oof}
    if importances:
        out["importance"] = np.mean(importances, axis=0)
    return out


def standardise_within(x: np.ndarray) -> np.ndarray:
    """Z-score every column with this set's own mean and std (no labels used): (N, F) -> (N, F)."""
    mean, std = np.nanmean(x, axis=0), np.nanstd(x, axis=0)
    return (x - mean) / np.where(std > 0, std, 1.0)


def transfer_auc(model: Any, source: SiteFeatures, target: SiteFeatures, columns: np.ndarray,
                 site_standardised: bool = False) -> float:
    """Train ``model`` on all of ``source`` and score all of ``target``: the AUC for COVID on the target.

    ``columns``: (F,) bool, the features to use. ``site_standardised`` z-scores each site's features on its own
    first, which removes site-wide offsets and asks only whether the within-site direction of each cue carries
    over."""
    xs, xt = source.x[:, columns], target.x[:, columns]
    if site_standardised:
        xs, xt = standardise_within(xs), standardise_within(xt)
    with threadpool_limits(limits=FIT_THREADS):
        fitted = clone(model).fit(xs, source.labels)
        return float(roc_auc_score(target.labels, fitted.predict_proba(xt)[:, 1]))


# ---------------------------------------------------------------------------------------------------------------
# The audit


def _summary(values: np.ndarray) -> dict[str, float]:
    v = values[~np.isnan(values)]
    if not v.size:
        return {"mean": None, "std": None, "median": None}
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}


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


def audit_site(site: SiteFeatures, folds: int = 5, seed: int = 0, importance_repeats: int = 3) -> dict[str, Any]:
    """Part 1 and 2 for one site: per-class statistics with univariate AUC and effect size, and the grouped-CV AUC
    of each model on each feature set, with the boosting model's permutation importance on all features. Where
    images lack patient IDs, also the AUC with pseudo-patient blocks (``auc_blocks``)."""
    y = site.labels
    auc, d = univariate_auc(site.x, y), cohens_d(site.x, y)
    blocked = len(set(site.blocks.tolist())) < len(set(site.groups.tolist()))
    features = {
        f: {"COVID": _summary(site.x[y == 1, j]), "NonCOVID": _summary(site.x[y == 0, j]), "auc": auc[j],
            "cohen_d": d[j]}
        for j, f in enumerate(FEATURES)
    }
    within: dict[str, dict[str, Any]] = {}
    importance: list[dict[str, float]] = []
    for set_name, names in FEATURE_SETS.items():
        cols = usable(site.x) & np.isin(np.array(FEATURES), names)
        if not cols.any():
            within[set_name] = {"features": [], "note": "no usable features (constant or not in the manifest)"}
            continue
        within[set_name] = {"features": [f for f, c in zip(FEATURES, cols) if c]}
        for model_name, model in make_models(seed).items():
            repeats = importance_repeats if (set_name == "all" and model_name == "boosting") else 0
            r = grouped_cv(model, site.x[:, cols], y, site.groups, folds, seed, repeats)
            within[set_name][model_name] = {"auc": r["auc"], "fold_aucs": r["fold_aucs"], "folds": r["folds"]}
            if blocked:
                rb = grouped_cv(model, site.x[:, cols], y, site.blocks, folds, seed)
                within[set_name][model_name] |= {"auc_blocks": rb["auc"], "fold_aucs_blocks": rb["fold_aucs"]}
            if "importance" in r:
                importance = sorted(({"feature": f, "auc_drop": float(v)}
                                     for f, v in zip(within[set_name]["features"], r["importance"])),
                                    key=lambda e: -e["auc_drop"])
    return {
        "n": len(y), "n_covid": int(y.sum()), "n_noncovid": int((y == 0).sum()),
        "n_groups": len(set(site.groups.tolist())), "n_blocks": len(set(site.blocks.tolist())),
        "features": features, "within": within, "importance": importance,
    }


def audit_pair(a: SiteFeatures, b: SiteFeatures, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Part 2 (transfer) and 3 (site classifier, opposite cues) for two sites."""
    cols = usable(a.x) & usable(b.x)
    names = [f for f, c in zip(FEATURES, cols) if c]
    transfer: dict[str, Any] = {}
    for src, dst in ((a, b), (b, a)):
        key = f"{src.name} -> {dst.name}"
        transfer[key] = {}
        for model_name, model in make_models(seed).items():
            transfer[key][model_name] = {
                "raw": transfer_auc(model, src, dst, cols),
                "site_standardised": transfer_auc(model, src, dst, cols, site_standardised=True),
            }
    x = np.concatenate([a.x, b.x])[:, cols]
    s = np.concatenate([np.zeros(len(a.labels), dtype=np.int64), np.ones(len(b.labels), dtype=np.int64)])
    groups = np.concatenate([[f"{a.name}/{g}" for g in a.groups], [f"{b.name}/{g}" for g in b.groups]])
    site_clf = {m: {k: v for k, v in grouped_cv(model, x, s, groups, folds, seed).items() if k != "oof"}
                for m, model in make_models(seed).items()}
    site_auc = univariate_auc(x, s)
    separating = sorted(({"feature": f, "auc": float(v), "separation": float(abs(v - 0.5) * 2)}
                         for f, v in zip(names, site_auc)), key=lambda e: -e["separation"])
    auc_a, auc_b = univariate_auc(a.x, a.labels), univariate_auc(b.x, b.labels)
    d_a, d_b = cohens_d(a.x, a.labels), cohens_d(b.x, b.labels)
    opposite = []
    for j, f in enumerate(FEATURES):
        if np.isnan(auc_a[j]) or np.isnan(auc_b[j]):
            continue
        ea, eb = auc_a[j] - 0.5, auc_b[j] - 0.5
        if ea * eb < 0 and min(abs(ea), abs(eb)) >= 0.05:
            opposite.append({"feature": f, "auc": {a.name: float(auc_a[j]), b.name: float(auc_b[j])},
                             "cohen_d": {a.name: float(d_a[j]), b.name: float(d_b[j])},
                             "strength": float(min(abs(ea), abs(eb)))})
    opposite.sort(key=lambda e: -e["strength"])
    return {"features": names, "transfer": transfer,
            "site_classifier": {"sites": [a.name, b.name], **site_clf, "separating_features": separating},
            "opposite": opposite}


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
