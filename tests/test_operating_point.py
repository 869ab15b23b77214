"""The operating point chosen on validation, end to end (smoke config, embedded CT images): a real in-process
federation and a real centralized run write each site's threshold (Youden's J on its validation split) and the test
fold's metrics at it into final_metrics.json, equal to recomputing them from the site's own prediction files; the
site's model card carries that threshold and fl-covid-predict decides at it unless --threshold says otherwise."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from fl_covid.centralized import main as central_main
from fl_covid.config import load_config
from fl_covid.data import load_configured_site
from fl_covid.experiments.predict import main as predict_main
from fl_covid.metrics import operating_point
from fl_covid.reporting import summary_lines
from fl_covid.site_model import load_site_model, model_card
from tests.conftest import SITE_A, SITE_B
from tests.inprocess import run_dir, run_federation

YOUDEN_RULE = "Youden's J on the validation split"  # written out: the card's text is part of the interface
DEFAULT_RULE = "0.5 (no validation split with both classes)"
POINT_KEYS = ["threshold", "accuracy", "f1", "sensitivity", "precision", "specificity"]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), P(COVID) (N,)) of a site's predictions CSV (path, label, prob_covid)."""
    rows = read_rows(path)
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["prob_covid"]) for r in rows])


def check_operating_points(run: Path, final: dict) -> None:
    """Every site's operating point in ``final`` is the one its own prediction files give, its model card holds
    that threshold, and the 0.5 metrics are still those at 0.5."""
    assert set(final["operating_point"]) == {SITE_A, SITE_B}
    for site, point in final["operating_point"].items():
        folder = run / f"site-{site}"
        val_labels, val_probs = read_predictions(folder / "val_predictions.csv")
        test_labels, test_probs = read_predictions(folder / "predictions.csv")
        expected = operating_point(val_labels, val_probs, test_labels, test_probs)
        assert list(point) == POINT_KEYS and point == pytest.approx(expected, abs=1e-12)
        assert point["threshold"] != 0.5  # (chosen among the validation scores, none of which is exactly 0.5)
        at_half = final["sites"][site]
        assert at_half["sensitivity"] == pytest.approx(float(np.mean(test_probs[test_labels == 1] >= 0.5)))
        assert at_half["specificity"] == pytest.approx(float(np.mean(test_probs[test_labels == 0] < 0.5)))
        card = json.loads((folder / "model" / "model.json").read_text())
        assert card["threshold"] == point["threshold"] and card["threshold_rule"] == YOUDEN_RULE


def test_a_federation_reports_each_sites_operating_point(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_federation(tmp_path, method="fedbn", **{"num-server-rounds": 1})
    run = run_dir(tmp_path)
    final = json.loads((run / "final_metrics.json").read_text())
    check_operating_points(run, final)
    printed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FINAL fedbn ")]
    assert printed == [f"FINAL fedbn {line}" for line in summary_lines(final)] and len(printed) == 2
    for site, point in final["operating_point"].items():
        line = next(p for p in printed if f" {site}: " in p)
        assert f"threshold {point['threshold']:.3f}: sensitivity {point['sensitivity']:.4f} specificity " \
               f"{point['specificity']:.4f}" in line


@pytest.fixture(scope="module")
def central_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real centralized SepNorm run of one epoch (smoke config); its run directory."""
    out = tmp_path_factory.mktemp("central")
    assert central_main(["--config", "configs/smoke.yaml", "--method", "sepnorm", "--quiet", "--set", "epochs=1",
                         "--set", f"output-dir={out}"]) == 0
    return run_dir(out)


def test_a_centralized_run_reports_each_sites_operating_point(central_run: Path) -> None:
    check_operating_points(central_run, json.loads((central_run / "final_metrics.json").read_text()))


def test_predict_decides_at_the_cards_threshold(central_run: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(central_run / f"site-{SITE_B}" / "model", model)
    images = Path(__file__).resolve().parents[1] / "data" / SITE_B
    inputs = tmp_path / "in"
    inputs.mkdir()
    for label in ("COVID", "NonCOVID"):
        for src in sorted((images / label).iterdir())[:3]:
            shutil.copyfile(src, inputs / f"{label}-{src.name}")
    assert predict_main(["--model", str(model), "--input", str(inputs), "--out", str(tmp_path / "a.csv")]) == 0
    probs = np.array([float(r["prob_covid"]) for r in read_rows(tmp_path / "a.csv")])
    # a card threshold between two of the scores, on the other side of some score than 0.5
    candidates = [(a + b) / 2 for a, b in zip(np.sort(probs)[:-1], np.sort(probs)[1:])]
    card_threshold = next(t for t in candidates if (probs >= t).sum() != (probs >= 0.5).sum())
    card = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**card, "threshold": card_threshold}))
    assert load_site_model(model).threshold == card_threshold

    def decisions(out: str, *options: str) -> list[bool]:
        assert predict_main(["--model", str(model), "--input", str(inputs), "--out", str(tmp_path / out),
                             *options]) == 0
        return [r["prediction"] == "COVID" for r in read_rows(tmp_path / out)]

    assert decisions("card.csv") == (probs >= card_threshold).tolist()
    assert decisions("half.csv", "--threshold", "0.5") == (probs >= 0.5).tolist()


def test_the_card_says_which_rule_chose_its_threshold() -> None:
    config = load_config("configs/smoke.yaml")
    site, split = load_configured_site(config, 0)

    def card(threshold: float | None) -> dict:
        return model_card(config, site, split.train, run="r", method="single", rounds=1, validation=None, shift=None,
                          operating_threshold=threshold)

    chosen, fallback = card(0.25), card(None)
    assert (chosen["threshold"], chosen["threshold_rule"]) == (0.25, YOUDEN_RULE)
    assert (fallback["threshold"], fallback["threshold_rule"]) == (0.5, DEFAULT_RULE)


def test_summary_lines_put_the_operating_point_beside_the_half_threshold() -> None:
    half = {"auc": 0.9, "accuracy": 0.8, "f1": 0.75, "sensitivity": 0.7, "specificity": 0.85, "precision": 0.8,
            "n": 20}
    final = {"sites": {"a": half, "b": half},
             "operating_point": {"a": {"threshold": 0.31, "accuracy": 0.85, "f1": 0.8, "sensitivity": 0.9,
                                       "precision": 0.75, "specificity": 0.8}}}
    a, b = summary_lines(final)
    assert a == ("a: AUC 0.9000 accuracy 0.8000 F1 0.7500 sensitivity 0.7000 specificity 0.8500 precision 0.8000 "
                 "(n=20); at the validation-chosen threshold 0.310: sensitivity 0.9000 specificity 0.8000")
    assert b.startswith("b: AUC 0.9000") and "threshold" not in b  # no operating point: the 0.5 metrics only
