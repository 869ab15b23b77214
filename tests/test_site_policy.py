"""A site decides its own limits and trusts nothing the server sends (real ServerApp and ClientApps in process,
tests/inprocess.py): runs that break the site's policy are refused before any training, the server learns only
a generic reason while the site logs the details, run names cannot lead outside the state folder, the experiment
config comes from the app's own copy, malformed weights or prototype banks from the server are refused, and old
training state is pruned."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message

from clients import client_app
from fl_covid import records as R
from fl_covid.config import load_config
from fl_covid.errors import ConfigError
from fl_covid.policy import SitePolicy, load_site_policy, parse_node_config
from server.strategy import NotEnoughSites
from tests.inprocess import copy_context, run_dir, run_federation, shared_run, wire


def call_site(msg: Message, context: Context) -> Message:
    """The real ClientApp on a copy of a site's context; its exception (what the server would learn) propagates."""
    return client_app.app(msg, copy_context(context))


REFUSED = "run refused by the site's policy (reasons in the site's log)"
FAILED = "the site could not complete this request (details in the site's log)"


def refused_run(tmp_path: Path, caplog: pytest.LogCaptureFixture, node_config: dict, **values: object
                ) -> tuple[list[str], list[str]]:
    """Run one round that both sites must refuse: (what the server logged of the sites, what the sites logged)."""
    with caplog.at_level(logging.INFO), pytest.raises(NotEnoughSites):
        run_federation(tmp_path, node_config=node_config, **{"num-server-rounds": 1, **values})
    server = [r.getMessage() for r in caplog.records if r.name == "server.strategy" and "rejected" in r.getMessage()]
    site = [r.getMessage() for r in caplog.records if r.name == "clients.client_app"]
    assert not list(tmp_path.glob("*/site-*/state"))  # nothing trained, no state saved
    return server, site


@pytest.mark.parametrize("node_config, values, detail", [
    ({"allowed-methods": "fedbn,fedprox"}, {"method": "fedbn-proto"}, "not among allowed-methods"),
    ({"allowed-methods": "fedbn,fedbn-proto"}, {"method": "fedavg"}, "'fedavg' is not among allowed-methods"),
    ({"require-dp": "true"}, {}, "differential privacy (require-dp) but dp-epsilon is 0"),
    ({"max-dp-epsilon": "1.0"}, {"overrides": "dp-epsilon=5"}, "dp-epsilon 5.0 per round exceeds"),
    ({"max-local-steps": "2"}, {"local-steps": 3}, "local-steps 3 exceeds the site's cap 2"),
    ({"max-rounds": "5"}, {"num-server-rounds": 6}, "num-server-rounds 6 exceeds the site's cap 5"),
    ({"max-width": "0.1"}, {}, "width 0.125 exceeds"),
    ({"max-batch-size": "2"}, {}, "batch-size 4 exceeds"),
    ({"max-image-size": "16"}, {}, "image-size 32 exceeds"),
    ({"max-threads": "1"}, {"overrides": "num-threads=2"}, "num-threads 2 exceeds"),
    ({"min-prototype-images": "5"}, {}, "min-prototype-images 2 is below the site's 5"),
])
def test_a_run_breaking_the_policy_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture, node_config: dict,
                                              values: dict, detail: str) -> None:
    server, site = refused_run(tmp_path, caplog, node_config, **values)
    assert len(server) == 2 and all(REFUSED in line for line in server), server
    assert not any(detail in line for line in server)  # the details stay at the site
    assert sum(detail in line for line in site) == 2, site


def test_dp_within_the_policy_is_accepted(tmp_path: Path) -> None:
    run_federation(tmp_path, node_config={"require-dp": "true", "max-dp-epsilon": "1.0"},
                   overrides="dp-epsilon=0.5", **{"num-server-rounds": 1})
    assert (run_dir(tmp_path) / "final_metrics.json").is_file()


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped", "..", ".", ".hidden", "a/../../escaped", "",
                                  "x" * 200, "run\nname"])
def test_a_run_name_cannot_leave_the_state_folder(name: str, caplog: pytest.LogCaptureFixture) -> None:
    grid, output = shared_run("fedbn-proto")

    def escaped() -> list[Path]:
        """Files named like the escape targets: beside the output folder and in /tmp (where the names lead, one
        level), anywhere inside the output folder (other jobs' files elsewhere in /tmp are not scanned)."""
        return sorted({*output.parent.glob("*escaped*"), *Path("/tmp").glob("*escaped*"), *output.rglob("*escaped*")})

    before = escaped()
    for kind in ("train", "evaluate"):
        msg = wire(grid.delivery(0, 1, kind).message)
        msg.content[R.CONFIG][R.RUN_NAME] = name
        with caplog.at_level(logging.ERROR, logger="clients.client_app"), pytest.raises(client_app.SiteFailure, match=re.escape(FAILED)):
            call_site(msg, grid.contexts[grid.delivery(0, 1).node_id])
    assert escaped() == before
    assert "run name" in caplog.text


@pytest.mark.parametrize("config_file", ["/etc/passwd", "../pyproject.toml", "configs/../pyproject.toml",
                                         "configs/missing.yaml", "pyproject.toml", "configs/default.yaml.bak"])
def test_the_server_cannot_probe_files_through_config_file(config_file: str, caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    """Whatever config-file names, the site answers with the same generic failure: the server learns neither
    whether a file exists nor anything of its content."""
    grid, _ = shared_run("fedbn-proto")
    context = copy_context(grid.contexts[grid.delivery(0, 1).node_id])
    context.run_config["config-file"] = config_file
    with caplog.at_level(logging.ERROR, logger="clients.client_app"), \
            pytest.raises(client_app.SiteFailure, match=re.escape(FAILED)) as refused:
        client_app.app(wire(grid.delivery(0, 1).message), context)
    assert str(refused.value) == FAILED and refused.value.__cause__ is None
    assert "must name a file configs/NAME.yaml" in caplog.text or "is not one of the app's configs" in caplog.text


def corrupt_bank(field: str, value: np.ndarray):
    def apply(record: ArrayRecord) -> None:
        record[field] = Array(np.ascontiguousarray(value))
    return apply


@pytest.mark.parametrize("corruption", [
    lambda r: [corrupt_bank(k, v)(r) for k, v in ((R.P_VECTORS, np.ones((200_000, 128), np.float32) / 128 ** 0.5),
                                                   (R.P_LABELS, np.zeros(200_000, np.int64)),
                                                   (R.P_SITES, np.zeros(200_000, np.int64)),
                                                   (R.P_COUNTS, np.full(200_000, 5, np.int64)))],
    lambda r: corrupt_bank(R.P_LABELS, np.array([0, 7, 0, 1], np.int64))(r),
    lambda r: corrupt_bank(R.P_COUNTS, np.array([-3, 5, 5, 5], np.int64))(r),
    lambda r: corrupt_bank(R.P_COUNTS, np.array([5, 5, 5, 5], np.float64))(r),
    lambda r: corrupt_bank(R.P_VECTORS, np.full((4, 128), np.nan, np.float32))(r),
], ids=["200000 rows", "label 7", "count -3", "float counts", "NaN vectors"])
def test_a_malformed_bank_from_the_server_is_refused(corruption, caplog: pytest.LogCaptureFixture) -> None:
    grid, _ = shared_run("fedbn-proto")
    msg = wire(grid.delivery(0, 2).message)
    corruption(msg.content[R.PROTOTYPES])
    with caplog.at_level(logging.ERROR, logger="clients.client_app"), pytest.raises(client_app.SiteFailure, match=re.escape(FAILED)):
        call_site(wire(msg), grid.contexts[grid.delivery(0, 2).node_id])


@pytest.mark.parametrize("dtype", [np.float64, np.int8])
def test_weights_of_another_dtype_from_the_server_are_refused(dtype: type) -> None:
    grid, _ = shared_run("fedbn-proto")
    msg = wire(grid.delivery(0, 1, "evaluate").message)
    flat = msg.content[R.WEIGHTS][R.FLAT].numpy()
    msg.content[R.WEIGHTS] = ArrayRecord({R.FLAT: Array(flat.astype(dtype))})
    with pytest.raises(client_app.SiteFailure, match=re.escape(FAILED)):
        call_site(wire(msg), grid.contexts[grid.delivery(0, 1).node_id])


def test_old_training_state_is_pruned(tmp_path: Path) -> None:
    for run_id in (1, 2, 3):
        run_federation(tmp_path, node_config={"keep-runs": "2"}, run_id=run_id, **{"num-server-rounds": 1})
    states = sorted(p.parent.parent.name for p in tmp_path.glob("*/site-*/state"))
    assert states == ["fedbn-proto-run2", "fedbn-proto-run2", "fedbn-proto-run3", "fedbn-proto-run3"]
    assert len(list(tmp_path.glob("*/site-*/predictions.csv"))) == 6  # results stay


def test_site_policy_parsing() -> None:
    node = parse_node_config({"site": "a", "data-dir": "/d", "state-dir": "/s", "allowed-methods": "fedbn, fedprox",
                              "require-dp": "true", "max-dp-epsilon": "2"})
    assert node.policy.allowed_methods == ("fedbn", "fedprox") and node.policy.require_dp
    assert node.policy.violations(load_config("configs/smoke.yaml", {"method": "fedbn"})) == []
    for bad, key in (({"allowed-methods": "joint"}, "allowed-methods"), ({"max-rounds": "0"}, "max-rounds"),
                     ({"approved-apps": "abc"}, "approved-apps"), ({"colour": "red"}, "colour"),
                     ({"site": "a", "data-dir": "rel", "state-dir": "/s"}, "data-dir")):
        with pytest.raises(ConfigError, match=key):
            parse_node_config({"partition-id": 0, "num-partitions": 2, **bad})
    assert SitePolicy().violations(load_config("configs/smoke.yaml")) == []


def test_policy_file_and_node_config(tmp_path: Path) -> None:
    file = tmp_path / "policy.yaml"
    file.write_text("approved-apps: [" + "a" * 64 + "]\nallowed-methods: [fedbn]\nmax-rounds: 7\n")
    policy = load_site_policy(file, {"max-rounds": "9"})
    assert policy.approved_apps == ("a" * 64,) and policy.allowed_methods == ("fedbn",) and policy.max_rounds == 9
    node = parse_node_config({"site": "a", "data-dir": "/d", "state-dir": "/s", "policy": str(file)})
    assert node.policy.max_rounds == 7
    file.write_text("max-rounds: [1, 2]\n")
    with pytest.raises(ConfigError, match="max-rounds"):
        load_site_policy(file)


def test_a_federated_run_refuses_a_centralized_method(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config key 'method' is 'joint'"):
        run_federation(tmp_path, method="joint", **{"num-server-rounds": 1})
    assert not list(tmp_path.rglob("final_metrics.json"))
