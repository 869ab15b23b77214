"""The hospital deployment, for real, on loopback: certificates and site keys from deploy/make_*.sh, a SuperLink
with TLS and SuperNode authentication and one SuperNode per site started by deploy/start_*.sh (own FLWR_HOMEs,
free ports), `flwr run` of 2 rounds of the smoke config on the real CT images of both sites.

Checked: an unregistered SuperNode is refused; an uninterrupted run finishes as completed with results of both
sites; in the same run again, Site B's SuperNode is killed after round 1: the run stops as failed naming the
site, Site B's SuperNode is started again as a new process, the server resumes from its round-1 checkpoint, each
site starts round 2 from its own saved BN (digest of the restored tensors = digest of the saved ones) and the run
ends with bitwise the same shared weights as the uninterrupted one. Every process started here is stopped by PID
(with everything below it), also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fl_covid.checkpoint import load_tensors, tensor_digest
from fl_covid.metrics import METRIC_NAMES
from tests.conftest import SITE_A, SITE_B
from tests.flower_local import REPO, free_port

pytestmark = pytest.mark.slow

SITES = (SITE_A, SITE_B)
CONNECTION = "hospitals"
RUN_TIMEOUT = 900  # seconds for one 2-round run; about 40 s on an idle 2-core machine
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}


def _children() -> dict[int, list[int]]:
    """Parent PID -> child PIDs, from /proc."""
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            out.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def alive(pids: list[int]) -> list[int]:
    live = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            live.append(pid)
    return live


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process we started in its own session, its process group and every process below it (Flower's
    SuperExec runs in a session of its own), by PID; SIGKILL whatever is left after 15 s."""
    pids = tree(proc.pid)
    for s in (sig, signal.SIGKILL):
        for pid in alive(pids):
            try:
                os.kill(pid, s)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, s)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.time() + 15
        while alive(pids) and time.time() < deadline:
            time.sleep(0.2)
        if not alive(pids):
            break
    proc.wait(timeout=15)


class Federation:
    """A SuperLink and one SuperNode per site, each from the deploy/ scripts, under ``root``."""

    def __init__(self, root: Path, data: Path) -> None:
        self.root, self.data = root, data
        self.secrets, self.out = root / "secrets", root / "server-runs"
        self.env = {**ENV, "FLWR_HOME": str(root / "operator")}
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, subprocess.Popen] = {}
        self.port = free_port()

    def script(self, name: str, *args: str) -> str:
        proc = subprocess.run([str(REPO / "deploy" / name), *args], env=self.env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, f"deploy/{name} failed:\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    def flwr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(["flwr", *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        assert proc.returncode == 0 or not check, f"flwr {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
        return proc

    def spawn(self, log: Path, *command: str) -> subprocess.Popen:
        with open(log, "ab") as f:  # the child keeps its own descriptor
            proc = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self.script("make_certificates.sh", str(self.secrets), "localhost", "127.0.0.1")
        for name in (*SITES, "intruder"):
            self.script("make_site_key.sh", str(self.secrets / "sites"), name)
        self.script("add_connection.sh", CONNECTION, f"127.0.0.1:{self.port}", str(self.secrets / "ca.crt"))
        self.spawn(self.root / "superlink.log", str(REPO / "deploy" / "start_superlink.sh"), "--secrets",
                   str(self.secrets), "--state-dir", str(self.root / "superlink"), "--host", "127.0.0.1",
                   "--port", str(self.port))
        deadline = time.time() + 120
        while self.flwr("supernode", "ls", CONNECTION, check=False).returncode != 0:
            assert time.time() < deadline, (self.root / "superlink.log").read_text()[-3000:]
            time.sleep(1)
        for site in SITES:
            self.flwr("supernode", "register", str(self.secrets / "sites" / f"{site}.key.pub"), CONNECTION)
        for site in SITES:
            self.start_node(site)

    def start_node(self, site: str, key: str | None = None, log: Path | None = None) -> subprocess.Popen:
        proc = self.spawn(
            log or self.log(site), str(REPO / "deploy" / "start_supernode.sh"),
            "--superlink", f"127.0.0.1:{self.port}", "--ca", str(self.secrets / "ca.crt"),
            "--key", str(self.secrets / "sites" / f"{key or site}.key"), "--site", site,
            "--data-dir", str(self.data / site), "--state-dir", str(self.root / "sites" / site),
            "--port", str(free_port()))
        if key is None:
            self.nodes[site] = proc
        return proc

    def log(self, site: str) -> Path:
        return self.root / f"supernode-{site}.log"

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        left = [p for proc in self.procs for p in alive(tree(proc.pid))]
        assert not left, f"processes left running: {left}"

    def run(self, **values: str) -> tuple[int, subprocess.Popen, Path]:
        """Start `flwr run . --stream` of the smoke config (plus ``values``) in the background."""
        config = {"config-file": "'configs/smoke.yaml'", "num-server-rounds": "2", "local-steps": "2",
                  "output-dir": f"'{self.out}'", **values}
        log = self.root / f"run-{len(self.procs)}.log"
        proc = self.spawn(log, "flwr", "run", ".", CONNECTION, "--stream", "--run-config",
                          " ".join(f"{k}={v}" for k, v in config.items()))
        deadline = time.time() + 120
        while not (match := re.search(r"Successfully started run (\d+)", log.read_text())):
            assert proc.poll() is None and time.time() < deadline, f"the run did not start:\n{log.read_text()}"
            time.sleep(0.5)
        return int(match.group(1)), proc, log

    def finish(self, run_id: int, proc: subprocess.Popen, log: Path) -> str:
        """Wait for the streaming `flwr run` to end; the run's status from `flwr ls` (the exit code lies)."""
        try:
            proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run {run_id} still running after {RUN_TIMEOUT} s:\n{log.read_text()[-4000:]}")
        out = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json").stdout
        return next(r["status"] for r in json.loads(out)["runs"] if int(r["run-id"]) == run_id)

    def run_dir(self, run_id: int) -> Path:
        return self.out / f"fedbn-proto-run{run_id}"

    def site_state(self, site: str, run_name: str) -> Path:
        return self.root / "sites" / site / run_name / f"site-{site}"

    def idle(self, quiet: float = 8, timeout: float = 300) -> None:
        """Wait until no ClientApp has run on any SuperNode for ``quiet`` seconds (more than two polls): a
        stopped run's last messages may still be delivered and trained on."""
        deadline, calm_since = time.time() + timeout, time.time()
        while time.time() - calm_since < quiet:
            if any("flwr-clientapp" in _cmdline(p) for n in self.nodes.values() for p in tree(n.pid)):
                calm_since = time.time()
            assert time.time() < deadline, "a ClientApp is still running"
            time.sleep(0.2)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_for(predicate, what: str, timeout: float = RUN_TIMEOUT, logs: tuple[Path, ...] = ()) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}\n" + "\n".join(p.read_text()[-3000:] for p in logs))
        time.sleep(0.1)


def round_of(folder: Path) -> int:
    """The round of a saved state folder (0 when there is none yet)."""
    file = folder / "state.json"
    try:
        return int(json.loads(file.read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def check_results(run_dir: Path) -> None:
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert set(final["sites"]) == set(SITES)
    for metrics in final["sites"].values():
        assert all(0.0 <= metrics[k] <= 1.0 for k in METRIC_NAMES) and metrics["n"] > 0
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert sorted((r["round"], r["phase"], r["site"]) for r in rows) == sorted(
        (rnd, phase, site) for rnd in (1, 2) for phase in ("train", "evaluate") for site in SITES)


@pytest.fixture(scope="module")
def federation(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    fed = Federation(tmp_path_factory.mktemp("deploy"), shared_data)
    try:
        fed.start()
        yield fed
    finally:
        fed.stop_all()


def test_unregistered_supernode_is_refused(federation: Federation) -> None:
    log = federation.root / "supernode-intruder.log"
    proc = federation.start_node(SITE_A, key="intruder", log=log)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"an unregistered SuperNode was not refused within 120 s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert code != 0 and "Exit Code: 305" in text and "Failed to activate SuperNode" in text, text[-3000:]
    nodes = json.loads(federation.flwr("supernode", "ls", CONNECTION, "--format", "json").stdout)["nodes"]
    assert len(nodes) == len(SITES)


@pytest.fixture(scope="module")
def reference_run(federation: Federation) -> int:
    """A 2-round run without interruption; returns its id."""
    run_id, proc, log = federation.run()
    assert federation.finish(run_id, proc, log) == "finished:completed", log.read_text()[-4000:]
    return run_id


@pytest.fixture(scope="module")
def crashed_run(federation: Federation, reference_run: int) -> dict:
    """The same run again, but Site B's SuperNode (with its SuperExec and any ClientApp) is killed with SIGTERM as
    soon as the server has checkpointed round 1: the SuperLink reports the node unavailable and, as min-sites is
    all sites, the run stops as failed. Site B's SuperNode is started again as a new process and the run is
    resumed from its round-1 checkpoint."""
    run_id, proc, log = federation.run()
    checkpoint = federation.run_dir(run_id) / "checkpoint"
    wait_for(lambda: round_of(checkpoint) >= 1, "the round-1 checkpoint", logs=(log,))
    stop(federation.nodes[SITE_B])
    failed = {"status": federation.finish(run_id, proc, log), "log": log.read_text(),
              "final": (federation.run_dir(run_id) / "final_metrics.json").exists(), "checkpoint": round_of(checkpoint)}
    federation.start_node(SITE_B)
    federation.idle()
    resumed_id, proc, log = federation.run(resume=f"'{federation.run_dir(run_id)}'")
    status = federation.finish(resumed_id, proc, log)
    return {"run_id": run_id, "failed": failed, "status": status, "log": log.read_text(), "resumed_id": resumed_id}


def test_run_completes_with_both_sites(federation: Federation, reference_run: int) -> None:
    run_dir = federation.run_dir(reference_run)
    check_results(run_dir)
    assert round_of(run_dir / "checkpoint") == 2
    for site in SITES:  # what the sites keep stays with them, in their own state folders
        started = json.loads((federation.site_state(site, run_dir.name) / "state.json").read_text())["started_from"]
        assert started["round"] == 1 and started["source"] == "memory"
        assert not (run_dir / f"site-{site}").exists()


def test_a_lost_site_stops_the_run_with_a_clear_error(crashed_run: dict) -> None:
    failed = crashed_run["failed"]
    assert failed["status"] == "finished:failed" and not failed["final"] and failed["checkpoint"] == 1
    assert re.search(rf"round 2: site {SITE_B} \(node \d+\) failed: .*Node Unavailable", failed["log"]), failed["log"]
    assert re.search(r"NotEnoughSites: round 2: only 1 site\(s\) answered (training|evaluation)", failed["log"])


def test_restarted_supernode_continues_with_its_own_bn(federation: Federation, crashed_run: dict) -> None:
    assert crashed_run["status"] == "finished:completed", crashed_run["log"][-4000:]
    name = federation.run_dir(crashed_run["run_id"]).name
    for site in SITES:  # both start round 2 from disk: B restarted, and the resumed run is a new Flower run
        state = federation.site_state(site, name)
        previous = state.with_name(state.name + ".previous")
        started = json.loads((state / "state.json").read_text())["started_from"]
        assert round_of(state) == 2 and round_of(previous) == 1
        assert started["round"] == 1 and started["source"] == "disk", (site, started)
        assert started["bn-sha256"] == tensor_digest(load_tensors(previous / "bn.npz")), f"{site}: not its own BN"
    bn = [tensor_digest(load_tensors(federation.site_state(site, name) / "bn.npz")) for site in SITES]
    assert bn[0] != bn[1]  # each site keeps statistics of its own


def test_resumed_server_matches_the_uninterrupted_run(federation: Federation, reference_run: int,
                                                       crashed_run: dict) -> None:
    assert crashed_run["status"] == "finished:completed", crashed_run["log"][-4000:]
    assert "Resuming" in crashed_run["log"]
    run_dir = federation.run_dir(crashed_run["run_id"])
    assert not federation.run_dir(crashed_run["resumed_id"]).exists()  # it continued in the original folder
    check_results(run_dir)
    resumed = load_tensors(run_dir / "checkpoint" / "shared.npz")
    reference = load_tensors(federation.run_dir(reference_run) / "checkpoint" / "shared.npz")
    assert resumed.keys() == reference.keys()
    differ = [k for k in resumed if not (resumed[k].dtype == reference[k].dtype and resumed[k].equal(reference[k]))]
    assert not differ, f"{len(differ)} of {len(resumed)} shared tensors differ, e.g. {differ[:3]}"
