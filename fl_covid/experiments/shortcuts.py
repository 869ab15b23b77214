"""What the shortcut audit measures (``fl_covid.experiments.audit``): which trivial image statistics separate COVID
from NonCOVID inside each site, and across sites.

Per image (``site_features``): cheap statistics that a network could use instead of the lungs (``fl_covid.cues``:
intensity histogram, border and padding, annotation marks, JPEG grid strength; from the manifest: source size,
upscaling and format), on the image decoded once with its shorter side at most MAX_SIDE px. Per site
(``audit_site``): each statistic's univariate AUC and effect size, and trivial-feature classifiers (logistic
regression, gradient boosting) under grouped cross-validation with the loader's patient / near-duplicate groups.
Per pair of sites (``audit_pair``): the classifiers' transfer AUC from one site to the other, a site classifier on
the same statistics, and the statistics whose COVID-vs-NonCOVID difference has opposite signs in the two sites.
"""

from __future__ import annotations

import math
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

from fl_covid.cues import JPEG_BLOCK, PIXEL_DESCRIPTIONS, PIXEL_FEATURES, image_features

# the loader's own rows, grouping and subset, so that the audit's folds match training's
from fl_covid.data import CLASSES, class_subset, group_keys, site_rows
from fl_covid.errors import DataError

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
# One site, two sites


def _summary(values: np.ndarray) -> dict[str, float]:
    v = values[~np.isnan(values)]
    if not v.size:
        return {"mean": None, "std": None, "median": None}
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}


def audit_site(site: SiteFeatures, folds: int = 5, seed: int = 0, importance_repeats: int = 3) -> dict[str, Any]:
    """Parts 1 and 2 of the audit for one site: per-class statistics with univariate AUC and effect size, and the grouped-CV AUC
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
    """Parts 2 (transfer) and 3 (site classifier, opposite cues) of the audit for two sites."""
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
