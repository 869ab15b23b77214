"""Decisions pooled over folds: the pooled validation AUC against sklearn on the concatenation, the rule (highest
worst-site pooled AUC), variants named by their protocol folder, the frontier's rows, bytes and figure."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fl_covid.experiments.decide import load_fold_runs, main, shared_values, write_decision
from fl_covid.experiments.report import ReportError

SITES = ("site_a_sarscov2", "site_b_covidct")


def fold_run(root: Path, variant: str, method: str, fold: int, seed: int, val: dict[str, tuple[list, list]],
             test_auc: float, **config: object) -> Path:
    """``root/variant/fold<f>-seed<s>/run/`` as fl-covid-protocol leaves it, with chosen validation predictions."""
    run = root / variant / f"fold{fold}-seed{seed}" / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"sites": list(SITES), **config}))
    metrics = {"accuracy": 0.5, "f1": 0.5, "sensitivity": 0.5, "precision": 0.5, "specificity": 0.5,
               "auc": test_auc, "n": 10}
    (run / "final_metrics.json").write_text(json.dumps({"method": method, "sites": {s: metrics for s in SITES},
                                                        "protocol": "grouped", "fold": fold, "seed": seed}))
    for site, (labels, probs) in val.items():
        (run / f"site-{site}").mkdir()
        with (run / f"site-{site}" / "val_predictions.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "prob_covid"])
            w.writerows([f"img{i}.png", y, p] for i, (y, p) in enumerate(zip(labels, probs)))
    return run


def test_pooled_auc_rule_and_frontier(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pooled: dict[tuple[str, str], tuple[list, list]] = {}
    # 'long' has the higher mean over the sites, 'short' the higher worst site
    quality = {("short", SITES[0]): 1.0, ("short", SITES[1]): 1.0, ("long", SITES[0]): 6.0, ("long", SITES[1]): 0.85}
    for variant, steps, rounds in (("short", 10, 63), ("long", 105, 6)):
        for fold in range(2):
            val = {}
            for site in SITES:
                y = rng.integers(0, 2, 400)
                p = 1 / (1 + np.exp(-(quality[variant, site] * (2 * y - 1) + rng.normal(0, 1, 400))))
                val[site] = (y.tolist(), p.tolist())
                ys, ps = pooled.setdefault((variant, site), ([], []))
                ys.extend(y.tolist())
                ps.extend(p.tolist())
            fold_run(tmp_path / "runs", variant, "fedbn-proto", fold, 1, val, 0.8 + 0.01 * fold,
                     **{"local-steps": steps, "num-server-rounds": rounds, "width": 0.25})
    fold_run(tmp_path / "runs", "contrastive", "contrastive", 0, 1, {}, 0.85)
    fold_run(tmp_path / "runs", "short", "fedbn-proto", 0, 0, {}, 0.1)  # seed 0, left out below

    out = tmp_path / "decision"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--seeds", "1"]) == 0
    rows = {(r["variant"], r["site"]): r for r in csv.DictReader((out / "validation.csv").open())}
    for key, (ys, ps) in pooled.items():
        assert float(rows[key]["pooled_val_auc"]) == pytest.approx(100 * roc_auc_score(ys, ps))
        assert int(rows[key]["fold_runs"]) == 2 and int(rows[key]["images"]) == 800
    auc = {v: [roc_auc_score(*pooled[v, s]) for s in SITES] for v in ("short", "long")}
    assert np.mean(auc["long"]) > np.mean(auc["short"])  # a rule by the mean would choose 'long'
    chosen = max(auc, key=lambda v: min(auc[v]))
    assert chosen == "short" and f"**Choice: {chosen}**" in (out / "validation.md").read_text()

    front = {(r["variant"], r["site"]): r for r in csv.DictReader((out / "frontier.csv").open())}
    assert front["short", SITES[0]]["local_steps"] == "10" and front["short", SITES[0]]["n_runs"] == "2"
    assert float(front["short", SITES[0]]["test_auc_mean"]) == pytest.approx(80.5)
    assert front["contrastive", SITES[0]]["local_steps"] == ""  # centralized: a line, not a point
    mb = 2 * 63 * shared_values("fedbn-proto", "redesigned", 0.25) * 4 / 1e6
    assert float(front["short", SITES[0]]["mb_per_site"]) == pytest.approx(mb, abs=0.05)
    assert (out / "frontier.png").stat().st_size > 10_000


def test_no_runs_of_the_seeds_is_an_error(tmp_path: Path) -> None:
    fold_run(tmp_path, "v", "fedbn", 0, 0, {}, 0.7, **{"local-steps": 10, "num-server-rounds": 2})
    with pytest.raises(ReportError, match=r"no fold-runs of seeds \[5\]"):
        load_fold_runs([tmp_path], {5})
    with pytest.raises(SystemExit) as exit_:  # argparse: usage and status 2
        main([str(tmp_path), "--out", str(tmp_path / "o"), "--seeds", "x"])
    assert exit_.value.code == 2
    assert write_decision([tmp_path], tmp_path / "o")  # a run without validation files still gives a frontier


def test_paired_differences_against_a_reference(tmp_path: Path) -> None:
    """The difference is the pooled AUC difference on the images both variants hold; the bootstrap interval
    contains it, excludes 0 for a clear gain, and is exactly 0 for identical predictions."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    noise = rng.normal(0, 1, 300)
    scores = {"default": 0.5 * (2 * y - 1) + noise, "better": 1.5 * (2 * y - 1) + noise, "same": None}
    scores["same"] = scores["default"]
    for variant, score in scores.items():
        keep = 300 if variant == "default" else 250  # the reference holds 50 images more: left out of the pairs
        val = {site: (y[:keep].tolist(), (1 / (1 + np.exp(-score[:keep]))).tolist()) for site in SITES}
        fold_run(tmp_path / "runs", variant, "fedbn", 0, 1, val, 0.8, **{"local-steps": 10, "num-server-rounds": 2})
    out = tmp_path / "decision"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--reference", "default"]) == 0
    rows = {(r["variant"], r["site"]): r for r in csv.DictReader((out / "differences.csv").open())}
    assert {v for v, _ in rows} == {"better", "same"}
    better = rows["better", SITES[1]]
    expected = 100 * (roc_auc_score(y[:250], scores["better"][:250]) - roc_auc_score(y[:250], scores["default"][:250]))
    assert int(better["images"]) == 250 and float(better["difference"]) == pytest.approx(expected)
    assert 0 < float(better["ci_low"]) < float(better["difference"]) < float(better["ci_high"])
    same = rows["same", SITES[0]]
    assert float(same["difference"]) == float(same["ci_low"]) == float(same["ci_high"]) == 0
    assert "## Against default (paired bootstrap)" in (out / "validation.md").read_text()
    with pytest.raises(ReportError, match="--reference 'nothing'"):
        write_decision([tmp_path / "runs"], tmp_path / "o", reference="nothing")
