"""End-to-end authentication (fl_covid/trust.py, server/signing.py, clients/client_app.py): statements, the
site's refusal of unsigned, mis-signed, replayed and reordered instructions before it reads any data, and the
server's rejection of replies not signed by the site their instruction went to, in a real two-site federation in
this process with deployed node configs."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients import client_app
from fl_covid import records as R
from fl_covid.errors import ConfigError
from fl_covid.experiments.federation import run_in_process
from fl_covid.policy import TRUST_ENV, load_server_trust, load_site_policy, parse_node_config
from fl_covid.trust import (
    Instruction,
    InstructionLog,
    NotTrusted,
    Reply,
    load_private_key,
    parse_public_key,
    public_key_text,
    sign,
    verify,
)
from server.link import refusal
from tests.conftest import SITE_A, SITE_B
from tests.inprocess import SMOKE, RecordingGrid, Tamper, default_run_config, run_dir

SITES = (SITE_A, SITE_B)
DATA = Path(__file__).resolve().parents[1] / "data"


def write_key(folder: Path, name: str) -> Path:
    """An Ed25519 private key as deploy/make_signing_key.sh writes it (PEM, mode 0600)."""
    file = folder / f"{name}.sign.key"
    file.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    file.chmod(0o600)
    return file


def test_a_statement_verifies_only_unchanged_and_under_its_key() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    instruction = Instruction(7, 7, 2, "train", SITE_B, "c" * 64)
    signature = sign(key, instruction)
    verify(key.public_key(), instruction, signature)
    changed = [replace(instruction, run_id=8), replace(instruction, origin=3), replace(instruction, round=3),
               replace(instruction, message_type="evaluate"), replace(instruction, site=SITE_A),
               replace(instruction, content="d" * 64)]
    for statement in changed:
        with pytest.raises(NotTrusted, match="does not match"):
            verify(key.public_key(), statement, signature)
    with pytest.raises(NotTrusted, match="does not match"):
        verify(other.public_key(), instruction, signature)
    with pytest.raises(NotTrusted, match="not signed"):
        verify(key.public_key(), instruction, None)
    reply = Reply(7, "m" * 64, SITE_B, "c" * 64)  # a reply's signature never stands for an instruction's
    with pytest.raises(NotTrusted):
        verify(key.public_key(), reply, signature)
    assert parse_public_key(public_key_text(key)).public_bytes_raw() == key.public_key().public_bytes_raw()
    for bad in ("not base64!", "AAAA"):
        with pytest.raises(NotTrusted, match="operator-key"):
            parse_public_key(bad, "operator-key")


def test_keys_are_read_from_owner_only_pem_files(tmp_path: Path) -> None:
    file = write_key(tmp_path, "site")
    assert isinstance(load_private_key(file), Ed25519PrivateKey)
    file.chmod(0o644)
    with pytest.raises(NotTrusted, match="chmod 600"):
        load_private_key(file)
    (tmp_path / "junk.key").write_text("junk")
    (tmp_path / "junk.key").chmod(0o600)
    with pytest.raises(NotTrusted, match="make_signing_key"):
        load_private_key(tmp_path / "junk.key")
    with pytest.raises(ConfigError, match="operator-key"):
        load_site_policy(None, {"operator-key": "AAAA"})
    with pytest.raises(ConfigError, match="min-dp-epsilon"):
        load_site_policy(None, {"min-dp-epsilon": "2", "max-dp-epsilon": "1"})


def test_the_instruction_log_refuses_replayed_and_reordered_instructions(tmp_path: Path) -> None:
    log = InstructionLog(tmp_path / ".instructions-a.json")
    for rnd, kind in ((1, "evaluate"), (1, "train"), (2, "train"), (3, "evaluate")):
        log.accept(Instruction(5, 5, rnd, kind, "a", "c"))
    for rnd, kind in ((3, "evaluate"), (2, "train"), (1, "evaluate")):  # replayed, then older
        with pytest.raises(NotTrusted, match="replayed or reordered"):
            InstructionLog(tmp_path / ".instructions-a.json").accept(Instruction(5, 5, rnd, kind, "a", "c"))
    log.accept(Instruction(6, 5, 1, "evaluate", "a", "c"))  # another run (a resume) has its own order
    with pytest.raises(NotTrusted, match="message type"):
        log.accept(Instruction(6, 5, 2, "query", "a", "c"))


def test_the_superlink_refuses_pushes_not_in_the_pushing_nodes_name() -> None:
    assert refusal(11, [(11, "m1")]) is None
    assert "in the name of node 12" in refusal(11, [(11, "m1"), (12, "m2")])
    assert "answers no instruction" in refusal(11, [(11, "")])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Keys, policies and the operator's trust file of a two-site deployment run in this process."""
    root = tmp_path_factory.mktemp("trust")
    operator = write_key(root, "operator")
    sites = {site: write_key(root, site) for site in SITES}
    nodes = {site: 9_000_001 + i for i, site in enumerate(SITES)}  # the in-process grid's node ids
    trust = root / "trust.yaml"
    trust.write_text(f"signing-key: {operator}\nsites:\n" + "".join(
        f"  {s}: {{node: {nodes[s]}, key: {public_key_text(load_private_key(k))}}}\n" for s, k in sites.items()))
    assert load_server_trust(trust).nodes == nodes
    return {"root": root, "operator": operator, "sites": sites, "nodes": nodes, "trust": trust,
            "operator-key": public_key_text(load_private_key(operator))}


def node_config(deployment: dict, site: str, data_dir: Path | None = None) -> dict[str, str]:
    return {"site": site, "data-dir": str(data_dir or DATA / site), "state-dir": str(deployment["root"] / site),
            "signing-key": str(deployment["sites"][site]), "operator-key": deployment["operator-key"]}


def deployed_run(deployment: dict, output: Path, run_id: int, tamper: Tamper | None = None,
                 **values: object) -> RecordingGrid:
    """The real ServerApp and ClientApps in this process, each node with a deployment's node config."""
    config = default_run_config(**{**SMOKE, "output-dir": str(output), "num-server-rounds": 1, **values})
    grid = RecordingGrid(config, len(SITES), run_id=run_id, tamper=tamper)
    for node, site in zip(grid.contexts, SITES, strict=True):
        grid.contexts[node].node_config = {**grid.contexts[node].node_config, **node_config(deployment, site)}
    os.environ[TRUST_ENV] = str(deployment["trust"])
    try:
        run_in_process(grid)
    finally:
        del os.environ[TRUST_ENV]
    return grid


@pytest.fixture(scope="module")
def signed_run(deployment: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[RecordingGrid, Path]:
    output = tmp_path_factory.mktemp("signed-run")
    return deployed_run(deployment, output, run_id=31), output


def test_a_signed_run_completes_and_every_message_is_signed(deployment: dict, signed_run: tuple) -> None:
    grid, output = signed_run
    assert (run_dir(output) / "final_metrics.json").is_file()
    for d in grid.deliveries:
        site = SITES[d.partition]
        signature, origin = R.read_signature(d.message.content)
        verify(parse_public_key(deployment["operator-key"]), Instruction(
            31, 31, d.round, d.kind, site, R.content_digest(d.message.content)), signature)
        assert origin == 31 and d.message.content[R.CONFIG][R.RUN_NAME] == "fedbn-proto-run31"
        reply_signature, _ = R.read_signature(d.reply.content)
        verify(load_private_key(deployment["sites"][site]).public_key(), Reply(
            31, d.message.metadata.message_id, site, R.content_digest(d.reply.content)), reply_signature)


def deliver(msg: Message, context: Context) -> Message:
    """``msg`` run by the ClientApp; an exception becomes the error reply a SuperNode would send."""
    return RecordingGrid.call(msg, context)


def test_a_site_refuses_instructions_it_cannot_trust_before_reading_any_data(
        deployment: dict, signed_run: tuple, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another site (or anyone who can store a message) sends site B the final summary of the finished run,
    unsigned, signed with its own key, signed for site A, replayed, or out of order: refused, and the data folder
    (here one that does not exist) is never read; a genuine, signed instruction gets as far as the data."""
    grid, _ = signed_run
    final = next(d for d in grid.deliveries if d.partition == 1 and d.round == 2)  # B's final summary
    model = deployment["root"] / SITE_B / "fedbn-proto-run31" / f"site-{SITE_B}" / "model" / "model.pt"
    before = model.read_bytes()
    context = Context(run_id=31, node_id=final.node_id, state=RecordDict(), run_config=grid.run_config,
                      node_config=node_config(deployment, SITE_B, tmp_path / "no-such-data"))
    rogue = load_private_key(write_key(tmp_path, "rogue"))

    def forged(signer: Ed25519PrivateKey | None, site: str = SITE_B, rnd: int = 2) -> Message:
        msg = Message(RecordDict({k: v for k, v in final.message.content.items() if k != R.SIGNATURE}),
                      final.node_id, "evaluate")
        msg.content[R.CONFIG] = ConfigRecord({**final.message.content[R.CONFIG], R.ROUND: rnd})
        if signer is not None:
            msg.content[R.SIGNATURE] = R.signature_record(sign(signer, Instruction(
                31, 31, rnd, "evaluate", site, R.content_digest(msg.content))), 31)
        msg.metadata.__dict__["_message_id"] = "f" * 64
        return msg

    operator = load_private_key(deployment["operator"])
    attempts = {"unsigned": forged(None), "signed by another key": forged(rogue),
                "signed for another site": forged(operator, SITE_A), "replayed": final.message,
                "out of order": forged(operator, rnd=1)}
    for what, msg in attempts.items():
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            reply = deliver(msg, context)
        assert reply.has_error() and "instruction refused" in reply.error.reason, what
        assert "refused before reading any data" in caplog.text and "no-such-data" not in caplog.text, what
    assert model.read_bytes() == before
    # a genuine instruction of a new run (signed for B, in order) passes and reaches the (missing) data
    context.run_id = 32
    fresh = forged(None, rnd=1)
    fresh.content[R.CONFIG][R.RUN_NAME] = "fedbn-proto-run32"
    fresh.content[R.SIGNATURE] = R.signature_record(sign(operator, Instruction(
        32, 32, 1, "evaluate", SITE_B, R.content_digest(fresh.content))), 32)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        reply = deliver(fresh, context)
    assert reply.has_error() and "could not complete" in reply.error.reason
    assert "no-such-data" in caplog.text


def test_a_signed_instruction_cannot_rewrite_a_finished_run(deployment: dict, signed_run: tuple,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The operator itself cannot make a site write into another run's folder, nor resume a finished run: a site
    derives its folder from the signed run id, and a finished run's model is written once."""
    grid, _ = signed_run
    final = next(d for d in grid.deliveries if d.partition == 0 and d.round == 2)
    model = deployment["root"] / SITE_A / "fedbn-proto-run31" / f"site-{SITE_A}" / "model" / "model.pt"
    before = model.read_bytes()
    operator = load_private_key(deployment["operator"])
    cases = {(40, 40): "is not fedbn-proto-run40", (41, 31): "is finished here"}  # (run, origin): reason
    for (run_id, origin), reason in cases.items():
        msg = Message(RecordDict({k: v for k, v in final.message.content.items() if k != R.SIGNATURE}),
                      final.node_id, "evaluate")  # the final summary naming the finished run's folder
        msg.content[R.SIGNATURE] = R.signature_record(sign(operator, Instruction(
            run_id, origin, 2, "evaluate", SITE_A, R.content_digest(msg.content))), origin)
        msg.metadata.__dict__["_message_id"] = f"{run_id}" * 32
        context = Context(run_id=run_id, node_id=final.node_id, state=RecordDict(), run_config=grid.run_config,
                          node_config=node_config(deployment, SITE_A))
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            reply = deliver(msg, context)
        assert reply.has_error() and "refused" in reply.error.reason and reason in caplog.text, (run_id, origin)
    assert model.read_bytes() == before


def test_a_reply_in_another_sites_name_is_rejected(deployment: dict, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Site A answers site B's training message in B's name, with weights of its choosing (B's negated) signed
    with A's own key: the server rejects it as B's failure for the round; the run goes on under min-sites."""
    a_key = load_private_key(deployment["sites"][SITE_A])

    def tamper(partition: int, reply: Message) -> Message:
        if partition != 1 or reply.metadata.message_type != "train":
            return reply
        flat = R.read_weights(reply.content[R.WEIGHTS], len(reply.content[R.WEIGHTS][R.FLAT].numpy()), "none")
        forged = Message(RecordDict({R.WEIGHTS: R.weights_record(-flat), R.METRICS: reply.content[R.METRICS]}),
                         reply_to=reply)
        forged.metadata.__dict__["_reply_to_message_id"] = reply.metadata.reply_to_message_id
        forged.metadata.__dict__["_src_node_id"] = reply.metadata.src_node_id
        forged.content[R.SIGNATURE] = R.signature_record(sign(a_key, Reply(
            51, reply.metadata.reply_to_message_id, SITE_B, R.content_digest(forged.content))))
        return forged

    with caplog.at_level(logging.WARNING):
        deployed_run(deployment, tmp_path, run_id=51, tamper=tamper, overrides="min-sites=1")
    assert f"rejected training reply of site {SITE_B}" in caplog.text
    assert f"not signed by site {SITE_B}'s key" in caplog.text
    rows = json.loads((run_dir(tmp_path) / "metrics.json").read_text())
    assert sorted(r["site"] for r in rows if r["phase"] == "train") == [SITE_A]


def test_a_deployed_site_without_an_operator_key_refuses_everything(tmp_path: Path) -> None:
    node = parse_node_config({"site": SITE_A, "data-dir": "/d", "state-dir": str(tmp_path)})
    with pytest.raises(NotTrusted, match="operator-key"):
        client_app._authenticate(Message(RecordDict(), 1, "train"), Context(1, 1, {}, RecordDict(), {}), node)


def test_every_task_process_but_the_clientapp_is_refused_at_a_site(tmp_path: Path) -> None:
    """Every task process a SuperNode of this Flower release can start, but the guarded ClientApp, has a refusing
    stand-in; a task that installs a bundle refuses it at Flower's installation step; the guard refuses a bundle
    declaring other components than a ServerApp and a ClientApp."""
    import importlib

    from flwr.cli.build import build_fab_from_disk
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    from clients.guard import REFUSED_TASKS, declared_components, refuse

    assert set(REFUSED_TASKS) == set(TASK_TYPE_TO_COMMAND.values()) - {"flwr-clientapp"}
    for entry in filter(None, REFUSED_TASKS.values()):
        module, function, runtime = entry
        assert callable(getattr(importlib.import_module(module), function))
        assert callable(importlib.import_module(runtime).install_from_fab)
    with pytest.raises(SystemExit):
        refuse("flwr-model")
    assert declared_components(build_fab_from_disk(Path(__file__).resolve().parents[1])) == {"serverapp", "clientapp"}
    (tmp_path / "agent.py").write_text("app = None\n")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "agent"\nversion = "1.0.0"\ndependencies = []\n[tool.flwr.app]\npublisher = "x"\n'
        '[tool.flwr.app.components]\nagentapp = "agent:app"\n[tool.flwr.app.config]\n')
    assert declared_components(build_fab_from_disk(tmp_path)) == {"agentapp"}
