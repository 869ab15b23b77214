"""Resuming the real ServerApp from its checkpoint (in process, tests/inprocess.py; the real SuperLink version is
tests/test_deploy.py): a run that fails in round 2 after the sites trained it, resumed, ends with bitwise the
weights of an uninterrupted run; a resume with other settings is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Message

from fl_covid.checkpoint import load_tensors
from fl_covid.errors import ConfigError
from server.strategy import NotEnoughSites
from tests.conftest import SITE_A, SITE_B
from tests.inprocess import run_dir, run_federation, shared_run


def lose_round_2_training():
    """A tamper function: both sites train round 2 (and save their round-2 state), but no reply reaches the
    server, which then stops with NotEnoughSites after its round-1 checkpoint."""
    trained: dict[int, int] = {}

    def tamper(partition: int, reply: Message) -> Message | None:
        if reply.metadata.message_type != "train":
            return reply
        trained[partition] = trained.get(partition, 0) + 1
        return None if trained[partition] == 2 else reply

    return tamper


def test_resumed_run_matches_the_uninterrupted_one(tmp_path: Path) -> None:
    _, reference_out = shared_run("fedbn-proto")
    with pytest.raises(NotEnoughSites, match="round 2"):
        run_federation(tmp_path, tamper=lose_round_2_training(), **{"num-server-rounds": 2})
    folder = run_dir(tmp_path)
    assert json.loads((folder / "checkpoint" / "state.json").read_text())["round"] == 1
    for site in (SITE_A, SITE_B):  # the sites are one round ahead of the server
        assert json.loads((folder / f"site-{site}" / "state" / "state.json").read_text())["round"] == 2
    run_federation(tmp_path, resume=str(folder), **{"num-server-rounds": 2})
    assert [p.parent for p in tmp_path.glob("*/config.json")] == [folder]
    for site in (SITE_A, SITE_B):  # round 2 started again from round 1, read from disk
        started = json.loads((folder / f"site-{site}" / "state" / "state.json").read_text())["started_from"]
        assert started["round"] == 1
    rows = json.loads((folder / "metrics.json").read_text())
    assert sorted((r["round"], r["phase"]) for r in rows).count((2, "train")) == 2  # the lost round is not kept
    resumed = load_tensors(folder / "checkpoint" / "shared.npz")
    reference = load_tensors(run_dir(reference_out) / "checkpoint" / "shared.npz")
    assert resumed.keys() == reference.keys()
    assert all(resumed[k].dtype == reference[k].dtype and torch.equal(resumed[k], reference[k]) for k in resumed)


@pytest.mark.parametrize("method", ["fedadam", "fedyogi", "fedavgm"])
def test_a_resumed_server_optimizer_keeps_its_moments(tmp_path: Path, method: str) -> None:
    """FedAdam's and FedYogi's moments and FedAvgM's momentum live in Flower's strategy: the checkpoint carries
    them, so the resumed run ends bitwise where the uninterrupted one does (without them round 2 restarts the
    moments)."""
    _, reference_out = shared_run(method)
    with pytest.raises(NotEnoughSites, match="round 2"):
        run_federation(tmp_path, method=method, tamper=lose_round_2_training(), **{"num-server-rounds": 2})
    folder = run_dir(tmp_path)
    saved = load_tensors(folder / "checkpoint" / "server-optimizer.npz")
    assert saved and all(v.abs().sum() > 0 for v in saved.values())
    run_federation(tmp_path, method=method, resume=str(folder), **{"num-server-rounds": 2})
    resumed = load_tensors(folder / "checkpoint" / "shared.npz")
    reference = load_tensors(run_dir(reference_out) / "checkpoint" / "shared.npz")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    run_federation(tmp_path, **{"num-server-rounds": 1})
    folder = run_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"seed: saved 0, now 3"):
        run_federation(tmp_path, resume=folder.name, seed=3, **{"num-server-rounds": 1})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_federation(tmp_path, resume=str(tmp_path / "nothing"), **{"num-server-rounds": 1})
