"""Table I report: aggregation and paired t-tests against hand-computed values, published column, files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fl_covid.experiments.report import (
    ReportError,
    aggregate,
    find_run_dirs,
    holm,
    load_results,
    main,
    paired_tests,
    variant_of,
    write_report,
)
from fl_covid.metrics import ROC_FPR_GRID
from fl_covid.reporting import RunWriter

SITE = "site_a_sarscov2"


def fake_run(root: Path, name: str, method: str, fold: int, seed: int, auc: float, accuracy: float,
             arch: str = "redesigned", protocol: str = "grouped") -> Path:
    """A run directory as the trainers write it (config.json + final_metrics.json), with chosen metrics."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"arch": arch, "sites": [SITE], "exclude-label-conflicts": True}))
    metrics = {"accuracy": accuracy, "f1": 0.5, "sensitivity": 0.5, "precision": 0.5, "specificity": 0.5,
               "auc": auc, "n": 10}
    (run / "final_metrics.json").write_text(json.dumps({
        "method": method, "sites": {SITE: metrics}, "protocol": protocol, "fold": fold, "seed": seed,
        "roc_tpr": {SITE: list(np.sqrt(ROC_FPR_GRID) * auc)}}))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Ours at (fold, seed) (0,0),(1,0),(0,1); FedBN at the same three in another order plus an unpaired (1,1)."""
    root = tmp_path / "runs"
    # names sort differently from (fold, seed), so pairing by position would pair the wrong runs
    fake_run(root, "z-ours-00", "fedbn-proto", 0, 0, 0.80, 0.90)
    fake_run(root, "a-ours-10", "fedbn-proto", 1, 0, 0.90, 0.90)
    fake_run(root, "m-ours-01", "fedbn-proto", 0, 1, 0.85, 0.90)
    fake_run(root, "b-fedbn-01", "fedbn", 0, 1, 0.86, 0.80)
    fake_run(root, "y-fedbn-10", "fedbn", 1, 0, 0.85, 0.80)
    fake_run(root, "c-fedbn-00", "fedbn", 0, 0, 0.70, 0.80)
    fake_run(root, "d-fedbn-11", "fedbn", 1, 1, 0.60, 0.80)
    return root


def test_mean_and_sample_std_match_hand_values(runs: Path) -> None:
    results = [r for d in find_run_dirs([runs]) for r in load_results(d)]
    rows = {row["method"]: row for row in aggregate(results)}
    assert rows["fedbn-proto"]["n_runs"] == 3 and rows["fedbn"]["n_runs"] == 4
    # ours: 80, 90, 85 -> mean 85, squared deviations 25 + 25 + 0 = 50, / 2 -> std 5
    assert rows["fedbn-proto"]["auc_mean"] == pytest.approx(85.0)
    assert rows["fedbn-proto"]["auc_std"] == pytest.approx(5.0)
    # FedBN: 70, 85, 86, 60 -> mean 75.25; squared deviations 27.5625 + 95.0625 + 115.5625 + 232.5625 = 470.75,
    # / 3 = 156.91667 -> std 12.52664
    assert rows["fedbn"]["auc_mean"] == pytest.approx(75.25)
    assert rows["fedbn"]["auc_std"] == pytest.approx(12.52664, abs=1e-5)
    assert rows["fedbn"]["accuracy_mean"] == pytest.approx(80.0) and rows["fedbn"]["accuracy_std"] == pytest.approx(0)


def test_paired_t_test_matches_hand_values(runs: Path) -> None:
    results = [r for d in find_run_dirs([runs]) for r in load_results(d)]
    tests = {t["metric"]: t for t in paired_tests(results)}
    auc = tests["auc"]
    assert (auc["ours"], auc["other"], auc["n_pairs"]) == ("fedbn-proto", "fedbn", 3)  # (1,1) has no partner
    # pairs by (fold, seed): (0,0) 80-70 = 10, (1,0) 90-85 = 5, (0,1) 85-86 = -1
    # mean 14/3 = 4.66667; sd = sqrt((5.33333^2 + 0.33333^2 + 5.66667^2) / 2) = sqrt(30.33333) = 5.50757
    # t = 4.66667 / (5.50757 / sqrt 3) = 1.46760; with 2 degrees of freedom p = 1 - |t| / sqrt(t^2 + 2)
    t = (14 / 3) / (math.sqrt(91 / 3) / math.sqrt(3))
    assert auc["mean_diff"] == pytest.approx(14 / 3)
    assert auc["p_plain"] == pytest.approx(1 - t / math.sqrt(t * t + 2)) and auc["p_plain"] == pytest.approx(
        0.27992, abs=1e-5)
    # Nadeau-Bengio, 4-fold splits (test/train 1/(K-1) = 1/3): variance x (1/3 + 1/3) instead of x 1/3
    t_nb = (14 / 3) / math.sqrt((1 / 3 + 1 / 3) * 91 / 3)
    assert auc["t"] == pytest.approx(t_nb) and auc["p"] == pytest.approx(1 - t_nb / math.sqrt(t_nb ** 2 + 2))
    assert auc["p"] > auc["p_plain"]
    # accuracy differs by exactly 10 points in every pair: no variance, so no t statistic
    assert tests["accuracy"]["mean_diff"] == pytest.approx(10.0)
    assert math.isnan(tests["accuracy"]["t"]) and math.isnan(tests["accuracy"]["p"])


def test_holm_adjustment_matches_hand_values() -> None:
    # sorted 0.01, 0.02, 0.04 of m = 3: 0.03, max(0.03, 0.04), max(0.04, 0.04); NaN untouched and not counted
    adjusted = holm([0.04, 0.01, float("nan"), 0.02])
    assert adjusted[1] == pytest.approx(0.03) and adjusted[3] == pytest.approx(0.04)
    assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[2])
    assert holm([0.5, 0.6]) == [1.0, 1.0]


def test_report_files_published_column_and_statements(runs: Path, tmp_path: Path) -> None:
    fake_run(runs, "contrastive-00", "contrastive", 0, 0, 0.75, 0.7)
    fake_run(runs, "covidnet-00", "single", 0, 0, 0.65, 0.6, arch="covidnet")
    out = tmp_path / "report"
    assert main([str(runs), "--out", str(out)]) == 0
    md = (out / "table.md").read_text()
    assert "`grouped` = stratified K-fold with every patient" in md and "are excluded" in md
    with open(out / "table.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(rows["contrastive"]["published_auc"]) == 96.24
    assert float(rows["single [covidnet]"]["published_auc"]) == 84.08
    assert rows["fedbn-proto"]["published_auc"] == "" and rows["fedbn"]["published_auc"] == ""
    assert float(rows["contrastive"]["auc_mean"]) == pytest.approx(75.0)  # ours, never the published value
    contrastive_line = next(line for line in md.splitlines() if "| contrastive |" in line)
    assert "| 75.00 |  | 75.00 (n=1) | 96.24 |" in contrastive_line  # seed 0 only: no confirmation yet
    with open(out / "ttests.csv", newline="") as f:
        pairs = {(r["ours"], r["other"]) for r in csv.DictReader(f)}
    # ours against every other row, the paper's method against every row but ours (tested once)
    assert pairs == {("fedbn-proto", m) for m in ("fedbn", "contrastive", "single [covidnet]")} | {
        ("contrastive", m) for m in ("fedbn", "single [covidnet]")}
    assert (out / f"roc_{SITE}.png").stat().st_size > 0


def test_same_method_fold_and_seed_twice_is_refused(runs: Path, tmp_path: Path) -> None:
    fake_run(runs, "again-ours-00", "fedbn-proto", 0, 0, 0.5, 0.5)
    with pytest.raises(ReportError, match="appears twice"):
        write_report([runs], tmp_path / "out")
    assert main([str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o")]) == 2


def test_variants_make_one_row_per_protocol_folder(tmp_path: Path) -> None:
    for variant, auc in (("style1.0", 0.6), ("cue0.3", 0.7)):
        folder = tmp_path / "loso" / variant
        for fold in (0, 1):
            fake_run(folder / f"fold{fold}-seed0", "run", "single", fold, 0, auc + fold / 10, 0.5)
        (folder / "protocol.json").write_text("{}")
    with pytest.raises(ReportError, match="appears twice"):  # one method: one row, the same fold-runs twice
        write_report([tmp_path / "loso"], tmp_path / "out")
    write_report([tmp_path / "loso"], tmp_path / "out", by_variant=True)
    rows = {row["method"]: row for row in aggregate(
        [r for d in find_run_dirs([tmp_path / "loso"]) for r in load_results(d, by_variant=True)])}
    assert set(rows) == {"style1.0", "cue0.3"}
    assert rows["cue0.3"]["n_runs"] == 2 and rows["cue0.3"]["auc_mean"] == pytest.approx(75.0)
    assert "| cue0.3 |" in (tmp_path / "out" / "table.md").read_text()


def test_protocols_are_never_pooled(runs: Path, tmp_path: Path) -> None:
    fake_run(runs, "image-ours-00", "fedbn-proto", 0, 0, 0.99, 0.99, protocol="image")
    fake_run(runs, "image-fedbn-00", "fedbn", 0, 0, 0.95, 0.95, protocol="image")
    results = [r for d in find_run_dirs([runs]) for r in load_results(d)]
    rows = {(row["protocol"], row["method"]): row for row in aggregate(results)}
    assert rows[("image", "fedbn-proto")]["n_runs"] == 1 and rows[("grouped", "fedbn-proto")]["n_runs"] == 3
    assert rows[("grouped", "fedbn-proto")]["auc_mean"] == pytest.approx(85.0)
    assert {(t["protocol"], t["n_pairs"]) for t in paired_tests(results)} == {("grouped", 3), ("image", 1)}
    files = write_report([runs], tmp_path / "out")
    assert {f.name for f in files if f.suffix == ".png"} == {f"roc_{SITE}_grouped.png", f"roc_{SITE}_image.png"}


def test_run_writer_stores_roc_tpr_in_final_metrics(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path, "{}")
    tpr = list(np.linspace(0, 1, len(ROC_FPR_GRID)))
    metrics = {"accuracy": 1.0, "f1": 1.0, "sensitivity": 1.0, "precision": 1.0, "specificity": 1.0, "auc": 1.0,
               "n": 4}
    writer.finish("joint", {SITE: metrics}, {SITE: tpr}, protocol="grouped", fold=0, seed=0)
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["roc_tpr"][SITE] == pytest.approx(tpr)
    assert load_results(tmp_path)[0].roc_tpr == pytest.approx(tuple(tpr))


def test_claims_parameters_and_planned_runs(runs: Path, tmp_path: Path) -> None:
    """The claim 'ours above FedBN' on the fixture's 3 pairs (+4.67 points, corrected p 0.42) is not significant;
    claims without runs have no data; parameters are counted per method (width 1.0: the paper's 48.7 M)."""
    for fold, seed, gain in ((0, 0, 0.10), (1, 0, 0.11), (0, 1, 0.09), (1, 1, 0.10)):
        fake_run(runs, f"single-{fold}{seed}", "single", fold, seed, 0.70 + gain, 0.8)
        fake_run(runs, f"joint-{fold}{seed}", "joint", fold, seed, 0.70, 0.8)
    out = tmp_path / "report"
    assert main([str(runs), "--out", str(out), "--planned", "12"]) == 0
    with open(out / "claims.csv", newline="") as f:
        claims = {r["claim"]: r for r in csv.DictReader(f)}
    ours = claims["Ours above FedBN"]
    assert (ours["n_pairs"], ours["verdict"]) == ("3", "not significant")
    assert float(ours["auc_diff"]) == pytest.approx(14 / 3)
    joint = claims["Joint below Single"]
    assert (joint["n_pairs"], joint["verdict"]) == ("4", "holds") and float(joint["auc_diff"]) == pytest.approx(10)
    assert claims["FedBN above FedAvg"]["verdict"] == "no data"
    with open(out / "table.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert rows["joint"]["n_planned"] == "12" and "| 4 / 12 |" in (out / "table.md").read_text()
    assert int(rows["joint"]["parameters_width_1"]) == 48_675_090  # one site in the fixture: one BN
    assert int(rows["single"]["parameters_width_1"]) == 48_675_090
    # seed 0 (development) and the other seeds (confirmation) side by side: single's AUC by seed 80, 81 | 79, 80
    single = rows["single"]
    assert float(single["auc_development_mean"]) == pytest.approx(80.5) and single["n_development"] == "2"
    assert float(single["auc_confirmation_mean"]) == pytest.approx(79.5) and single["n_confirmation"] == "2"
    assert "| 79.50 ± 0.71 (n=2) | 80.50 ± 0.71 (n=2) |" in (out / "table.md").read_text()


def test_variant_of_one_rule_for_report_and_decide(tmp_path: Path) -> None:
    """The protocol folder names a run's variant: protocol.json wins, then the folder above fold<f>-seed<s>."""
    run = tmp_path / "loso" / "style-without-b" / "fold0-seed0" / "20260101-run"
    (run / "unseen-site_b").mkdir(parents=True)
    assert variant_of(run, "single") == "style-without-b"
    assert variant_of(run / "unseen-site_b", "single") == "single"
    (tmp_path / "loso" / "style-without-b" / "protocol.json").write_text("{}")
    assert variant_of(run / "unseen-site_b", "single") == "style-without-b"
    assert variant_of(tmp_path / "lone-run", "single") == "single"
