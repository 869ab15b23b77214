"""The hospital deployment, for real, on loopback: certificates (CA kept apart) and site keys from deploy/make_*.sh,
a SuperLink behind its proxy (the hospitals' port serves the Fleet API only, the operator's `flwr` uses a loopback
port) and one SuperNode per site, each with a policy approving this copy of the app, started by deploy/start_*.sh
(own FLWR_HOMEs, free ports), `flwr run` of the smoke config on the real CT images of both sites.

Checked, with every attack tried for real:
- an outsider holding only ca.crt, at the hospitals' port, can neither list runs, register or unregister a node,
  nor start a run; an unregistered SuperNode is refused;
- a run of an app the hospitals did not approve is refused by every site before any of its code runs, and so is a
  bundle declaring an agentapp (Flower would start flwr-agentapp, unguarded);
- a malicious operator's settings (a method the sites forbid, DP off where they require it, oversize training, a
  config file outside the app) are refused with a generic reason; a compromised server holding the operator's
  signing key that asks a round's summary twice (a second DP release) is refused the second, and one that sends a
  traversal run name writes nothing outside any state folder;
- every instruction is signed by the operator and every reply by its site (the operator's trust file pins the sites
  to their nodes): a registered node that is no site of the run receives nothing; a site turned malicious can push
  neither an instruction to another site (the final summary of an earlier run, to overwrite its model) nor a reply in
  another site's name, and its undecodable reply rejects only that reply while the run completes;
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
from fl_covid.processes import alive, command_line, descendants
from tests.conftest import SITE_A, SITE_B
from tests.inprocess import run_dir as inprocess_run_dir
from tests.inprocess import run_federation

pytestmark = pytest.mark.slow

SITES = (SITE_A, SITE_B)
ROGUE_SITE = "site_rogue"  # the rogue's site in the run that pins it (test_a_malicious_site_...)
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

# A compromised server (it holds the operator's signing key): Flower's own flwr-serverapp running the approved app,
# changed when the file $FL_COVID_TEST_EVIL_SERVER holds a run name: round 1's summary is asked a second time, of
# other weights (a second prototype release of the round), and the train messages name that run name; everything
# is signed with the operator's key.
EVIL_SERVER = '''
import os, sys
from pathlib import Path
name = Path(os.environ["FL_COVID_TEST_EVIL_SERVER"])
if name.is_file() and name.read_text().strip():
    import numpy as np
    import server.server_app as A
    import server.signing as G
    from flwr.app import Array, ArrayRecord
    from fl_covid import records as R
    honest_sign, honest_summarise = G.Signing.sign, A.summarise
    def sign(self, messages):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == "train":
                m.content[R.CONFIG][R.RUN_NAME] = name.read_text().strip()
        return honest_sign(self, messages)
    def summarise(grid, strategy, run, arrays, server_round, timeout):
        honest_summarise(grid, strategy, run, arrays, server_round, timeout)
        if server_round == 1:  # the same round again, other weights
            other = ArrayRecord({R.FLAT: Array(arrays[R.FLAT].numpy() * np.float32(0.5))})
            try:
                honest_summarise(grid, strategy, run, other, server_round, timeout)
            except Exception as e:
                print("EVIL SECOND SUMMARY", type(e).__name__, e, flush=True)
    G.Signing.sign, A.summarise = sign, summarise
from flwr.superlink.cli.flwr_serverapp import flwr_serverapp
sys.argv[0] = "flwr-serverapp"
flwr_serverapp()
'''
# A registered site turned malicious (pinned as site ROGUE_SITE in the operator's trust file): Flower's own
# flwr-clientapp without the approval guard, running the real ClientApp (so its replies are signed with its own key)
# and attacking in round 1. Summary: a reply whose metric record body is not valid protobuf. Training, before it
# trains: with its own registered key at the Fleet API it pushes (a) an instruction to site A without reply_to (the
# final summary naming A's folder of an earlier, finished run, named in $FL_COVID_TEST_TARGET) and (b) a reply in site
# B's name to B's training message (whose id it reads from the SuperLink's database here; the review computed it
# from its own copy), carrying weights of its choosing. Each outcome is printed to the rogue's log.
EVIL_SITE = '''
import os, sqlite3, time
from pathlib import Path
from flwr.app import ConfigRecord, MetricRecord, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_to_proto
from flwr.app.message import remove_content_from_message
from flwr.proto.fleet_pb2 import PushMessagesRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.inflatable.inflatable_object import add_header_to_object_body, get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_push_object_fn_protobuf
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
import clients.client_app as C
from fl_covid import records as R
from fl_covid.checkpoint import RECEIVED
from fl_covid.federated import Received
honest, evil = C.app, ClientApp()
E = os.environ

class Garbled(MetricRecord):  # a metric record whose body is not valid protobuf
    def deflate(self):
        return add_header_to_object_body(object_body=b"\\x0a\\xff\\xff\\xff\\xff", obj=self)
Garbled.__name__ = Garbled.__qualname__ = "MetricRecord"  # its header names the real type

def push(content, **meta):
    """Push a message of our making to the Fleet API, authenticated with the rogue's registered key."""
    key = load_ssh_private_key(open(E["FL_COVID_TEST_ROGUE_KEY"], "rb").read(), password=None)
    msg = Message(content=content, metadata=Metadata(message_id="", group_id="", created_at=time.time(), ttl=600,
                                                     **meta))
    msg.metadata.__dict__["_message_id"] = msg.object_id
    with FleetHttpClient.from_server_address(E["FL_COVID_TEST_SUPERLINK"], False, E["FL_COVID_TEST_CA"],
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                          NodeAuthHttpInterceptor(key, key.public_key())]) as client:
        node = Node(node_id=int(E["FL_COVID_TEST_ROGUE_NODE"]))
        try:
            res = client.PushMessages(PushMessagesRequest(node=node, messages_list=[message_to_proto(
                remove_content_from_message(msg))], message_object_trees=[get_object_tree(msg)]))
            send = make_push_object_fn_protobuf(client.PushObject, node, meta["run_id"], res.session_id)
            for oid, obj in get_all_nested_objects(msg).items():
                if oid in set(res.objects_to_push):
                    send(oid, obj.deflate())
            return f"stored {msg.metadata.message_id}"
        except Exception as e:
            return f"refused: {getattr(getattr(e, 'response', None), 'text', e)}"

def node64(n):
    return n - 2**64 if n >= 2**63 else n

@evil.train()
def train(msg, context):
    if int(msg.content[R.CONFIG][R.ROUND]) == 1:
        run, me = msg.metadata.run_id, int(E["FL_COVID_TEST_ROGUE_NODE"])
        a, b = int(E["FL_COVID_TEST_NODE_A"]), int(E["FL_COVID_TEST_NODE_B"])
        node = context.node_config  # the weights of this round's summary, as this site keeps them
        flat = Received.load(Path(node["state-dir"]) / msg.content[R.CONFIG][R.RUN_NAME] / f"site-{node['site']}"
                             / RECEIVED).flat
        order = RecordDict({R.WEIGHTS: R.weights_record(-flat), R.CONFIG: ConfigRecord({
            R.ROUND: 2, R.RUN_NAME: Path(E["FL_COVID_TEST_TARGET"]).read_text(), R.FINAL: True, R.EVALUATE: True,
            R.PROTOTYPES_DUE: False})})
        print("FORGED INSTRUCTION", push(order, run_id=run, src_node_id=me, dst_node_id=a, reply_to_message_id="",
                                         message_type="evaluate"), flush=True)
        db = sqlite3.connect(E["FL_COVID_TEST_LINK_DB"])
        target = db.execute("select message_id from message_ins where run_id = ? and dst_node_id = ? and "
                            "message_type = 'train'", (node64(run), node64(b))).fetchone()[0]
        weights = RecordDict({R.WEIGHTS: R.weights_record(-flat),
                              R.METRICS: MetricRecord({R.NUM_EXAMPLES: 9, R.SITE_ID: 1, "loss": 0.1, "ce": 0.1,
                                                       "con": 0.0, "train_accuracy": 1.0, "seconds": 1.0})})
        print("FORGED REPLY", push(weights, run_id=run, src_node_id=b, dst_node_id=0, reply_to_message_id=target,
                                   message_type="train"), flush=True)
    return honest(msg, context)

@evil.evaluate()
def summarise(msg, context):
    reply = honest(msg, context)
    if int(msg.content[R.CONFIG][R.ROUND]) == 1:
        reply.content[R.METRICS] = Garbled(dict(reply.content[R.METRICS]))
    return reply

C.app = evil
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
flwr_clientapp()
'''


# Flower's SuperNode and SuperExec run by this interpreter (never through a pyenv shim, which would put its own
# folder first on PATH and hide the rogue's ClientApp)
SUPERNODE = "import sys; from flwr.supernode.cli import flower_supernode; sys.argv[0] = 'flower-supernode'; flower_supernode()"
SUPEREXEC = "import sys\nfrom flwr.supercore.cli import flower_superexec\nsys.argv[0] = 'flower-superexec'\nflower_superexec()\n"


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process we started in its own session, its process group and every process below it (Flower's
    SuperExec runs in a session of its own), by PID; SIGKILL whatever is left after 15 s."""
    pids = descendants([proc.pid])
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
        self.script("make_signing_key.sh", str(self.root / "operator-keys"), "operator")
        self.write_trust({})  # the sites' nodes and keys once they are registered
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
                   "--port", str(self.port), "--control-port", str(self.control), "--trust", str(self.trust),
                   env=link_env)
        deadline = time.time() + 120
        while self.flwr("supernode", "ls", "hospitals", check=False).returncode != 0:
            assert time.time() < deadline, (self.root / "superlink.log").read_text()[-3000:]
            time.sleep(1)
        digest = subprocess.run(["fl-covid-app-hash", str(REPO)], capture_output=True, text=True, check=True
                                ).stdout.strip()
        for name in (*SITES, "rogue"):  # the rogue is a registered participant that turns malicious
            out = self.flwr("supernode", "register", str(self.secrets / "sites" / f"{name}.key.pub"), "hospitals")
            self.node_ids[name] = int(re.search(r"SuperNode (\d+) registered", out.stdout).group(1))
        self.write_trust({site: site for site in SITES})
        operator_key = (self.root / "operator-keys" / "operator.sign.pub").read_text().strip()
        for site in SITES:
            (self.root / f"{site}.policy.yaml").write_text(
                f"approved-apps: [{digest}]\noperator-key: {operator_key}\n{POLICY}")
        for site in SITES:
            self.start_node(site)
        self.wait_online()

    @property
    def trust(self) -> Path:
        return self.root / "trust.yaml"

    def write_trust(self, sites: dict[str, str]) -> None:
        """The operator's trust file: its signing key; per site (name -> the key pair it uses) the registered node
        and the public key that signs its replies."""
        lines = [f"signing-key: {self.root / 'operator-keys' / 'operator.sign.key'}", "sites:" if sites else "sites: {}"]
        for site, key in sites.items():
            public = (self.secrets / "sites" / f"{key}.sign.pub").read_text().strip()
            lines.append(f"  {site}: {{node: {self.node_ids[key]}, key: {public}}}")
        self.trust.write_text("\n".join(lines) + "\n")

    def start_node(self, site: str, key: str | None = None, log: Path | None = None) -> subprocess.Popen:
        proc = self.spawn(
            log or self.log(site), str(REPO / "deploy" / "start_supernode.sh"),
            "--superlink", f"127.0.0.1:{self.port}", "--ca", str(self.secrets / "ca.crt"),
            "--key", str(self.secrets / "sites" / f"{key or site}.key"), "--site", site,
            "--signing-key", str(self.secrets / "sites" / f"{key or site}.sign.key"),
            "--data-dir", str(self.data / site), "--state-dir", str(self.state_dir(site)),
            "--policy", str(self.root / f"{site}.policy.yaml"), "--port", str(free_port()))
        if key is None:
            self.nodes[site] = proc
        return proc

    @property
    def rogue_target(self) -> Path:
        """The file naming the earlier run whose folder at site A the rogue aims at."""
        return self.root / "rogue-target"

    def start_rogue(self, site: str, data: str) -> subprocess.Popen:
        """The rogue's registered key, Flower's SuperNode without the deploy script, as site ``site`` (on the
        images of site ``data``, with its own signing key and a policy trusting the operator), with a ClientApp
        process that attacks (EVIL_SITE) in a run that pins it to a site."""
        evil_bin = self.root / "evil-site-bin"
        executable(evil_bin / "flwr-clientapp", EVIL_SITE)
        executable(evil_bin / "flower-superexec", SUPEREXEC)  # this interpreter, whatever wrappers are on PATH
        policy = self.root / "rogue.policy.yaml"
        policy.write_text((self.root / f"{SITE_A}.policy.yaml").read_text())
        attack = {"FL_COVID_TEST_ROGUE_KEY": str(self.secrets / "sites" / "rogue.key"),
                  "FL_COVID_TEST_ROGUE_NODE": str(self.node_ids["rogue"]),
                  "FL_COVID_TEST_NODE_A": str(self.node_ids[SITE_A]), "FL_COVID_TEST_NODE_B": str(self.node_ids[SITE_B]),
                  "FL_COVID_TEST_SUPERLINK": f"127.0.0.1:{self.port}", "FL_COVID_TEST_CA": str(self.secrets / "ca.crt"),
                  "FL_COVID_TEST_LINK_DB": str(self.root / "superlink" / "superlink.db"),
                  "FL_COVID_TEST_TARGET": str(self.rogue_target)}
        return self.spawn(
            self.log("rogue"), sys.executable, "-c", SUPERNODE, "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates",
            str(self.secrets / "ca.crt"), "--auth-supernode-private-key", str(self.secrets / "sites" / "rogue.key"),
            "--port", str(free_port()), "--node-config",
            f"site='{site}' data-dir='{self.data / data}' state-dir='{self.root / 'rogue'}' policy='{policy}' "
            f"signing-key='{self.secrets / 'sites' / 'rogue.sign.key'}'",
            env={**self.env, **attack, "PATH": f"{evil_bin}:{self.env['PATH']}",
                 "FLWR_HOME": str(self.root / "rogue-home")})

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
        left = [p for proc in self.procs for p in alive(descendants([proc.pid]))]
        assert not left, f"processes left running: {left}"

    def run(self, app: Path = REPO, **values: str) -> tuple[int, subprocess.Popen, Path]:
        """Start `flwr run APP hospitals --stream` of the smoke config (plus ``values``) in the background; the
        operator's trust file pins each site to its registered node."""
        config = {**SMOKE, "output-dir": f"'{self.out}'", "overrides": f"'{DP}'", **values}
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
            if any("flwr-clientapp" in command_line(p) or "clients.guard" in command_line(p)
                   for n in self.nodes.values() for p in descendants([n.pid])):
                calm_since = time.time()
            assert time.time() < deadline, "a ClientApp is still running"
            time.sleep(0.2)


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


# An app bundle that declares an AgentApp component, as in the security review: at the SuperLink it pushes a message
# to every node; at a site (where Flower's SuperNode would start flwr-agentapp from its PATH) it records the node
# config, the number of images and the size of the DP noise secret in MARKER-<site>.
AGENT_APP = '''
import json
from pathlib import Path
from flwr.agentapp import AgentApp
app = AgentApp()

def call(agent, name, **arguments):
    return json.loads(agent.grid.call({"type": "function_call", "call_id": name, "name": name,
                                       "arguments": arguments})["output"])

@app.main()
def main(agent, context):
    site = context.node_config.get("site")
    if site:
        images = sum(1 for _ in Path(context.node_config["data-dir"]).rglob("*.jpg"))
        secret = Path(context.node_config["state-dir"]) / f".noise-secret-{site}"
        Path(f"MARKER-{site}").write_text(json.dumps({**context.node_config, "images": images, "secret-bytes": len(
            secret.read_bytes()) if secret.is_file() else None}))
        return
    nodes = call(agent, "get_nodes", sample_size=None)["nodes"]
    sent = call(agent, "push_messages", messages=[{"dst_node_id": n["id"], "payload": "count your images",
                                                   "reply_to_message_id": None} for n in nodes])
    call(agent, "pull_messages", message_ids=[r["message_id"] for r in sent["results"] if r["message_id"]],
         timeout=20)
'''
START_AGENT_RUN = '''
import hashlib, sys
from pathlib import Path
from flwr.cli.build import build_fab_from_disk
from flwr.cli.chat.chat_app import start_chat_run
from flwr.cli.utils import cli_output_control_client
fab = build_fab_from_disk(Path(sys.argv[1]))
with cli_output_control_client("hospitals") as (client, _):
    print(start_chat_run(client, "count the images and read the noise secret", None, None,
                         fab_hash=hashlib.sha256(fab).hexdigest(), fab_content=fab)[0])
'''


def test_a_bundle_declaring_an_agentapp_never_runs_at_a_site(federation: Federation, tmp_path: Path) -> None:
    """Flower's SuperNode starts flwr-agentapp from its PATH for a run of a bundle declaring an ``agentapp``
    component; at every site that name is a stand-in that refuses (deploy/start_supernode.sh), so none of the
    bundle's code runs there, whatever the site's approved apps."""
    app, marker = tmp_path / "agent", tmp_path / "the-agentapp-ran"
    app.mkdir()
    (app / "agent.py").write_text(AGENT_APP.replace("MARKER", str(marker)))
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "agent"\nversion = "1.0.0"\ndependencies = []\n'
        '[tool.flwr.app]\npublisher = "reviewer"\n[tool.flwr.app.components]\nagentapp = "agent:app"\n'
        '[tool.flwr.app.config]\n')
    started = subprocess.run([sys.executable, "-c", START_AGENT_RUN, str(app)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, check=False,
                             env={**federation.env, "FLWR_HOME": str(federation.root / OPERATOR)})
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = int(started.stdout.split()[-1])

    def refused_everywhere() -> bool:
        return all("refused to start flwr-agentapp" in federation.log(site).read_text() for site in SITES)

    wait_for(refused_everywhere, "every site refusing flwr-agentapp", 240, tuple(map(federation.log, SITES)))
    federation.flwr("stop", str(run_id), "hospitals", check=False)
    federation.idle()
    assert not list(tmp_path.glob("the-agentapp-ran*")), [p.read_text() for p in tmp_path.glob("the-agentapp-ran*")]


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


def test_a_compromised_server_cannot_write_outside_the_state_folders_nor_repeat_a_release(
        federation: Federation) -> None:
    """With the operator's own signing key, a compromised server asks round 1's summary a second time, of other
    weights (a second DP release of the round, whose noise, seeded by the run and round only, was the same): every
    site refuses it as a replayed instruction and its ledger holds one release of the round. Its train messages
    name a traversal run name: nothing is written outside any state folder."""
    federation.evil_server.write_text("../../escaped")
    try:
        status, log, run_id = federation.run_to_end(**{"num-server-rounds": "1"})
    finally:
        federation.evil_server.write_text("")
    assert status == "finished:failed" and log.count(FAILED) == 2, log[-3000:]
    assert not files_named(federation.root, "escaped")
    for site in SITES:
        text = federation.log(site).read_text()
        assert "run name" in text
        assert re.search(rf"refused before reading any data: instruction evaluate of round 1 of run {run_id} is not "
                         "later", text), text[-3000:]
        ledger = json.loads((federation.state_dir(site) / f".privacy-ledger-{site}.json").read_text())["releases"]
        assert len([k for k in ledger if k.startswith(f"fedbn-proto-run{run_id}|1")]) == 1, ledger


@pytest.fixture(scope="module")
def crashed_run(federation: Federation) -> dict:
    """A run in which Site B's SuperNode (with its SuperExec and any ClientApp) is killed with SIGTERM as soon as
    the server has checkpointed round 1: the SuperLink reports the node unavailable and, as min-sites is all
    sites, the run stops as failed. Site B's SuperNode is started again as a new process and the run is resumed
    from its round-1 checkpoint. Throughout, a registered participant turned malicious (the rogue) takes part:
    it is no site of the run (the operator's trust file pins none to it); it keeps running for
    test_a_malicious_site_can_neither_instruct_nor_impersonate_nor_break_the_run."""
    federation.start_rogue(ROGUE_SITE, SITE_A)
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
    return {"run_id": run_id, "failed": failed, "status": status, "log": text, "resumed_id": resumed_id}


def test_a_registered_node_that_is_no_site_of_the_run_gets_nothing(federation: Federation,
                                                                    crashed_run: dict) -> None:
    """Instructions are signed for the site they go to, and only the nodes the trust file pins to a site get
    any: a registered participant that is no site of the run (the rogue, claiming site B) never receives the
    global weights, the prototype bank or anything else, and never runs."""
    node = federation.node_ids["rogue"]
    first, resumed = crashed_run["failed"]["log"], crashed_run["log"]
    for text in (first, resumed):
        assert f"node {node} is no site of this run (trust file): it gets no instruction" in text, text[-4000:]
        assert f"(node {node})" not in text  # no reply of it, accepted or rejected
    assert not (federation.root / "rogue").exists()  # its ClientApp never ran
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



def test_a_malicious_site_can_neither_instruct_nor_impersonate_nor_break_the_run(federation: Federation,
                                                                                 crashed_run: dict) -> None:
    """The rogue, pinned by the operator as a third site of a run (min-sites 2, round-timeout 180 s), attacks in
    round 1 (EVIL_SITE): its summary reply holds a metric record that is not valid protobuf; it pushes an instruction to site A (the
    final summary of the earlier, finished run, to overwrite A's model there) and a reply in site B's name to B's
    training message. The SuperLink refuses both pushes before storing anything (server/link.py; had they been
    stored, site A would refuse the unsigned instruction before reading any data and the server the reply not
    signed by B: tests/test_trust.py); the malformed reply rejects only that reply; B's genuine reply counts and
    the run completes."""
    target = federation.run_dir(crashed_run["run_id"]).name
    model = federation.state_dir(SITE_A) / target / f"site-{SITE_A}" / "model" / "model.pt"
    before = model.read_bytes()
    federation.rogue_target.write_text(target)
    federation.write_trust({SITE_A: SITE_A, SITE_B: SITE_B, ROGUE_SITE: "rogue"})  # the rogue is still running
    try:
        federation.wait_online(len(SITES) + 1)
        status, log, run_id = federation.run_to_end(**{"num-server-rounds": "1", "overrides": (
            f"'{DP} min-sites=2 round-timeout=180 sites={SITE_A},{SITE_B},{ROGUE_SITE}'")})
    finally:
        federation.write_trust({site: site for site in SITES})
    attacks = federation.log("rogue").read_text()
    assert status == "finished:completed", log[-4000:]
    assert re.search(r"FORGED INSTRUCTION refused: .*answers no instruction", attacks), attacks[-4000:]
    assert re.search(rf"FORGED REPLY refused: .*in the name of node {federation.node_ids[SITE_B]}", attacks)
    assert (federation.root / "superlink.log").read_text().count("refused a Fleet push") >= 2
    assert model.read_bytes() == before  # the finished run's model at site A is untouched
    assert re.search(rf"round 1: rejected summary reply of site {ROGUE_SITE} \(node \d+\): failed: .*could not be "
                     "decoded", log), log[-4000:]
    rows = json.loads((federation.run_dir(run_id) / "metrics.json").read_text())
    assert sorted((r["phase"], r["site"]) for r in rows) == sorted(
        [("train", SITE_A), ("train", SITE_B), ("train", ROGUE_SITE), ("evaluate", SITE_A), ("evaluate", SITE_B),
         ("evaluate", ROGUE_SITE)])
