"""Running a federation: the real ServerApp and ClientApps in one process (no SuperLink, no Ray), and `flwr run`
against a private local SuperLink.

``run_in_process`` hands every message the ServerApp sends straight to the real ClientApp, one persistent
``Context`` per node (node config ``{partition-id, num-partitions}`` as in a simulation), each message crossing
Flower's protobuf serialisation in both directions as it would on the wire. Sites run one after the other, so a
run costs its computation and nothing else: no process or actor start-up, no polling. With the same seed and
thread count it gives bitwise the weights of the same run on Ray or on real SuperNodes (tests/test_deploy.py).

``FlowerCLI`` runs ``flwr run`` against a managed local SuperLink in a private ``FLWR_HOME`` with its own ports,
and stops every process under that home on close.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from clients import client_app
from fl_covid.config import project_root
from fl_covid.errors import ConfigError
from fl_covid.processes import pids_mentioning
from server import server_app

log = logging.getLogger(__name__)
FIRST_NODE_ID = 9_000_001


def wire(msg: Message) -> Message:
    """A copy of ``msg`` as the other end receives it (Flower's protobuf serialisation)."""
    return message_from_proto(message_to_proto(msg))


def default_run_config(**values: Any) -> dict[str, Any]:
    """The run config Flower would pass: pyproject's ``[tool.flwr.app.config]`` with ``values`` on top; a key that
    is not in it is refused, as ``flwr run --run-config`` refuses it."""
    defaults = tomllib.loads((project_root() / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    if unknown := sorted(set(values) - set(defaults)):  # Flower refuses them too; other settings go in overrides
        raise ConfigError(f"unknown run-config keys {unknown}; known: {', '.join(sorted(defaults))} (put other "
                          "config keys in 'overrides')")
    return {**defaults, **values}


class LocalGrid(Grid):
    """A Grid whose nodes are calls of the real ClientApp in this process. ``deliver`` runs one message at one
    node and returns the reply as the server receives it; subclasses may observe or alter it."""

    def __init__(self, run_config: dict[str, Any], num_nodes: int, run_id: int = 1,
                 node_config: dict[str, Any] | None = None) -> None:
        self._run = Run.create_empty(run_id)
        self.run_config = run_config
        self.contexts = {
            FIRST_NODE_ID + i: Context(run_id=run_id, node_id=FIRST_NODE_ID + i,
                                       node_config={"partition-id": i, "num-partitions": num_nodes,
                                                    **(node_config or {})},
                                       state=RecordDict(), run_config=dict(run_config))
            for i in range(num_nodes)}
        self._pending: dict[str, Message] = {}

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
            # the message id is the SuperLink's to set; Flower's own link state writes it the same way
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply = self.deliver(wire(msg), self.contexts[msg.metadata.dst_node_id])
            if reply is not None:
                self._pending[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def deliver(self, msg: Message, context: Context) -> Message | None:
        """The ClientApp's reply to ``msg`` as the server receives it; an exception becomes an error reply, as a
        SuperNode sends it."""
        reply = self.call(msg, context)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return wire(reply)

    @staticmethod
    def call(msg: Message, context: Context) -> Message:
        try:
            return client_app.app(msg, context)
        except Exception as ex:
            log.exception("ClientApp raised an exception")
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"), reply_to=msg)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(i) for i in list(message_ids) if i in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(grid: LocalGrid) -> LocalGrid:
    """Run the real ServerApp on ``grid`` (this process takes the ServerApp's identity); returns the grid."""
    run_id = grid.run.run_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    server_app.app(grid, Context(run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                                 run_config=grid.run_config))
    return grid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config_string(values: dict[str, Any]) -> str:
    """Flower ``--run-config`` text: strings in single quotes, numbers and booleans bare."""
    parts = []
    for k, v in values.items():
        if isinstance(v, str):
            if "'" in v:
                raise ConfigError(f"run config value {k}={v!r} contains a single quote, which Flower cannot pass")
            parts.append(f"{k}='{v}'")
        elif isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


class FlowerCLI:
    """``flwr run`` against a private managed local SuperLink (own FLWR_HOME and ports), stopped by PID on close."""

    def __init__(self, federation_config: str, timeout: float | None = None, home: Path | None = None) -> None:
        self.home = home or Path(tempfile.mkdtemp(prefix="fl-covid-flwr-"))
        self.federation_config = federation_config
        self.timeout = timeout
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_DEDUP_LOGS": "0",
        }

    def __enter__(self) -> FlowerCLI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, run_config: dict[str, Any] | str, app: Path | None = None) -> tuple[int | None, str]:
        """Start one run and stream it to the end; returns (run id or None if it did not start, output).
        The exit code of ``flwr run`` is not trusted: check ``status``."""
        text = run_config if isinstance(run_config, str) else run_config_string(run_config)
        cmd = ["flwr", "run", str(app or project_root()), "--stream", "--run-config", text,
               "--federation-config", self.federation_config]
        log.info("%s", " ".join(cmd))
        try:
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=self.timeout)
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            output = f"{e.stdout or ''}{e.stderr or ''}\nflwr run timed out after {self.timeout} s"
        match = re.search(r"Successfully started run (\d+)", output)
        return (int(match.group(1)) if match else None), output

    def status(self, run_id: int) -> str:
        """The run's status from ``flwr ls`` (e.g. ``finished:completed``), or ``unknown: ...``."""
        proc = subprocess.run(["flwr", "ls", "--run-id", str(run_id), "--format", "json"], cwd=project_root(),
                              env=self.env, capture_output=True, text=True, timeout=120)
        try:
            runs = json.loads(proc.stdout)["runs"]
            return next(r["status"] for r in runs if int(r["run-id"]) == run_id)
        except (json.JSONDecodeError, KeyError, StopIteration) as e:
            return f"unknown: flwr ls gave no status ({type(e).__name__}): {(proc.stdout + proc.stderr)[-300:]}"

    def close(self) -> None:
        """Stop the SuperLink (and anything else) started under this private FLWR_HOME, then remove it."""
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            for pid in pids_mentioning(str(self.home)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while pids_mentioning(str(self.home)) and time.time() < deadline:
                time.sleep(0.3)
        shutil.rmtree(self.home, ignore_errors=True)
