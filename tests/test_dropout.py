"""A site that does not answer a round (tests/inprocess.py drops its reply, as a round-timeout would): the server
names it, goes on with the sites that answered when config key min-sites allows, and otherwise stops with an
error instead of finishing a run without results. Real ServerApp and ClientApp, smoke config on real images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from flwr.app import Message

from server.strategy import NotEnoughSites
from tests.conftest import SITE_A, SITE_B
from tests.inprocess import run_dir, run_federation


def drop(partition: int, kind: str, server_round: int):
    """A tamper function that drops ``partition``'s ``kind`` reply of ``server_round``."""
    seen: dict[str, int] = {}

    def tamper(p: int, reply: Message) -> Message | None:
        if p != partition:
            return reply
        t = reply.metadata.message_type
        seen[t] = seen.get(t, 0) + 1
        return None if (t, seen[t]) == (kind, server_round) else reply

    return tamper


def test_round_goes_on_without_a_silent_site_when_min_sites_allows(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="server.strategy")
    run_federation(tmp_path, tamper=drop(1, "train", 2), overrides="min-sites=1",
                   **{"num-server-rounds": 2})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"round 2: site {SITE_B} (node" in w and "did not answer training in time" in w
               for w in warnings), warnings
    rows = json.loads((run_dir(tmp_path) / "metrics.json").read_text())
    assert sorted((r["round"], r["phase"], r["site"]) for r in rows if r["round"] == 2) == [
        (2, "evaluate", SITE_A), (2, "evaluate", SITE_B), (2, "train", SITE_A)]
    final = json.loads((run_dir(tmp_path) / "final_metrics.json").read_text())
    assert set(final["sites"]) == {SITE_A, SITE_B}


def test_run_stops_with_an_error_below_min_sites(tmp_path: Path) -> None:
    with pytest.raises(NotEnoughSites, match=r"round 1: only 1 site\(s\) answered training .* at least 2 .*min-sites"):
        run_federation(tmp_path, tamper=drop(0, "train", 1), **{"num-server-rounds": 2})
    assert not (run_dir(tmp_path) / "final_metrics.json").exists()
    assert not (run_dir(tmp_path) / "checkpoint").exists()
