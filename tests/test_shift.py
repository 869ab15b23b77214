"""The shift check: a model trained briefly on one real site flags the other site's CT images and not its own test
fold; the batch test, the profile's privacy, and the outputs of fl-covid-predict and fl-covid-evaluate."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from scipy.stats import ks_2samp

from fl_covid.centralized import run_central
from fl_covid.config import Config, load_config, project_root
from fl_covid.data import Site, Split, load_configured_site, load_site
from fl_covid.experiments.predict import run_predict
from fl_covid.experiments.unseen import evaluate_unseen
from fl_covid.shift import LEVELS, MIN_COMPONENT_IMAGES, Mixture, _ks, check_shift, shift_profile
from fl_covid.site_model import SiteModel, load_site_model
from tests.conftest import read_manifest, write_manifest
from tests.inprocess import run_dir, run_federation

SITE_A, SITE_B = "site_a_sarscov2", "site_b_covidct"
DATA = project_root() / "data"
PER_CLASS = 250  # 500 images per site: 300 train, 75 validation, 125 test (4 folds, validation 20%)
OTHER_PER_CLASS = 150
# Measured with these settings (seed 0): the Site A model flags 0.87 of 300 Site B images and 0.008 of its own test
# fold (125 images); the Site B model 0.10 of its test fold and 0.05 of 300 Site A images (see the batch test).
MIN_TPR_A_TO_B, MAX_FPR = 0.7, 0.15


def _train(site: str, out: Path) -> tuple[Config, SiteModel, Site, Split, Path]:
    """``single`` for 2 epochs on 250 + 250 real images of ``site`` (embedded copy, 32 px, width 0.125)."""
    config = load_config("configs/smoke.yaml", {
        "sites": site, "output-dir": str(out), "max-per-class": PER_CLASS, "epochs": 2, "folds": 4,
        "val-fraction": 0.2, "batch-size": 16})
    run = run_central(config, "single", show_progress=False)
    own, split = load_configured_site(config, 0)
    return config, load_site_model(run / f"site-{site}" / "model"), own, split, run


@pytest.fixture(scope="module")
def model_a(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, SiteModel, Site, Split, Path]:
    return _train(SITE_A, tmp_path_factory.mktemp("shift-a"))


@pytest.fixture(scope="module")
def model_b(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, SiteModel, Site, Split, Path]:
    return _train(SITE_B, tmp_path_factory.mktemp("shift-b"))


def _other(config: Config, name: str) -> Site:
    return load_site(DATA / name, config.cache_size, max_per_class=OTHER_PER_CLASS, seed=1)


def test_warning_fires_on_the_other_site_and_not_on_the_own_test_fold(model_a: tuple) -> None:
    """A constant score fails one of the two rates: it flags everything or nothing."""
    config, site_model, own, split, _ = model_a
    profile = site_model.card["shift"]
    at_home = check_shift(profile, SITE_A, site_model.model, own.images[split.test], config.image_size)
    away = check_shift(profile, SITE_A, site_model.model, _other(config, SITE_B).images, config.image_size)
    assert at_home.scores.flagged.mean() <= MAX_FPR
    assert away.scores.flagged.mean() >= MIN_TPR_A_TO_B
    assert not at_home.batch["shifted"] and away.batch["shifted"]
    assert profile["validation_flagged"] <= 2 * profile["alpha"]


def test_batch_test_catches_a_narrow_source_inside_a_broad_training_site(model_b: tuple) -> None:
    """Site A's images lie, one by one, inside Site B's broad range (few are flagged: per image the check cannot
    tell them apart), but as a whole they are unlike Site B's: the batch test fires on them and not on Site B's own
    test fold, and names a cue statistic."""
    config, site_model, own, split, _ = model_b
    profile = site_model.card["shift"]
    at_home = check_shift(profile, SITE_B, site_model.model, own.images[split.test], config.image_size)
    away = check_shift(profile, SITE_B, site_model.model, _other(config, SITE_A).images, config.image_size)
    assert at_home.scores.flagged.mean() <= MAX_FPR
    assert not at_home.batch["shifted"] and away.batch["shifted"] and away.batch["p_value"] < 1e-6
    assert away.batch["most_shifted"][0]["statistic"] in profile["cues"]["features"]


def test_profile_holds_aggregates_only(model_a: tuple) -> None:
    _, site_model, _, split, _ = model_a
    profile = site_model.card["shift"]
    assert (profile["train_images"], profile["validation_images"]) == (len(split.train), len(split.val))

    def lengths(v: object) -> list[int]:
        if isinstance(v, dict):
            return [n for x in v.values() for n in lengths(x)]
        if isinstance(v, list):
            return [len(v)] + [n for x in v for n in lengths(x)]
        return []

    # no array with one entry per training or validation image
    assert not {len(split.train), len(split.val)} & set(lengths(profile))
    for part in ("cues", "embedding"):
        weights = np.array(profile[part]["mixture"]["weights"])
        assert weights.sum() == pytest.approx(1.0, abs=1e-5)
        assert (weights * profile["train_images"]).min() >= MIN_COMPONENT_IMAGES - 1e-3
    assert len(profile["cues"]["quantiles"][0]) == len(LEVELS)


def test_too_few_images_give_no_profile() -> None:
    model = torch.nn.Identity()  # never reached: the counts are checked first
    assert shift_profile(model, torch.zeros(10, 1, 8, 8, dtype=torch.uint8), torch.zeros(20, 1, 8, 8, dtype=torch.uint8),
                         8) is None


def test_ks_against_quantiles_is_a_tight_lower_bound_of_scipys() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=2000)
    q = np.quantile(reference, LEVELS)
    for shift in (0.0, 0.3, 1.0):
        x = rng.normal(shift, 1.0, 300)
        exact = ks_2samp(x, reference).statistic
        d, _ = _ks(x, q, len(reference))
        assert exact - 0.05 <= d <= exact + 1e-9
    grey = rng.integers(250, 256, 2000).astype(float)  # ties: grey levels, as the percentile statistics have
    same = rng.integers(250, 256, 300).astype(float)
    assert _ks(same, np.quantile(grey, LEVELS), 2000)[0] <= ks_2samp(same, grey).statistic + 1e-9
    assert _ks(same, np.quantile(grey, LEVELS), 2000)[1] > 0.01


def test_mixture_distance_is_the_mahalanobis_distance_to_the_nearest_component() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    covs = np.stack([a @ a.T + np.eye(4), np.eye(4) * 2])
    means = np.array([[0.0, 0, 0, 0], [5.0, 5, 5, 5]])
    x = rng.normal(size=(20, 4)) * 3
    expected = [min(mahalanobis(v, m, np.linalg.inv(c)) for m, c in zip(means, covs)) for v in x]
    np.testing.assert_allclose(Mixture(np.array([0.5, 0.5]), means, covs).distance(x), expected, rtol=1e-9)


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_predict_writes_scores_flags_and_warns(model_a: tuple, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """40 Site B images with their patient ids: columns, per-patient majority flags, the JSON summary and the
    warning; the check uses the site's own BN, so --bn adapt leaves the scores unchanged."""
    *_, run = model_a
    rows = [r for r in read_manifest(DATA / SITE_B / "manifest.csv") if r["patient_id"]]
    chosen = sorted(rows, key=lambda r: (r["patient_id"], r["path"]))[:40]
    folder = tmp_path / "in"
    for r in chosen:
        (folder / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DATA / SITE_B / r["path"], folder / r["path"])
    write_manifest(folder / "manifest.csv", [{"path": r["path"], "patient_id": r["patient_id"]} for r in chosen])
    model_dir = run / f"site-{SITE_A}" / "model"
    with caplog.at_level(logging.WARNING):
        out = run_predict(model_dir, [folder], tmp_path / "p.csv", show_progress=False)
    assert any("SHIFT:" in r.getMessage() and "as a whole" in r.getMessage() for r in caplog.records)
    images = _read(out)
    flags = np.array([int(r["shift_flag"]) for r in images])
    scores = np.array([float(r["shift_score"]) for r in images])
    np.testing.assert_array_equal(flags, (scores > 1).astype(int))
    by_patient: dict[str, list[int]] = {}
    pid = {str((folder / r["path"]).resolve()): r["patient_id"] for r in chosen}
    for r in images:
        by_patient.setdefault(pid[str(Path(r["path"]).resolve())], []).append(int(r["shift_flag"]))
    for p in _read(tmp_path / "p_patients.csv"):
        member = by_patient[p["patient_id"]]
        assert float(p["shift_fraction"]) == pytest.approx(np.mean(member))
        assert int(p["shift_flag"]) == int(np.mean(member) > 0.5)
    summary = json.loads((tmp_path / "p_shift.json").read_text())
    assert summary["flagged"] == flags.sum() and summary["images"] == len(images) == 40
    assert summary["batch_shifted"] and summary["patients"]["n"] == len(by_patient)
    adapted = run_predict(model_dir, [folder], tmp_path / "q.csv", bn="adapt", show_progress=False)
    np.testing.assert_allclose([float(r["shift_score"]) for r in _read(adapted)], scores, rtol=1e-4)


def test_evaluate_reports_shift_and_records_the_unseen_auc_in_the_card(model_a: tuple, tmp_path: Path) -> None:
    _, _, _, _, run = model_a
    out = evaluate_unseen(run, DATA / SITE_B, "adapt", tmp_path / "unseen", max_per_class=40)
    final = json.loads((out / "final_metrics.json").read_text())
    rows = _read(out / "predictions.csv")
    assert final["shift"]["flagged"] == sum(int(r["shift_flag"]) for r in rows) and len(rows) == 80
    assert final["shift"]["batch_shifted"] and list(final["shift"]["sites"]) == [SITE_A]
    patients = _read(out / "patients.csv")
    assert final["shift"]["patients"] == {"n": len(patients), "flagged": sum(int(p["shift_flag"]) for p in patients)}
    card = load_site_model(run / f"site-{SITE_A}" / "model").card
    recorded = card["unseen_site_auc"][SITE_B]
    assert (recorded["auc"], recorded["n"], recorded["bn"]) == (final["sites"][SITE_B]["auc"], 80, "adapt")


def test_a_federated_site_records_its_profile_with_its_final_model(tmp_path: Path) -> None:
    """The ClientApp's final summary writes the card: its profile is the one of the site's own final model and
    split (80 + 80 images per site, one round)."""
    run_federation(tmp_path, method="fedbn", overrides="max-per-class=80", **{"num-server-rounds": 1})
    run = run_dir(tmp_path)
    for index, name in enumerate((SITE_A, SITE_B)):
        loaded = load_site_model(run / f"site-{name}" / "model")
        site, split = load_configured_site(loaded.config, index)
        expected = shift_profile(loaded.model, site.images[split.train], site.images[split.val],
                                 loaded.config.image_size, seed=loaded.config.seed)
        assert expected is not None and loaded.card["shift"] == json.loads(json.dumps(expected))
