"""The in-process federation (fl_covid.experiments.federation: the real ServerApp and ClientApps, no SuperLink,
no Ray) with a record of every message, for tests.

``RecordingGrid`` records each delivery: the message as the site received it, the site's context just before,
the BatchNorm tensors the site's model held right after loading its weights (what it trained or evaluated with;
observed through fl_covid.observe, nothing is patched) and the reply as it left the site; ``tamper`` may change
or drop a reply before the server sees it. The server's prototype bank is recorded after each round's
aggregation. ``replay`` reruns a recorded delivery.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto

from fl_covid import records as R
from fl_covid.experiments.federation import LocalGrid, default_run_config, run_in_process, wire
from fl_covid.model import bn_keys
from fl_covid.observe import watching
from fl_covid.prototypes import PrototypeBank

RUN_ID = 4242
# A few steps per round keep a smoke round at about a second on two CPU cores.
SMOKE = {"config-file": "configs/smoke.yaml", "local-steps": 3}

DROPPED_REPLY_TIMEOUT_S = 1.0
Tamper = Callable[[int, Message], Message | None]
__all__ = ["Delivery", "RecordingGrid", "copy_context", "run_dir", "run_federation", "shared_run", "wire"]


def copy_context(context: Context) -> Context:
    return context_from_proto(context_to_proto(context))


@dataclass
class Delivery:
    """One server -> site message as the site received it, the site's context just before it, the BN tensors of
    the site's model right after it loaded its weights (by module type), and the reply as it left the site."""

    node_id: int
    partition: int
    message: Message
    context_before: Context
    loaded_bn: dict[str, torch.Tensor] | None
    reply: Message

    @property
    def kind(self) -> str:
        """``train``, or ``evaluate`` for the summary message that starts a round (and the final one)."""
        return self.message.metadata.message_type

    @property
    def round(self) -> int:
        return int(self.message.content[R.CONFIG][R.ROUND])


class RecordingGrid(LocalGrid):
    """A LocalGrid that records every delivery and may tamper with replies (``None`` drops one); the recorded
    reply stays the genuine one."""

    def __init__(self, run_config: dict[str, Any], num_nodes: int, run_id: int = RUN_ID,
                 tamper: Tamper | None = None, node_config: dict[str, Any] | None = None) -> None:
        super().__init__(run_config, num_nodes, run_id, node_config)
        self.tamper = tamper
        self.deliveries: list[Delivery] = []
        self.sent: list[Message] = []
        self.banks: dict[int, PrototypeBank] = {}  # server round -> the bank its train message carried
        self._loaded: dict[str, torch.Tensor] | None = None
        self._replays = 0

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        for m in messages:
            if R.PROTOTYPES in m.content and m.metadata.message_type == "train":
                self.banks[int(m.content[R.CONFIG][R.ROUND])] = R.read_bank(m.content[R.PROTOTYPES], 128, 1000)
        return super().push_messages(messages)

    def deliver(self, msg: Message, context: Context) -> Message | None:
        self.sent.append(wire(msg))
        before = copy_context(context)
        self._loaded = None
        reply = super().deliver(msg, context)
        self.deliveries.append(Delivery(msg.metadata.dst_node_id, self.partition(msg.metadata.dst_node_id),
                                        msg, before, self._loaded, reply))
        seen = wire(reply)
        return self.tamper(self.partition(msg.metadata.dst_node_id), seen) if self.tamper is not None else seen

    def replay(self, delivery: Delivery, content: RecordDict | None = None) -> Message:
        """Rerun a recorded delivery, optionally with other content, on a copy of the site's folder (state of the
        earlier rounds) under a fresh ``<run name>-replay-<n>`` run name, so the run's own files stay as they were."""
        msg = wire(delivery.message)
        if content is not None:
            msg.content = content
        name = str(msg.content[R.CONFIG][R.RUN_NAME])
        self._replays += 1
        replay_name = f"{name}-replay-{self._replays}"
        root = Path(self.run_config["output-dir"])
        for site_dir in (root / name).glob("site-*"):
            shutil.copytree(site_dir, root / replay_name / site_dir.name)
        msg.content[R.CONFIG][R.RUN_NAME] = replay_name
        return wire(self.call(msg, copy_context(delivery.context_before)))

    def delivery(self, partition: int, server_round: int, kind: str = "train") -> Delivery:
        """The delivery of ``kind`` to a site in a round: ``train``, or ``evaluate`` for the summary message at
        the start of round ``server_round`` (which evaluates the weights after round ``server_round - 1``)."""
        return next(d for d in self.deliveries
                    if d.partition == partition and d.round == server_round and d.kind == kind)

    @contextmanager
    def observing(self) -> Iterator[None]:
        """Record the BN a site's model holds right after loading its weights."""

        def observe(event: str, payload: dict[str, Any]) -> None:
            if event == "loaded":
                keys = bn_keys(payload["model"])
                self._loaded = {k: v.detach().clone() for k, v in payload["model"].state_dict().items() if k in keys}

        with watching(observe):
            yield


def run_federation(output_dir: Path, num_sites: int = 2, tamper: Tamper | None = None,
                   node_config: dict[str, Any] | None = None, run_id: int = RUN_ID, **values: Any) -> RecordingGrid:
    """Run the real ServerApp on an in-process grid of ``num_sites`` ClientApps; returns the grid (with its
    record of every message). ``values`` are run-config keys (``method``, ``num-server-rounds``, ...);
    ``node_config`` is added to every site's node config (policy keys). With ``tamper``, round-timeout is
    DROPPED_REPLY_TIMEOUT_S unless ``overrides`` sets it: the server waits that long for a dropped reply."""
    if tamper is not None and "round-timeout" not in str(values.get("overrides", "")):
        # a dropped reply is a site that never answers: the server waits for it until round-timeout
        values["overrides"] = f"{values.get('overrides', '')} round-timeout={DROPPED_REPLY_TIMEOUT_S}".strip()
    config = default_run_config(**{**SMOKE, "output-dir": str(output_dir), **values})
    grid = RecordingGrid(config, num_sites, run_id=run_id, tamper=tamper, node_config=node_config)
    with grid.observing():
        run_in_process(grid)
    return grid


def run_dir(output_dir: Path) -> Path:
    """The run directory the server wrote under ``output_dir`` (the one holding config.json)."""
    dirs = [p.parent for p in output_dir.glob("*/config.json")]
    if len(dirs) != 1:
        raise AssertionError(f"expected one run directory under {output_dir}, found {dirs}")
    return dirs[0]


@cache
def shared_run(method: str, rounds: int = 2) -> tuple[RecordingGrid, Path]:
    """A two-site smoke federation of ``method``, run once per test session and shared read-only by tests;
    returns the grid and the output folder."""
    output = Path(tempfile.mkdtemp(prefix=f"fl-covid-{method}-"))
    atexit.register(shutil.rmtree, output, ignore_errors=True)
    return run_federation(output, method=method, **{"num-server-rounds": rounds}), output
