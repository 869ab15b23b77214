"""State folders on synthetic tensors: whole-folder atomic replacement, the previous state a site can go back to,
recovery from a process killed mid-save, and the server state a run resumes from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fl_covid.checkpoint import ServerState, StateStore, load_tensors, tensor_digest
from fl_covid.config import load_config
from fl_covid.errors import ConfigError
from fl_covid.federated import LocalState
from fl_covid.prototypes import PrototypeBank


def group(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3, 2), value), "n": torch.tensor(int(value))}


def test_save_replaces_the_whole_folder_and_keeps_the_previous_round(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "site-a")
    store.save({"bn": group(1.0), "optimizer": group(10.0)}, {"round": 1})
    store.save({"bn": group(2.0)}, {"round": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-a", "site-a.previous"]
    assert sorted(p.name for p in (tmp_path / "site-a").iterdir()) == ["bn.npz", "state.json"]  # no stale group
    tensors, meta = store.load(("bn", "optimizer"))
    assert meta["round"] == 2 and set(tensors) == {"bn"} and tensors["bn"]["w"].eq(2.0).all()
    tensors, meta = store.load(("bn", "optimizer"), max_round=1)
    assert meta["round"] == 1 and tensors["optimizer"]["w"].eq(10.0).all()
    assert store.load(("bn",), max_round=0) is None


def test_saving_a_round_again_keeps_the_round_before(tmp_path: Path) -> None:
    """A site that trained round 2 for a run the server never completed trains round 2 again after the resume:
    round 1 must stay available, however often that happens."""
    folder = tmp_path / "site-b"
    for rnd, value in ((1, 1.0), (2, 2.0), (2, 3.0), (2, 4.0)):
        LocalState(group(value), group(-value), rnd).save(folder)
    assert LocalState.load(folder).bn["w"].eq(4.0).all()
    back = LocalState.load(folder, max_round=1)
    assert back.round == 1 and back.bn["w"].eq(1.0).all() and back.optimizer["w"].eq(-1.0).all()


def test_a_save_killed_between_the_renames_leaves_the_previous_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "checkpoint")
    store.save({"shared": group(1.0)}, {"round": 1})
    store.save({"shared": group(2.0)}, {"round": 2})
    os.rename(tmp_path / "checkpoint", tmp_path / ".checkpoint.tmp-killed")  # as if killed mid-swap
    tensors, meta = store.load(("shared",))
    assert meta["round"] == 1 and tensors["shared"]["w"].eq(1.0).all()
    store.save({"shared": group(3.0)}, {"round": 3})  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.previous"]
    assert load_tensors(tmp_path / "checkpoint" / "shared.npz")["w"].eq(3.0).all()


def test_a_folder_that_is_not_a_state_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "site-a").mkdir()
    (tmp_path / "site-a" / "notes.txt").write_text("not ours")
    with pytest.raises(FileExistsError, match="not a saved state"):
        StateStore(tmp_path / "site-a").save({"bn": group(1.0)}, {"round": 1})
    assert (tmp_path / "site-a" / "notes.txt").read_text() == "not ours"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tensor_digest_sees_names_dtypes_and_bits() -> None:
    a = group(1.0)
    assert tensor_digest(a) == tensor_digest({k: v.clone() for k, v in reversed(a.items())})
    assert tensor_digest(a) != tensor_digest({**a, "w": a["w"].double()})
    assert tensor_digest(a) != tensor_digest({**a, "w": a["w"].clone().index_fill_(0, torch.tensor([2]), 1.0 + 1e-7)})
    assert tensor_digest(a) != tensor_digest({"v": a["w"], "n": a["n"]})


def test_server_state_round_trip_and_resume_check(tmp_path: Path) -> None:
    config = load_config("configs/smoke.yaml").to_dict()
    bank = PrototypeBank.of_site(0, torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([3, 5])).merge(
        PrototypeBank.of_site(1, torch.randn(1, 4), torch.tensor([1]), torch.tensor([7])))
    rows = [{"round": 1, "phase": "evaluate", "site": "a", "auc": 0.5, "roc-tpr": [0.0, 1.0]}]
    ServerState(1, group(1.5), bank, rows, config).save(tmp_path / "checkpoint")
    saved = ServerState.load(tmp_path / "checkpoint")
    assert saved.round == 1 and saved.history == rows and saved.config == config
    assert all(torch.equal(saved.shared[k], v) for k, v in group(1.5).items())
    for name in ("vectors", "labels", "sites", "counts"):
        assert torch.equal(getattr(saved.bank, name), getattr(bank, name))
    saved.check_config({**config, "output-dir": "/elsewhere", "round-timeout": 60.0}, tmp_path)
    with pytest.raises(ConfigError, match=r"seed: saved 0, now 1.*num-server-rounds: saved 20, now 30|"
                                          r"num-server-rounds: saved 20, now 30.*seed: saved 0, now 1"):
        saved.check_config({**config, "seed": 1, "num-server-rounds": 30}, tmp_path)
    assert ServerState.load(tmp_path / "nothing") is None
