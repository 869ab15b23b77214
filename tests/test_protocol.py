"""The K-fold x seeds runner: centralized folds partition the site by patient and are reused after a restart;
federated fold-runs in one process each (two at a time) with an unseen-site evaluation, an interrupted one run again
beside its remains; a failed `flwr run`
judged by Flower's run status (real `flwr run`, private SuperLink, stopped afterwards)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from fl_covid.config import project_root
from fl_covid.errors import ConfigError
from fl_covid.experiments.federation import run_config_string
from fl_covid.experiments.protocol import main, make_runner, parse_args

SITE_A, SITE_B = "site_a_sarscov2", "site_b_covidct"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_run_config_string_quotes_strings_only() -> None:
    text = run_config_string({"config-file": "/a b/c.yaml", "fold": 2, "lr": 0.5, "resume": "", "flag": True})
    assert text == "config-file='/a b/c.yaml' fold=2 lr=0.5 resume='' flag=true"
    with pytest.raises(ConfigError, match="single quote"):
        run_config_string({"output-dir": "/tmp/it's"})


def test_bad_arguments_fail_before_training(tmp_path: Path) -> None:
    base = ["--config", "configs/smoke.yaml", "--out", str(tmp_path)]
    with pytest.raises(ConfigError, match="leave-out"):
        make_runner(parse_args(["--method", "joint", *base, "--leave-out", "nowhere"]))
    with pytest.raises(ConfigError, match="--bn"):
        make_runner(parse_args(["--method", "joint", *base, "--leave-out", SITE_B, "--bn", f"site:{SITE_B}"]))
    assert main(["--method", "joint", *base, "--seeds", "0"]) == 2
    with pytest.raises(ConfigError, match="--from-seed"):
        make_runner(parse_args(["--method", "joint", *base, "--seeds", "3", "--from-seed", "3"]))


def test_from_seed_runs_only_the_later_seeds(tmp_path: Path) -> None:
    runner = make_runner(parse_args(["--method", "joint", "--config", "configs/smoke.yaml", "--folds", "2",
                                     "--seeds", "5", "--from-seed", "3", "--out", str(tmp_path), "--quiet"]))
    assert [(r.fold, r.seed) for r in runner.runs] == [(0, 3), (1, 3), (0, 4), (1, 4)]


def test_centralized_folds_partition_the_site_by_patient_and_are_reused(tmp_path: Path) -> None:
    out = tmp_path / "protocol"
    argv = ["--method", "joint", "--config", "configs/smoke.yaml", "--folds", "2", "--seeds", "1",
            "--set", f"sites={SITE_B}", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    record = json.loads((out / "protocol.json").read_text())
    assert (record["mode"], record["protocol"], record["folds"], record["seeds"]) == ("centralized", "grouped", 2, [0])
    assert [(r["fold"], r["seed"], r["status"]) for r in record["runs"]] == [(0, 0, "completed"), (1, 0, "completed")]
    patient = {r["path"]: r["patient_id"] for r in read_csv(project_root() / "data" / SITE_B / "manifest.csv")}
    test_paths = []
    for r in record["runs"]:
        final = json.loads((Path(r["run_dir"]) / "final_metrics.json").read_text())
        assert (final["fold"], final["seed"], final["protocol"]) == (r["fold"], r["seed"], "grouped")
        assert Path(r["run_dir"], f"site-{SITE_B}", "model", "model.pt").is_file()
        test_paths.append({row["path"] for row in read_csv(Path(r["run_dir"]) / f"site-{SITE_B}" / "predictions.csv")})
        val = read_csv(Path(r["run_dir"]) / f"site-{SITE_B}" / "val_predictions.csv")  # for pooled decisions
        assert val and not {row["path"] for row in val} & test_paths[-1]
    assert not test_paths[0] & test_paths[1] and len(test_paths[0] | test_paths[1]) == 24  # 12 per class
    assert not {patient[p] for p in test_paths[0]} & {patient[p] for p in test_paths[1]}  # grouped by patient
    before = sorted(p.name for p in out.glob("fold*/*"))
    assert main(argv) == 0  # a second call finds both fold-runs finished and trains nothing
    assert sorted(p.name for p in out.glob("fold*/*")) == before
    assert {r["detail"] for r in json.loads((out / "protocol.json").read_text())["runs"]} == {"done, skipped"}
    with pytest.raises(ConfigError, match="other settings.*epochs"):  # never reuse a run trained otherwise
        make_runner(parse_args([*argv, "--set", "epochs=2"])).run()

    # the committed layout: only the small result files, in the fold-run's folder; a key the saved config lacks
    # (added to the project later) counts as its default, a federation-only key is ignored for a centralized run
    kept = tmp_path / "kept"
    (kept / "fold0-seed0").mkdir(parents=True)
    run0 = Path(record["runs"][0]["run_dir"])
    (kept / "fold0-seed0" / "final_metrics.json").write_text((run0 / "final_metrics.json").read_text())
    saved = json.loads((run0 / "config.json").read_text())
    del saved["cue-augment"]
    saved["fedavg-weights"] = "equal" if saved["fedavg-weights"] == "dataset" else "dataset"
    (kept / "fold0-seed0" / "config.json").write_text(json.dumps(saved))
    kept_argv = [*argv[:argv.index("--out")], "--out", str(kept), "--run-folds", "0", "--quiet"]
    assert main(kept_argv) == 0
    assert sorted(p.name for p in (kept / "fold0-seed0").iterdir()) == ["config.json", "final_metrics.json"]
    saved["cue-augment"] = 0.5
    (kept / "fold0-seed0" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="other settings.*cue-augment"):
        make_runner(parse_args(kept_argv)).run()


def test_stop_after_starts_no_fold_run_past_the_deadline(tmp_path: Path) -> None:
    out = tmp_path / "late"
    runner = make_runner(parse_args(["--method", "joint", "--config", "configs/smoke.yaml", "--folds", "2",
                                     "--seeds", "1", "--jobs", "2", "--out", str(out), "--quiet"]))
    assert not runner.run(deadline=time.monotonic() - 1)
    record = json.loads((out / "protocol.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["pending", "pending"]
    assert not list(out.glob("fold*/*"))
    with pytest.raises(ConfigError, match="--stop-after"):
        make_runner(parse_args(["--method", "joint", "--out", str(out), "--stop-after", "0"]))


def test_federated_fold_runs_in_process_two_at_a_time_with_an_unseen_site(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    argv = ["--method", "fedbn", "--config", "configs/smoke.yaml", "--folds", "2", "--seeds", "1", "--jobs", "2",
            "--set", "num-server-rounds=1", "--set", "local-steps=2", "--leave-out", SITE_B, "--bn", "average",
            "--out", str(out), "--quiet"]
    assert make_runner(parse_args(argv)).run()
    record = json.loads((out / "protocol.json").read_text())
    assert (record["mode"], record["engine"], record["jobs"]) == ("federated", "inprocess", 2)
    assert record["sites"] == [SITE_A] and record["leave_out"] == SITE_B
    assert record["overrides"]["num-threads"] == "1"  # two cores, two fold-runs
    for r in record["runs"]:
        assert r["status"] == "completed", r
        run_dir = Path(r["run_dir"])
        final = json.loads((run_dir / "final_metrics.json").read_text())
        assert (final["method"], final["fold"], final["seed"], list(final["sites"])) == (
            "fedbn", r["fold"], r["seed"], [SITE_A])
        assert (run_dir / "checkpoint" / "shared.npz").is_file()
        assert (run_dir / f"site-{SITE_A}" / "model" / "model.pt").is_file()
        unseen = json.loads((Path(r["unseen"][0]) / "final_metrics.json").read_text())
        assert unseen["bn"] == "average" and unseen["sites"][SITE_B]["n"] == 24
    # fold 0 interrupted after its site wrote its final model: run again beside it, fold 1 reused
    first = Path(record["runs"][0]["run_dir"])
    (first / "final_metrics.json").unlink()
    assert make_runner(parse_args(argv)).run()
    again = json.loads((out / "protocol.json").read_text())["runs"]
    assert again[0]["run_dir"] == str(first.with_name("fedbn-run2")) and again[0]["status"] == "completed"
    assert again[1]["run_dir"] == record["runs"][1]["run_dir"] and again[1]["detail"] == "done, skipped"


@pytest.mark.slow
def test_a_failed_federated_run_is_recorded_as_failed(tmp_path: Path) -> None:
    """Clients that cannot find their data make the run fail; `flwr run` may still exit 0, the runner must not."""
    out = tmp_path / "broken"
    argv = ["--method", "fedbn", "--config", "configs/smoke.yaml", "--protocol", "official", "--seeds", "1",
            "--set", f"sites={SITE_B}", "--set", f"data-root={tmp_path / 'no-data'}", "--set",
            "num-server-rounds=1", "--set", "local-steps=1", "--engine", "flower", "--out", str(out), "--quiet"]
    assert main(argv) == 1
    (run,) = json.loads((out / "protocol.json").read_text())["runs"]
    assert run["status"] == "failed" and "status finished:failed" in run["detail"]
    assert (out / "fold0-seed0" / "flwr-run.log").is_file()
