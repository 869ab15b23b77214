"""The hospital deployment, for real, on loopback: certificates (CA kept apart) and site keys from deploy/make_*.sh,
a SuperLink behind its proxy (the hospitals' port serves the Fleet API only, the operator's `flwr` uses a loopback
port) and one SuperNode per site, each with a policy approving this copy of the app, started by deploy/start_*.sh
(own FLWR_HOMEs, free ports), `flwr run` of the smoke config on the real CT images of both sites.

Checked, with every attack tried for real:
- an outsider holding only ca.crt, at the hospitals' port, can neither list runs, register or unregister a node,
  nor start a run; an unregistered SuperNode is refused;
- a run of an app the hospitals did not approve is refused by every site before any of its code runs;
- a malicious operator's settings (a method the sites forbid, DP off where they require it, oversize training, a
  config file outside the app) are refused with a generic reason, and a compromised server that sends a
  traversal run name writes nothing outside any state folder;
- a registered participant turned malicious, which impersonates the sites, sends malformed prototypes and a
  forged log line, is rejected round after round while the runs go on with the honest sites;
- an uninterrupted run completes with both sites; a SuperNode killed after round 1 stops the run naming the site;
  after restarting it and resuming the server, each site continues from its own saved BN and the run ends with
  bitwise the weights of the same federation run in one process (tests/inprocess.py), DP noise included.
Every process started here is stopped by PID (with everything below it), also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fl_covid.checkpoint import load_tensors, tensor_digest
from fl_covid.config import project_root
from fl_covid.experiments.federation import free_port
from fl_covid.metrics import METRIC_NAMES
from tests.conftest import SITE_A, SITE_B
from tests.inprocess import run_dir as inprocess_run_dir
from tests.inprocess import run_federation

pytestmark = pytest.mark.slow

SITES = (SITE_A, SITE_B)
REPO = project_root()
OPERATOR, OUTSIDER = "operator", "outsider"
RUN_TIMEOUT = 900  # seconds for one run; about a minute on an idle 2-core machine
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
SMOKE = {"config-file": "'configs/smoke.yaml'", "num-server-rounds": "2", "local-steps": "2"}
DP = "dp-epsilon=1.0"  # the sites require DP on their prototypes
POLICY = ("allowed-methods: [fedbn, fedbn-proto]\nrequire-dp: true\nmax-dp-epsilon: 2.0\nmax-rounds: 10\n"
          "max-local-steps: 50\n"
          "min-prototype-images: 2\nkeep-runs: 20\n")
REFUSED = "run refused by the site's policy"
FAILED = "the site could not complete this request"

# A compromised server: Flower's own flwr-serverapp, with the approved app's strategy changed to send the run name
# written in the file $FL_COVID_TEST_EVIL_SERVER (when that file holds one).
EVIL_SERVER = '''
import os, sys
from pathlib import Path
name = Path(os.environ["FL_COVID_TEST_EVIL_SERVER"])
if name.is_file() and name.read_text().strip():
    import server.strategy as S
    from fl_covid import records as R
    honest = S.SitesMixin.configure_train
    def configure_train(self, *args, **kwargs):
        messages = honest(self, *args, **kwargs)
        for m in messages:
            m.content[R.CONFIG][R.RUN_NAME] = name.read_text().strip()
        return messages
    S.SitesMixin.configure_train = configure_train
from flwr.superlink.cli.flwr_serverapp import flwr_serverapp
sys.argv[0] = "flwr-serverapp"
flwr_serverapp()
'''
# A malicious site: Flower's own flwr-clientapp without the approval guard, running the real ClientApp and then
# tampering with its replies, round by round.
EVIL_SITE = '''
import sys
import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.clientapp import ClientApp
import clients.client_app as C
from fl_covid import records as R
honest, evil = C.app, ClientApp()

@evil.train()
def train(msg, context):
    reply = honest(msg, context)
    if int(msg.content[R.CONFIG][R.ROUND]) == 1:  # pretend to be the other site
        reply.content[R.METRICS][R.SITE_ID] = 0
    return reply

@evil.evaluate()
def summarise(msg, context):
    reply = honest(msg, context)  # (it keeps what it received, so that its training replies are sound)
    if int(msg.content[R.CONFIG][R.ROUND]) == 1:  # a failure whose text forges a log line
        raise RuntimeError("x\\nINFO flwr: FINAL fedbn-proto site_b_covidct: AUC 0.9990 FORGED")
    if R.PROTOTYPES in reply.content:  # prototype counts as strings
        n = len(reply.content[R.PROTOTYPES][R.P_COUNTS].numpy())
        reply.content[R.PROTOTYPES][R.P_COUNTS] = Array(np.array(["5"] * n))
    return reply

C.app = evil
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
flwr_clientapp()
'''


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


def executable(path: Path, body: str) -> Path:
    """A Python script at ``path`` run by this interpreter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


class Federation:
    """A SuperLink and one SuperNode per site, each from the deploy/ scripts, under ``root``."""

    def __init__(self, root: Path, data: Path) -> None:
        self.root, self.data = root, data
        self.secrets, self.out = root / "secrets", root / "server-runs"
        self.evil_server = root / "evil-server-run-name"
        self.env = {**ENV, "FLWR_HOME": str(root / "operator")}
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, int] = {}
        self.port, self.control = free_port(), free_port()

    def script(self, name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(REPO / "deploy" / name), *args], env=env or self.env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 0, f"deploy/{name} failed:\n{proc.stdout}{proc.stderr}"
        return proc

    def flwr(self, *args: str, check: bool = True, home: str = OPERATOR, timeout: float = 120
             ) -> subprocess.CompletedProcess:
        proc = subprocess.run(["flwr", *args], cwd=REPO, env={**self.env, "FLWR_HOME": str(self.root / home)},
                              capture_output=True, text=True, timeout=timeout, check=False)
        assert proc.returncode == 0 or not check, f"flwr {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
        return proc

    def spawn(self, log: Path, *command: str, env: dict | None = None) -> subprocess.Popen:
        with open(log, "ab") as f:  # the child keeps its own descriptor
            proc = subprocess.Popen(command, cwd=REPO, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self.script("make_certificates.sh", str(self.secrets), "localhost", "127.0.0.1")
        for name in (*SITES, "intruder", "rogue"):
            self.script("make_site_key.sh", str(self.secrets / "sites"), name)
        self.script("add_connection.sh", "hospitals", f"127.0.0.1:{self.control}", str(self.secrets / "ca.crt"))
        outsider = {**self.env, "FLWR_HOME": str(self.root / OUTSIDER)}  # only ca.crt, at the hospitals' port
        self.script("add_connection.sh", "hospitals", f"127.0.0.1:{self.port}", str(self.secrets / "ca.crt"),
                    env=outsider)
        evil_bin = self.root / "evil-server-bin"
        executable(evil_bin / "flwr-serverapp", EVIL_SERVER)
        link_env = {**self.env, "PATH": f"{evil_bin}:{self.env['PATH']}",
                    "FL_COVID_TEST_EVIL_SERVER": str(self.evil_server)}
        self.spawn(self.root / "superlink.log", str(REPO / "deploy" / "start_superlink.sh"), "--secrets",
                   str(self.secrets), "--state-dir", str(self.root / "superlink"), "--host", "127.0.0.1",
                   "--port", str(self.port), "--control-port", str(self.control), env=link_env)
        deadline = time.time() + 120
        while self.flwr("supernode", "ls", "hospitals", check=False).returncode != 0:
            assert time.time() < deadline, (self.root / "superlink.log").read_text()[-3000:]
            time.sleep(1)
        digest = subprocess.run(["fl-covid-app-hash", str(REPO)], capture_output=True, text=True, check=True
                                ).stdout.strip()
        for name in (*SITES, "rogue"):  # the rogue is a registered participant that turns malicious
            out = self.flwr("supernode", "register", str(self.secrets / "sites" / f"{name}.key.pub"), "hospitals")
            self.node_ids[name] = int(re.search(r"SuperNode (\d+) registered", out.stdout).group(1))
        for site in SITES:
            (self.root / f"{site}.policy.yaml").write_text(f"approved-apps: [{digest}]\n{POLICY}")
        for site in SITES:
            self.start_node(site)
        self.wait_online()

    def start_node(self, site: str, key: str | None = None, log: Path | None = None) -> subprocess.Popen:
        proc = self.spawn(
            log or self.log(site), str(REPO / "deploy" / "start_supernode.sh"),
            "--superlink", f"127.0.0.1:{self.port}", "--ca", str(self.secrets / "ca.crt"),
            "--key", str(self.secrets / "sites" / f"{key or site}.key"), "--site", site,
            "--data-dir", str(self.data / site), "--state-dir", str(self.state_dir(site)),
            "--policy", str(self.root / f"{site}.policy.yaml"), "--port", str(free_port()))
        if key is None:
            self.nodes[site] = proc
        return proc

    def start_rogue(self, claims: str) -> subprocess.Popen:
        """The rogue's registered key, Flower's SuperNode without the deploy script, claiming to be site
        ``claims`` (on that site's images), with a ClientApp process that tampers with the real ClientApp's replies."""
        evil_bin = self.root / "evil-site-bin"
        executable(evil_bin / "flwr-clientapp", EVIL_SITE)
        return self.spawn(
            self.log("rogue"), "flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--root-certificates",
            str(self.secrets / "ca.crt"), "--auth-supernode-private-key", str(self.secrets / "sites" / "rogue.key"),
            "--port", str(free_port()), "--node-config",
            f"site='{claims}' data-dir='{self.data / claims}' state-dir='{self.root / 'rogue'}'",
            env={**self.env, "PATH": f"{evil_bin}:{self.env['PATH']}", "FLWR_HOME": str(self.root / "rogue-home")})

    def online(self) -> set[int]:
        out = self.flwr("supernode", "ls", "hospitals", "--format", "json", check=False).stdout
        try:
            return {int(n["node-id"]) for n in json.loads(out)["nodes"] if n["status"] == "online"}
        except (json.JSONDecodeError, KeyError):
            return set()

    def wait_online(self, count: int = len(SITES)) -> None:
        wait_for(lambda: len(self.online()) >= count, f"{count} SuperNodes online", 180,
                 tuple(map(self.log, (*SITES, "rogue"))))

    def state_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    def log(self, site: str) -> Path:
        return self.root / f"supernode-{site}.log"

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        left = [p for proc in self.procs for p in alive(tree(proc.pid))]
        assert not left, f"processes left running: {left}"

    def run(self, app: Path = REPO, **values: str) -> tuple[int, subprocess.Popen, Path]:
        """Start `flwr run APP hospitals --stream` of the smoke config (plus ``values``) in the background."""
        pins = ",".join(f"{site}={self.node_ids[site]}" for site in SITES)
        config = {**SMOKE, "output-dir": f"'{self.out}'", **values}
        config["overrides"] = f"'site-nodes={pins} {values.get('overrides', DP).strip(chr(39))}'"
        log = self.root / f"run-{len(self.procs)}.log"
        proc = self.spawn(log, "flwr", "run", str(app), "hospitals", "--stream", "--run-config",
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
        out = self.flwr("ls", "hospitals", "--run-id", str(run_id), "--format", "json").stdout
        return next(r["status"] for r in json.loads(out)["runs"] if int(r["run-id"]) == run_id)

    def run_to_end(self, app: Path = REPO, **values: str) -> tuple[str, str, int]:
        run_id, proc, log = self.run(app, **values)
        status = self.finish(run_id, proc, log)
        self.idle()
        return status, log.read_text(), run_id

    def run_dir(self, run_id: int) -> Path:
        return self.out / f"fedbn-proto-run{run_id}"

    def site_state(self, site: str, run_name: str) -> Path:
        return self.state_dir(site) / run_name / f"site-{site}" / "state"

    def idle(self, quiet: float = 8, timeout: float = 300) -> None:
        """Wait until no ClientApp has run on any SuperNode for ``quiet`` seconds (more than two polls): a
        stopped run's last messages may still be delivered and trained on."""
        deadline, calm_since = time.time() + timeout, time.time()
        while time.time() - calm_since < quiet:
            if any("flwr-clientapp" in _cmdline(p) or "clients.guard" in _cmdline(p)
                   for n in self.nodes.values() for p in tree(n.pid)):
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
    try:
        return int(json.loads((folder / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def check_results(run_dir: Path, sites: tuple[str, ...] = SITES, rounds: int = 2) -> None:
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert set(final["sites"]) == set(sites)
    for metrics in final["sites"].values():
        assert all(0.0 <= metrics[k] <= 1.0 for k in METRIC_NAMES) and metrics["n"] > 0
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert sorted((r["round"], r["phase"], r["site"]) for r in rows) == sorted(
        (rnd, phase, site) for rnd in range(1, rounds + 1) for phase in ("train", "evaluate") for site in sites)


def files_named(root: Path, part: str) -> list[Path]:
    return sorted(p for p in root.rglob("*") if part in p.name)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    fed = Federation(tmp_path_factory.mktemp("deploy"), REPO / "data")  # the embedded real images of both sites
    try:
        fed.start()
        yield fed
    finally:
        fed.stop_all()


def test_the_ca_key_is_kept_apart_and_the_certificates_are_sound(federation: Federation) -> None:
    assert not (federation.secrets / "ca.key").exists() and (federation.root / "secrets-ca" / "ca.key").is_file()
    text = subprocess.run(["openssl", "x509", "-in", str(federation.secrets / "ca.crt"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "CA:TRUE, pathlen:0" in text and "Certificate Sign" in text
    refused = subprocess.run([str(REPO / "deploy" / "make_certificates.sh"), str(federation.secrets), "localhost"],
                             env={**federation.env, "CERT_DAYS": "5000"}, capture_output=True, text=True)
    assert refused.returncode != 0 and "must not outlive its CA" in refused.stderr


def test_an_outsider_with_the_ca_certificate_controls_nothing(federation: Federation) -> None:
    def nodes() -> list[tuple]:
        out = json.loads(federation.flwr("supernode", "ls", "hospitals", "--format", "json").stdout)["nodes"]
        return sorted((n["node-id"], n["status"]) for n in out)

    def runs() -> list:
        return sorted(r["run-id"] for r in json.loads(federation.flwr("ls", "hospitals", "--format", "json").stdout)["runs"])

    before, runs_before = nodes(), runs()
    attempts = {
        "list runs": ("ls", "hospitals"),
        "register a node": ("supernode", "register", str(federation.secrets / "sites" / "intruder.key.pub"),
                            "hospitals"),
        "unregister a site": ("supernode", "unregister", str(federation.node_ids[SITE_A]), "hospitals"),
        "run its own app": ("run", str(REPO), "hospitals", "--run-config", "num-server-rounds=1"),
    }
    for what, args in attempts.items():
        proc = federation.flwr(*args, check=False, home=OUTSIDER)
        assert proc.returncode != 0 or "403" in proc.stdout + proc.stderr, f"{what}: {proc.stdout}{proc.stderr}"
        assert "Successfully" not in proc.stdout, what
    # the hospitals' port answers the Control and ServerApp APIs with 403, whatever the path
    context = ssl.create_default_context(cafile=str(federation.secrets / "ca.crt"))
    for path in ("/v1/control/list-runs", "/v1/runtime/pull-messages", "/health"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"https://127.0.0.1:{federation.port}{path}", data=b"",
                                                          method="POST"), context=context, timeout=30)
        assert refused.value.code == 403, path
    assert nodes() == before and runs() == runs_before


def test_unregistered_supernode_is_refused(federation: Federation) -> None:
    log = federation.root / "supernode-intruder.log"
    proc = federation.start_node(SITE_A, key="intruder", log=log)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"an unregistered SuperNode was not refused within 120 s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert code != 0 and "Exit Code: 305" in text and "Failed to activate SuperNode" in text, text[-3000:]
    nodes = json.loads(federation.flwr("supernode", "ls", "hospitals", "--format", "json").stdout)["nodes"]
    assert {int(n["node-id"]) for n in nodes} == set(federation.node_ids.values())  # the registered ones only


def test_an_app_the_hospitals_did_not_approve_never_runs(federation: Federation, tmp_path: Path) -> None:
    app = tmp_path / "app"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f.endswith((".py", ".toml", ".yaml", ".md")):
            (app / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / f, app / f)
    marker = tmp_path / "the-unapproved-app-ran"
    with open(app / "clients" / "client_app.py", "a") as f:  # what any of its code would do first
        f.write(f"\nimport pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    status, log, _ = federation.run_to_end(app, **{"num-server-rounds": "1"})
    assert status == "finished:failed" and not marker.exists()
    assert len(re.findall(r"rejected \w+ reply of site .* failed: .*app not approved by the site", log)) == 2
    for site in SITES:
        assert "refused app bundle" in federation.log(site).read_text()


@pytest.mark.parametrize("values, reasons", [
    ({"method": "'fedavg'", "local-steps": "1000000", "overrides": "''"},
     ("'fedavg' is not among allowed-methods", "local-steps 1000000 exceeds")),
    ({"overrides": "'dp-epsilon=0 batch-size=1000'"}, ("(require-dp) but dp-epsilon is 0", "batch-size 1000 exceeds")),
], ids=["forbidden method, oversize training", "DP off, oversize batches"])
def test_a_run_breaking_the_sites_policy_is_refused(federation: Federation, values: dict, reasons: tuple) -> None:
    status, log, _ = federation.run_to_end(**{"num-server-rounds": "1", **values})
    assert status == "finished:failed" and log.count(REFUSED) == 2, log[-3000:]
    assert not any(r.split()[0] in line.split("failed:")[1] for r in reasons
                   for line in re.findall(r"rejected \w+ reply.*", log))
    for site in SITES:  # the reasons are in the site's own log
        text = federation.log(site).read_text()
        assert all(r in text for r in reasons), (site, reasons)


def test_a_config_file_outside_the_app_is_refused(federation: Federation) -> None:
    status, log, _ = federation.run_to_end(**{"config-file": f"'{REPO / 'configs' / 'smoke.yaml'}'"})
    assert status == "finished:failed" and log.count(FAILED) == 2, log[-3000:]
    assert "configs/NAME.yaml" not in log  # nothing of the reason reaches the server
    assert all("must name a file configs/NAME.yaml" in federation.log(s).read_text() for s in SITES)


def test_a_compromised_server_cannot_write_outside_the_state_folders(federation: Federation) -> None:
    federation.evil_server.write_text("../../escaped")
    try:
        status, log, _ = federation.run_to_end(**{"num-server-rounds": "1"})
    finally:
        federation.evil_server.write_text("")
    assert status == "finished:failed" and log.count(FAILED) == 2, log[-3000:]
    assert not files_named(federation.root, "escaped")
    assert all("run name" in federation.log(s).read_text() for s in SITES)


@pytest.fixture(scope="module")
def crashed_run(federation: Federation) -> dict:
    """A run in which Site B's SuperNode (with its SuperExec and any ClientApp) is killed with SIGTERM as soon as
    the server has checkpointed round 1: the SuperLink reports the node unavailable and, as min-sites is all
    sites, the run stops as failed. Site B's SuperNode is started again as a new process and the run is resumed
    from its round-1 checkpoint. Throughout, a registered participant turned malicious (the rogue) takes part:
    it claims to be site A, then site B, sends malformed prototypes and a forged log line."""
    rogue = federation.start_rogue(claims=SITE_B)
    try:
        federation.wait_online(len(SITES) + 1)
        run_id, proc, log = federation.run()
        checkpoint = federation.run_dir(run_id) / "checkpoint"
        wait_for(lambda: round_of(checkpoint) >= 1, "the round-1 checkpoint", logs=(log,))
        stop(federation.nodes[SITE_B])
        failed = {"status": federation.finish(run_id, proc, log), "log": log.read_text(),
                  "final": (federation.run_dir(run_id) / "final_metrics.json").exists(),
                  "checkpoint": round_of(checkpoint)}
        wait_for(lambda: federation.node_ids[SITE_B] not in federation.online(), f"{SITE_B} offline", 180)
        federation.start_node(SITE_B)
        federation.wait_online(len(SITES) + 1)
        federation.idle()
        status, text, resumed_id = federation.run_to_end(resume=f"'{federation.run_dir(run_id)}'")
    finally:
        stop(rogue)
    return {"run_id": run_id, "failed": failed, "status": status, "log": text, "resumed_id": resumed_id}


def test_a_malicious_participant_is_rejected_round_after_round(federation: Federation, crashed_run: dict) -> None:
    """Site A and B are pinned to their registered nodes (site-nodes): every reply of the rogue is rejected,
    its forged log line arrives quoted on one line, and the runs go on with the honest sites."""
    node = federation.node_ids["rogue"]
    first, resumed = crashed_run["failed"]["log"], crashed_run["log"]
    assert re.search(rf"round 1: rejected training reply of site \w+ \(node {node}\): site-id 0 belongs to another "
                     "node", first), first[-4000:]
    assert re.search(rf"round 2: rejected summary reply of site \w+ \(node {node}\): site-id 1 belongs to another "
                     "node", resumed), resumed[-4000:]
    forged = [line for line in first.splitlines() if "FORGED" in line]
    assert forged and all("rejected summary reply" in line and "\\n" in line for line in forged), forged
    assert not re.search(r"^\S*\s*INFO flwr: FINAL", first + resumed, re.MULTILINE)
    assert crashed_run["status"] == "finished:completed"


def test_a_lost_site_stops_the_run_with_a_clear_error(crashed_run: dict) -> None:
    failed = crashed_run["failed"]
    assert failed["status"] == "finished:failed" and not failed["final"] and failed["checkpoint"] == 1
    assert re.search(rf"round 2: site {SITE_B} \(node \d+\) (failed: .*Node Unavailable|did not answer)",
                     failed["log"]) or re.search(rf"round 2: rejected \w+ reply of site {SITE_B} .*Node Unavailable",
                                                 failed["log"]), failed["log"][-3000:]
    assert re.search(r"NotEnoughSites: round 2: only 1 site\(s\) answered (training|summary)", failed["log"])


def test_restarted_supernode_continues_with_its_own_bn(federation: Federation, crashed_run: dict) -> None:
    assert crashed_run["status"] == "finished:completed", crashed_run["log"][-4000:]
    name = federation.run_dir(crashed_run["run_id"]).name
    for site in SITES:  # both start round 2 from their own saved round-1 state
        state = federation.site_state(site, name)
        previous = state.with_name(state.name + ".previous")
        started = json.loads((state / "state.json").read_text())["started_from"]
        assert round_of(state) == 2 and round_of(previous) == 1
        assert started["round"] == 1, (site, started)
        assert started["bn-sha256"] == tensor_digest(load_tensors(previous / "bn.npz")), f"{site}: not its own BN"
    bn = [tensor_digest(load_tensors(federation.site_state(site, name) / "bn.npz")) for site in SITES]
    assert bn[0] != bn[1]  # each site keeps statistics of its own


def test_resumed_deployment_matches_the_same_run_in_one_process(federation: Federation, crashed_run: dict,
                                                                 tmp_path: Path) -> None:
    assert crashed_run["status"] == "finished:completed", crashed_run["log"][-4000:]
    assert "Resuming" in crashed_run["log"]
    run_dir = federation.run_dir(crashed_run["run_id"])
    assert not federation.run_dir(crashed_run["resumed_id"]).exists()  # it continued in the original folder
    check_results(run_dir)
    for site in SITES:  # the same noise secrets: the same DP noise for the same run name and round
        shutil.copyfile(federation.state_dir(site) / f".noise-secret-{site}", tmp_path / f".noise-secret-{site}")
    run_federation(tmp_path, run_id=crashed_run["run_id"], overrides=DP, **{
        "config-file": "configs/smoke.yaml", "num-server-rounds": 2, "local-steps": 2, "data-root": str(federation.data)})
    reference = load_tensors(inprocess_run_dir(tmp_path) / "checkpoint" / "shared.npz")
    resumed = load_tensors(run_dir / "checkpoint" / "shared.npz")
    assert resumed.keys() == reference.keys()
    differ = [k for k in resumed if not (resumed[k].dtype == reference[k].dtype and resumed[k].equal(reference[k]))]
    assert not differ, f"{len(differ)} of {len(resumed)} shared tensors differ, e.g. {differ[:3]}"
