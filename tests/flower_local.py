"""Run `flwr run .` against a private local SuperLink (own FLWR_HOME and ports) and clean up after it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from fl_covid.protocol import free_port, pids_mentioning

REPO = Path(__file__).resolve().parents[1]


class LocalFlower:
    """A private Flower home whose managed local SuperLink is stopped by PID on exit, also on failure."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_DEDUP_LOGS": "0",
        }

    def __enter__(self) -> "LocalFlower":
        return self

    def __exit__(self, *exc: object) -> None:
        for pid in pids_mentioning(str(self.home)):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        while pids_mentioning(str(self.home)) and time.time() < deadline:
            time.sleep(0.3)
        for pid in pids_mentioning(str(self.home)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def run(self, run_config: str, federation_config: str, timeout: float = 600) -> tuple[int, str]:
        """`flwr run . --stream`; returns (run id, output). The exit code is not trusted (it lies)."""
        proc = subprocess.run(
            ["flwr", "run", ".", "--stream", "--run-config", run_config, "--federation-config", federation_config],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout,
        )
        output = proc.stdout + proc.stderr
        match = re.search(r"Successfully started run (\d+)", output)
        assert match, f"flwr run did not start a run:\n{output[-3000:]}"
        return int(match.group(1)), output

    def status(self, run_id: int) -> str:
        """The run's status from `flwr ls`, e.g. 'finished:completed'."""
        proc = subprocess.run(["flwr", "ls", "--run-id", str(run_id), "--format", "json"], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=60)
        runs = json.loads(proc.stdout)["runs"]
        return next(r["status"] for r in runs if int(r["run-id"]) == run_id)
