"""Processes on this machine (Linux /proc, ``fl_covid.processes``): the process tree of a Flower run and its memory,
sampled while the run goes on; stopping a process tree; worker processes started together and timed over the same
window.

The processes of a `flwr run` are found by the private FLWR_HOME on their command lines
(``fl_covid.processes.pids_mentioning``), then every descendant of those.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_covid.experiments.federation import FlowerCLI
from fl_covid.processes import descendants, memory_mb, pids_mentioning, process_table

REPO = Path(__file__).resolve().parents[1]


def role(cmd: str) -> str:
    """What a process of a Flower simulation is, from its command line."""
    if "ClientAppActor" in cmd:
        return "client"
    if "flwr-simulation" in cmd:
        return "server"  # the ServerApp and the Ray driver share this process
    if "flower-superlink" in cmd or "flower-superexec" in cmd:
        return "superlink"
    return "ray"


class MemorySampler:
    """Samples, every ``interval`` seconds, the RSS of the process tree under every process whose command line
    mentions ``marker``: the peak (VmHWM) of each process and the largest sum over the tree (shared pages count
    once per process, so the sum overstates)."""

    def __init__(self, marker: str, interval: float = 0.2) -> None:
        self.marker, self.interval = marker, interval
        self.peak_mb: dict[int, tuple[str, float]] = {}  # pid -> (role, VmHWM)
        self.peak_total_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            table = process_table()
            total = 0.0
            for pid in descendants(pids_mentioning(self.marker), table):
                try:
                    rss, hwm = memory_mb(pid)
                except OSError:
                    continue
                total += rss
                kind, peak = self.peak_mb.get(pid, ("ray", 0.0))
                if kind == "ray":  # a Ray worker becomes a ClientAppActor only once its actor starts
                    kind = role(table[pid].command)
                self.peak_mb[pid] = (kind, max(hwm, peak))
            self.peak_total_mb = max(self.peak_total_mb, total)
            self._stop.wait(self.interval)

    def summary(self) -> dict[str, Any]:
        by_role: dict[str, list[float]] = {}
        for kind, mb in self.peak_mb.values():
            by_role.setdefault(kind, []).append(round(mb, 1))
        return {"peak_rss_mb_per_client": sorted(by_role.get("client", []), reverse=True),
                "peak_rss_mb_server_process": max(by_role.get("server", [0.0])),
                "peak_rss_mb_whole_simulation": round(self.peak_total_mb, 1),
                "processes_seen": {k: len(v) for k, v in by_role.items()}}


@dataclass
class FlowerRun:
    """A completed `flwr run`: its run directory, wall seconds of the `flwr run` command, memory summary."""

    run_id: int
    run_dir: Path
    wall_seconds: float
    memory: dict[str, Any]

    def json(self, name: str) -> Any:
        return json.loads((self.run_dir / name).read_text())


def flower_run(flower: FlowerCLI, run_config: dict[str, Any], output: Path, method: str) -> FlowerRun:
    """One `flwr run` with the process tree's memory sampled; RuntimeError unless the run finished completed and
    wrote its final metrics (the exit code of `flwr run` is not trusted)."""
    with MemorySampler(str(flower.home)) as sampler:
        started = time.perf_counter()
        run_id, text = flower.run(run_config)
        wall = time.perf_counter() - started
    status = flower.status(run_id) if run_id is not None else "not started"
    run_dir = output / f"{method}-run{run_id}"
    if status != "finished:completed" or not (run_dir / "final_metrics.json").is_file():
        raise RuntimeError(f"flwr run {run_id} ended {status}:\n{text[-3000:]}")
    return FlowerRun(int(run_id), run_dir, wall, sampler.summary())  # type: ignore[arg-type]


def kill_tree(marker: str, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process whose command line mentions ``marker`` and its descendants."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in descendants(pids_mentioning(marker)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(grace)


def run_in_step(commands: list[list[str]], work: Path, timeout: float = 1800.0) -> list[dict[str, Any]]:
    """Start ``commands`` together (from the project folder), each with ``--ready FILE --go FILE`` appended: a
    worker prepares (imports, data, warm-up), creates its ready file and waits for the go file, which appears when
    every worker is ready, so that their timed parts overlap. Returns the JSON each printed as its last line."""
    work.mkdir(parents=True, exist_ok=True)
    go = work / "go"
    go.unlink(missing_ok=True)
    ready = [work / f"ready-{i}" for i in range(len(commands))]
    procs = []
    try:
        for cmd, flag in zip(commands, ready):
            flag.unlink(missing_ok=True)
            procs.append(subprocess.Popen([*cmd, "--ready", str(flag), "--go", str(go)], cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.time() + timeout
        while not all(f.exists() for f in ready):
            if any(p.poll() is not None for p in procs) or time.time() > deadline:
                raise RuntimeError("a worker ended or timed out before it was ready: "
                                   + " | ".join((p.stderr.read() if p.poll() is not None and p.stderr else "")[-1500:]
                                                for p in procs))
            time.sleep(0.05)
        go.touch()
        outputs = [p.communicate(timeout=max(1.0, deadline - time.time())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"worker {p.args} failed ({p.returncode}):\n{err[-3000:]}")
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
