"""An in-process Flower federation for tests: the real ServerApp and ClientApp, no SuperLink and no Ray.

``InProcessGrid`` is a ``flwr.serverapp.Grid`` that hands each message straight to the real ClientApp, one
persistent ``Context`` per node (node config ``{partition-id, num-partitions}`` as in a simulation). Every message
crosses Flower's own protobuf serialisation in both directions, as it would on the wire, so a site never shares
an object with the server. Every delivery is recorded: the message as the site received it, the site's context
just before, the BatchNorm tensors the site's model held right after loading its weights (what it trained or
evaluated with), and the reply as it left the site. The server's prototype bank is recorded after each round's
aggregation. ``replay`` reruns a recorded delivery on a copy of the site's context.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import tomllib
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from clients import client_app
from fl_covid import records as R
from fl_covid.model import bn_keys
from fl_covid.observe import watching
from fl_covid.prototypes import PrototypeBank
from server import server_app

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
RUN_ID = 4242
FIRST_NODE_ID = 9_000_001
# A few steps per round keep a smoke round at about a second on two CPU cores.
SMOKE = {"config-file": "configs/smoke.yaml", "local-steps": 3}

Tamper = Callable[[int, Message], Message | None]


def wire(msg: Message) -> Message:
    """A copy of ``msg`` as the other end receives it (Flower's protobuf serialisation)."""
    return message_from_proto(message_to_proto(msg))


def copy_context(context: Context) -> Context:
    return context_from_proto(context_to_proto(context))


@contextmanager
def task_identity(run_id: int) -> Iterator[None]:
    """The ServerApp process's identity, which ``Message(...)`` reads when it builds an instruction message
    (``run_id``, ``src_node_id`` = the SuperLink, ``src_task_id``); restored afterwards."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


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
        return self.message.metadata.message_type

    @property
    def round(self) -> int:
        return int(self.message.content[R.CONFIG][R.ROUND])


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process.

    ``tamper(partition, reply)`` may replace a site's reply before the server sees it (``None`` drops it); the
    recorded reply stays the genuine one.
    """

    def __init__(self, run_config: dict[str, Any], num_nodes: int, run_id: int = RUN_ID,
                 tamper: Tamper | None = None, node_config: dict[str, Any] | None = None) -> None:
        self._run = Run.create_empty(run_id)
        self.run_config = run_config
        self.contexts = {
            FIRST_NODE_ID + i: Context(run_id=run_id, node_id=FIRST_NODE_ID + i,
                                       node_config={"partition-id": i, "num-partitions": num_nodes,
                                                    **(node_config or {})},
                                       state=RecordDict(), run_config=dict(run_config))
            for i in range(num_nodes)}
        self.tamper = tamper
        self.deliveries: list[Delivery] = []
        self.sent: list[Message] = []
        self.banks: dict[int, PrototypeBank] = {}  # server round -> the server's bank after aggregation
        self._pending: dict[str, Message] = {}
        self._loaded: dict[str, torch.Tensor] | None = None
        self._replays = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def partition(self, node_id: int) -> int:
        return int(self.contexts[node_id].node_config["partition-id"])

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # the SuperLink's job
            self.sent.append(wire(msg))
            received = wire(msg)
            context = self.contexts[msg.metadata.dst_node_id]
            before = copy_context(context)
            self._loaded = None
            reply = self._call(received, context)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            left = wire(reply)
            self.deliveries.append(Delivery(msg.metadata.dst_node_id, self.partition(msg.metadata.dst_node_id),
                                            received, before, self._loaded, left))
            seen = wire(left)
            if self.tamper is not None:
                seen = self.tamper(self.partition(msg.metadata.dst_node_id), seen)
            if seen is not None:
                self._pending[msg.metadata.message_id] = seen
            ids.append(msg.metadata.message_id)
        return ids

    @staticmethod
    def _call(msg: Message, context: Context) -> Message:
        """Run the ClientApp; an exception becomes an error reply, as a SuperNode sends it."""
        try:
            return client_app.app(msg, context)
        except Exception as ex:  # noqa: BLE001 - the SuperNode turns any ClientApp exception into a reply
            log.exception("ClientApp raised an exception")
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"), reply_to=msg)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(i) for i in list(message_ids) if i in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

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
        return wire(client_app.app(msg, copy_context(delivery.context_before)))

    def delivery(self, partition: int, server_round: int, kind: str = "train") -> Delivery:
        """The delivery of ``kind`` (train or evaluate) to a site in a round."""
        return next(d for d in self.deliveries
                    if d.partition == partition and d.round == server_round and d.kind == kind)

    @contextmanager
    def observing(self) -> Iterator[None]:
        """Record the BN a site's model holds right after loading its weights and the server's bank after each
        round's aggregation (fl_covid.observe: nothing of the product is patched)."""

        def observe(event: str, payload: dict[str, Any]) -> None:
            if event == "loaded":
                model = payload["model"]
                keys = bn_keys(model)
                self._loaded = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
            elif event == "aggregated":
                self.banks[payload["round"]] = payload["bank"]

        with watching(observe):
            yield


def run_config(output_dir: Path, **values: Any) -> dict[str, Any]:
    """The run config Flower would pass: pyproject's ``[tool.flwr.app.config]`` with ``values`` on top."""
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**defaults, **SMOKE, "output-dir": str(output_dir), **values}


def run_federation(output_dir: Path, num_sites: int = 2, tamper: Tamper | None = None,
                   node_config: dict[str, Any] | None = None, run_id: int = RUN_ID, **values: Any) -> InProcessGrid:
    """Run the real ServerApp on an in-process grid of ``num_sites`` ClientApps; returns the grid (with its
    record of every message). ``values`` are run-config keys (``method``, ``num-server-rounds``, ...);
    ``node_config`` is added to every site's node config (policy keys)."""
    config = run_config(output_dir, **values)
    grid = InProcessGrid(config, num_sites, run_id=run_id, tamper=tamper, node_config=node_config)
    with task_identity(run_id), grid.observing():
        server_app.app(grid, Context(run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                                     run_config=config))
    return grid


def run_dir(output_dir: Path) -> Path:
    """The run directory the server wrote under ``output_dir`` (the one holding config.json)."""
    dirs = [p.parent for p in output_dir.glob("*/config.json")]
    if len(dirs) != 1:
        raise AssertionError(f"expected one run directory under {output_dir}, found {dirs}")
    return dirs[0]


@lru_cache(maxsize=None)
def shared_run(method: str, rounds: int = 2) -> tuple[InProcessGrid, Path]:
    """A two-site smoke federation of ``method``, run once per test session and shared read-only by tests;
    returns the grid and the output folder."""
    output = Path(tempfile.mkdtemp(prefix=f"fl-covid-{method}-"))
    atexit.register(shutil.rmtree, output, ignore_errors=True)
    return run_federation(output, method=method, **{"num-server-rounds": rounds}), output
