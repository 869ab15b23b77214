"""Shortcut audit: statistics on images with planted cues, classifiers on them, and one run on the embedded data."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from fl_covid.cues import blockiness, image_features
from fl_covid.experiments.audit import main
from fl_covid.experiments.shortcuts import (
    BLOCK,
    FEATURES,
    SiteFeatures,
    _pseudo_patients,
    audit_pair,
    grouped_cv,
    make_models,
    manifest_features,
    transfer_auc,
    univariate_auc,
    usable,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## Findings", "## Data", "## Image statistics per site and class",
            "## Trivial-feature classifiers within each site", "## Transfer between sites", "## Site classifier",
            "## Cues that point opposite ways")


def _slice(rng: np.random.Generator, bright_border: bool, h: int = 64, w: int = 80) -> np.ndarray:
    """A noisy grey ellipse 'body' on black; with ``bright_border`` a 4-px frame at 250 (a planted cue)."""
    yy, xx = np.mgrid[:h, :w]
    body = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.42 * w)) ** 2 <= 1
    img = np.where(body, rng.normal(rng.uniform(110, 170), 25, (h, w)), rng.uniform(0, 15))
    if bright_border:
        img[:4], img[-4:], img[:, :4], img[:, -4:] = 250, 250, 250, 250
    return np.clip(img, 0, 255).astype(np.uint8)


def _synthetic_site(name: str, n: int, seed: int, cue_class: int | None) -> SiteFeatures:
    """n images per class; the bright border goes to class ``cue_class`` (None: no cue). Manifest features NaN."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n)
    feats = [image_features(_slice(rng, cue_class is not None and y == cue_class)) for y in labels]
    x = np.array([[f.get(name, math.nan) for name in FEATURES] for f in feats])
    groups = np.array([f"g{i}" for i in range(2 * n)])
    return SiteFeatures(name, tuple(groups), x, labels, groups, groups)


def _col(name: str) -> int:
    return FEATURES.index(name)


def test_planted_bright_border_is_found_and_no_cue_is_chance():
    cued = _synthetic_site("cued", 30, 0, cue_class=1)
    auc = univariate_auc(cued.x, cued.labels)
    assert auc[_col("border_mean")] > 0.99 and auc[_col("border_bright")] > 0.99
    assert abs(auc[_col("centre_mean")] - 0.5) < 0.25  # the body carries no label information
    cols = usable(cued.x)
    assert not cols[_col("orig_width")]  # all NaN: left out
    for model in make_models().values():
        assert grouped_cv(model, cued.x[:, cols], cued.labels, cued.groups, folds=5)["auc"] > 0.95

    plain = _synthetic_site("plain", 40, 1, cue_class=None)
    cols = usable(plain.x)
    r = grouped_cv(make_models()["logistic"], plain.x[:, cols], plain.labels, plain.groups, folds=5)
    assert abs(r["auc"] - 0.5) < 0.2
    assert abs(univariate_auc(plain.x, plain.labels)[_col("border_mean")] - 0.5) < 0.2


def test_grouped_cv_keeps_groups_apart_and_reports_importance():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 40)
    x = rng.normal(0, 1, (80, 4))
    x[:, 2] += 2.5 * y  # only feature 2 carries the label
    groups = np.array([f"g{i // 4}" for i in range(80)])  # groups of 4 images, one class each
    r = grouped_cv(make_models()["logistic"], x, y, groups, folds=4, importance_repeats=3)
    assert r["folds"] == 4 and len(r["fold_aucs"]) == 4 and r["oof"].shape == y.shape and r["auc"] > 0.9
    assert int(np.argmax(r["importance"])) == 2 and r["importance"][2] > 0.2
    assert np.abs(np.delete(r["importance"], 2)).max() < 0.05
    with pytest.raises(ValueError, match="at least 2 groups"):
        grouped_cv(make_models()["logistic"], x, y, np.array(["a"] * len(y)))


def test_opposite_cue_inverts_transfer_and_sites_are_told_apart():
    a = _synthetic_site("a", 25, 3, cue_class=1)  # bright border means class 1 here ...
    b = _synthetic_site("b", 25, 4, cue_class=0)  # ... and class 0 there
    cols = usable(a.x) & usable(b.x)
    assert transfer_auc(make_models()["logistic"], a, b, cols) < 0.1
    assert transfer_auc(make_models()["logistic"], b, a, cols, site_standardised=True) < 0.1
    pair = audit_pair(a, b, folds=3)
    opposite = {e["feature"] for e in pair["opposite"]}
    assert {"border_mean", "border_bright"} <= opposite
    e = next(e for e in pair["opposite"] if e["feature"] == "border_mean")
    assert e["auc"]["a"] > 0.9 and e["auc"]["b"] < 0.1 and e["cohen_d"]["a"] > 0 > e["cohen_d"]["b"]
    assert set(pair["transfer"]) == {"a -> b", "b -> a"}


def test_blockiness_sees_the_jpeg_grid_at_the_source_scale():
    rng = np.random.default_rng(5)
    smooth = ndimage.gaussian_filter(rng.normal(0, 1, (200, 264)), 2)
    smooth = ((smooth - smooth.min()) / np.ptp(smooth) * 200 + 20).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=30)
    jpeg = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    assert blockiness(smooth) < 1.4
    assert blockiness(jpeg) > 2.5
    # upscaled by 1.4 after compression: the grid is now 11.2 px wide, and found there
    big = np.asarray(Image.fromarray(jpeg).resize((370, 280), Image.LANCZOS))
    assert blockiness(big, 8 * 370 / 264) > 2.0
    assert math.isnan(blockiness(jpeg, 2.0))


def test_border_padding_and_mark_statistics():
    img = np.random.default_rng(6).integers(60, 200, (100, 120)).astype(np.uint8)
    img[:10], img[-10:] = 0, 0  # letterbox bars
    f = image_features(img)
    assert f["letterbox_rows"] == pytest.approx(0.2) and f["letterbox_cols"] == 0
    assert f["black"] == pytest.approx(0.2) and f["border_dark"] > 0.3
    assert f["aspect"] == pytest.approx(1.2)
    marked = img.copy()
    marked[12:16, 2:12] = 255  # a white mark in the left frame
    g = image_features(marked)
    assert g["border_marks"] > f["border_marks"] and g["border_bright"] > 0 == f["border_bright"]
    with pytest.raises(ValueError, match="uint8"):
        image_features(img.astype(np.float32))


def test_manifest_features_and_pseudo_patients():
    row = {"orig_width": "200", "orig_height": "150", "width": "341", "height": "256", "source_file": "x (1).JPG"}
    f = manifest_features(row, (341, 256))
    assert f["upscaled"] == 1 and f["source_jpeg"] == 1 and f["orig_short"] == 150
    assert f["orig_aspect"] == pytest.approx(4 / 3)
    g = manifest_features({"path": "COVID/a.jpg", "label": "COVID"}, (112, 112))
    assert math.isnan(g["orig_width"]) and math.isnan(g["upscaled"]) and math.isnan(g["source_jpeg"])

    rows = [{"label": lab, "patient_id": ""} for lab in ("COVID",) * (BLOCK + 1) + ("NonCOVID",) * 2]
    rows.append({"label": "COVID", "patient_id": "p7"})
    ids = [r["patient_id"] for r in _pseudo_patients(rows)]
    assert ids[:BLOCK] == [ids[0]] * BLOCK and ids[BLOCK] != ids[0]
    assert ids[BLOCK + 1] == ids[BLOCK + 2] != ids[0] and ids[-1] == "p7"


def test_audit_on_embedded_data_writes_the_report(tmp_path: Path):
    out = tmp_path / "audit"
    assert main(["--data", str(REPO_ROOT / "data"), "--out", str(out), "--max-per-class", "30", "--folds", "3",
                 "--importance-repeats", "1"]) == 0
    md = (out / "audit.md").read_text()
    for section in SECTIONS:
        assert section in md, section
    result = json.loads((out / "audit.json").read_text())
    assert set(result["sites"]) == {"site_a_sarscov2", "site_b_covidct"}
    for site in result["sites"].values():
        assert site["n_covid"] == site["n_noncovid"] == 30
        assert set(site["features"]) == set(FEATURES)
        assert 0.0 <= site["within"]["all"]["logistic"]["auc"] <= 1.0
    # the embedded copy has no source sizes: those statistics are reported as unavailable, not as numbers
    assert result["sites"]["site_a_sarscov2"]["features"]["orig_width"]["auc"] is None
    # the two public datasets are told apart from trivial statistics alone
    assert result["pair"]["site_classifier"]["logistic"]["auc"] > 0.85
    assert len(result["pair"]["transfer"]) == 2
