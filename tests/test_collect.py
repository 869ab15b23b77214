"""The ServerApp collects each reply as soon as it arrives, one at a time (server/collect.py): a reply that cannot be
decoded fails its site only, the run goes on under min-sites; polls back off between FIRST_POLL_S and LAST_POLL_S
and start again short after each reply; a site that never answers is left out when round-timeout passes. Real
ServerApp and ClientApps in process, smoke config on real images."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Message
from google.protobuf.message import DecodeError

from fl_covid.experiments.federation import default_run_config, run_in_process
from server import collect
from server.strategy import NotEnoughSites
from tests.conftest import SITE_A, SITE_B
from tests.inprocess import SMOKE, RecordingGrid, run_dir


class CorruptTrainReply(RecordingGrid):
    """Site B's training reply of round 2 fails to decode at every pull, as a reply with a corrupt record body does
    in Flower's pull_messages (it raises before any strategy code sees the reply)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.site_b_train_replies = 0
        self.corrupt_id = ""
        self.corrupt_pulls = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = list(super().push_messages(messages))
        for i in ids:
            reply = self._pending.get(i)
            if reply is not None and reply.metadata.message_type == "train" and self.partition(
                    reply.metadata.src_node_id) == 1:
                self.site_b_train_replies += 1
                if self.site_b_train_replies == 2:
                    self.corrupt_id = i
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        if self.corrupt_id in message_ids:
            self.corrupt_pulls += 1
            raise DecodeError("Error parsing message with type 'flwr.proto.RecordDict'")
        return super().pull_messages(message_ids)


def test_an_undecodable_reply_fails_its_site_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    config = default_run_config(**{**SMOKE, "output-dir": str(tmp_path), "num-server-rounds": 3,
                                   "overrides": "min-sites=1"})
    grid = CorruptTrainReply(config, 2)
    run_in_process(grid)
    assert grid.corrupt_pulls == 1  # pulled once, then counted as the site's failure, never pulled again
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"round 2: rejected training reply of site {SITE_B}" in w and "could not be decoded" in w
               for w in warnings), warnings
    rows = json.loads((run_dir(tmp_path) / "metrics.json").read_text())
    trained = sorted((r["round"], r["site"]) for r in rows if r["phase"] == "train")
    assert trained == [(1, SITE_A), (1, SITE_B), (2, SITE_A), (3, SITE_A), (3, SITE_B)]
    final = json.loads((run_dir(tmp_path) / "final_metrics.json").read_text())
    assert set(final["sites"]) == {SITE_A, SITE_B}


class LateReplies(RecordingGrid):
    """Replies become visible to the server only after ``hidden_pulls`` pulls of their id (a slow site)."""

    def __init__(self, *args, hidden_pulls: int, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.hidden_pulls = hidden_pulls
        self.pulls: dict[str, int] = {}

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        assert len(message_ids) == 1, "one reply at a time"
        (i,) = message_ids
        self.pulls[i] = self.pulls.get(i, 0) + 1
        return super().pull_messages(message_ids) if self.pulls[i] > self.hidden_pulls else []


def test_polls_back_off_and_restart_short_after_a_reply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(collect.time, "sleep", sleeps.append)
    config = default_run_config(**{**SMOKE, "output-dir": str(tmp_path), "num-server-rounds": 1})
    grid = LateReplies(config, 2, hidden_pulls=12)
    run_in_process(grid)
    assert (run_dir(tmp_path) / "final_metrics.json").is_file()
    # every exchange: 12 empty polls of both replies, then both arrive in the same poll
    assert all(n == 13 for n in grid.pulls.values()) and len(grid.pulls) == 3 * 2  # summary, train, final summary
    expected = [min(collect.FIRST_POLL_S * collect.BACKOFF ** k, collect.LAST_POLL_S) for k in range(1, 13)]
    assert sleeps == pytest.approx(expected * 3)
    assert max(sleeps) == collect.LAST_POLL_S


def test_sites_that_never_answer_are_left_out_at_the_round_timeout(tmp_path: Path) -> None:
    config = default_run_config(**{**SMOKE, "output-dir": str(tmp_path), "num-server-rounds": 1,
                                   "overrides": "round-timeout=0.3"})
    with pytest.raises(NotEnoughSites, match=r"round 1: only 0 site\(s\) answered summary"):
        run_in_process(LateReplies(config, 2, hidden_pulls=10 ** 9))
