"""A real `flwr run .` on Ray with the tiny config on real CT images: checks run status and written results."""

from __future__ import annotations

import json

import pytest

from fl_covid.experiments.federation import FlowerCLI
from fl_covid.metrics import METRIC_NAMES
from fl_covid.processes import pids_mentioning


@pytest.mark.slow
def test_flwr_run_smoke_writes_results(tmp_path):
    out = tmp_path / "runs"
    home = tmp_path / "flwr-home"
    with FlowerCLI("num-supernodes=2 client-resources-num-cpus=1", home=home) as flower:
        run_id, output = flower.run(
            f"config-file='configs/smoke.yaml' num-server-rounds=1 local-steps=2 output-dir='{out}'")
        assert flower.status(run_id) == "finished:completed", output[-3000:]
        # a centralized method is not a federated run: refused naming the key, nothing written
        joint_id, joint_output = flower.run(f"method='joint' num-server-rounds=1 output-dir='{out}'")
        assert flower.status(joint_id) == "finished:failed"
        assert "config key 'method' is 'joint'" in joint_output, joint_output[-3000:]
    assert not pids_mentioning(str(home)), "the local SuperLink is still running"
    run_dir = out / f"fedbn-proto-run{run_id}"
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["method"] == "fedbn-proto"
    assert set(final["sites"]) == {"site_a_sarscov2", "site_b_covidct"}
    for metrics in final["sites"].values():
        assert all(0.0 <= metrics[k] <= 1.0 for k in METRIC_NAMES)
        assert metrics["n"] > 0
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert {(r["phase"], r["site"]) for r in rows} == {
        (p, s) for p in ("train", "evaluate") for s in ("site_a_sarscov2", "site_b_covidct")}
    assert (run_dir / "roc.png").stat().st_size > 0 and (run_dir / "metrics.csv").is_file()
    assert (run_dir / "checkpoint" / "shared.npz").is_file()
    assert not list(out.glob("joint-run*/final_metrics.json"))
    assert (run_dir / "site-site_a_sarscov2" / "state" / "bn.npz").is_file()
