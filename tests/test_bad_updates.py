"""The server rejects unsound replies, logs them naming the site, and goes on with the others when enough sites
remain (config key min-sites), else stops with NotEnoughSites. The bad replies are real replies of an in-process
federation (tests/inprocess.py) with one thing corrupted."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from fl_covid import records as R
from fl_covid.config import Config, federated_config
from fl_covid.federated import initial_shared
from fl_covid.validation import MAX_EXAMPLES
from server.strategy import NotEnoughSites, PrototypeFedAvg
from tests.inprocess import run_federation, shared_run, wire

SITE_B = "site_b_covidct"


def strategy_for(config: Config, min_sites: int, max_update_norm: float = 0.0) -> PrototypeFedAvg:
    """The server's strategy as server_app builds it for ``config``."""
    initial = initial_shared(config)
    return PrototypeFedAvg(
        method=config.method, site_names=config.sites, lr=config.lr, num_rounds=config.num_server_rounds,
        seed=config.seed, run_name="bad-updates", min_sites=min_sites, max_update_norm=max_update_norm,
        expected={k: (tuple(v.shape), v.numpy().dtype) for k, v in initial.items()})


def first_float(arrays: ArrayRecord) -> str:
    return next(k for k, v in arrays.items() if np.issubdtype(v.numpy().dtype, np.floating) and v.numpy().size > 1)


def set_array(record: ArrayRecord, key: str, value: np.ndarray) -> None:
    record[key] = Array(np.ascontiguousarray(value))


def nan_weight(m: Message) -> None:
    k = first_float(m.content[R.WEIGHTS])
    a = m.content[R.WEIGHTS][k].numpy().copy()
    a.flat[0] = np.nan
    set_array(m.content[R.WEIGHTS], k, a)


def inf_weight(m: Message) -> None:
    k = first_float(m.content[R.WEIGHTS])
    a = m.content[R.WEIGHTS][k].numpy().copy()
    a.flat[-1] = -np.inf
    set_array(m.content[R.WEIGHTS], k, a)


def missing_key(m: Message) -> None:
    del m.content[R.WEIGHTS][first_float(m.content[R.WEIGHTS])]


def extra_key(m: Message) -> None:  # e.g. a site that sends its BN statistics after all
    set_array(m.content[R.WEIGHTS], "features.0.bns.0.running_mean", np.zeros(8, np.float32))


def wrong_shape(m: Message) -> None:
    k = first_float(m.content[R.WEIGHTS])
    set_array(m.content[R.WEIGHTS], k, m.content[R.WEIGHTS][k].numpy().reshape(-1)[:-1])


def wrong_dtype(m: Message) -> None:
    k = first_float(m.content[R.WEIGHTS])
    set_array(m.content[R.WEIGHTS], k, m.content[R.WEIGHTS][k].numpy().astype(np.float64))


def prototypes_wrong_dimension(m: Message) -> None:
    set_array(m.content[R.PROTOTYPES], R.P_VECTORS, m.content[R.PROTOTYPES][R.P_VECTORS].numpy()[:, :64].copy())


def prototypes_nan(m: Message) -> None:
    v = m.content[R.PROTOTYPES][R.P_VECTORS].numpy().copy()
    v[1, 3] = np.nan
    set_array(m.content[R.PROTOTYPES], R.P_VECTORS, v)


def prototypes_not_unit(m: Message) -> None:
    set_array(m.content[R.PROTOTYPES], R.P_VECTORS, m.content[R.PROTOTYPES][R.P_VECTORS].numpy() * 50)


def absurd_examples(m: Message) -> None:
    m.content[R.METRICS][R.NUM_EXAMPLES] = MAX_EXAMPLES * 100


def negative_examples(m: Message) -> None:
    m.content[R.METRICS][R.NUM_EXAMPLES] = -5


def fractional_examples(m: Message) -> None:
    m.content[R.METRICS][R.NUM_EXAMPLES] = 4.5


def nan_metric(m: Message) -> None:
    m.content[R.METRICS]["loss"] = float("nan")


def extra_metric(m: Message) -> None:
    m.content[R.METRICS]["labels-sum"] = 3


def extra_record(m: Message) -> None:
    m.content["images"] = ArrayRecord({"x": Array(np.zeros((2, 1, 37, 37), np.uint8))})


def claims_other_site(m: Message) -> None:
    m.content[R.METRICS][R.SITE_ID] = 0
    set_array(m.content[R.PROTOTYPES], R.P_SITES, np.zeros(2, np.int64))


def prototypes_of_other_site(m: Message) -> None:
    set_array(m.content[R.PROTOTYPES], R.P_SITES, np.zeros(2, np.int64))


def unknown_site(m: Message) -> None:
    m.content[R.METRICS][R.SITE_ID] = 7


CORRUPTIONS = {
    "NaN": (nan_weight, "NaN or Inf"), "Inf": (inf_weight, "NaN or Inf"),
    "missing key": (missing_key, "wrong keys"), "extra key": (extra_key, "wrong keys"),
    "shape": (wrong_shape, "has shape"), "dtype": (wrong_dtype, "has dtype"),
    "prototype dimension": (prototypes_wrong_dimension, "prototypes have shape"),
    "prototype NaN": (prototypes_nan, "NaN or Inf"), "prototype norm": (prototypes_not_unit, "unit vectors"),
    "absurd num-examples": (absurd_examples, "num-examples"), "negative num-examples": (negative_examples,
                                                                                       "num-examples"),
    "fractional num-examples": (fractional_examples, "num-examples"), "NaN metric": (nan_metric, "finite"),
    "extra metric": (extra_metric, "metric keys"), "extra record": (extra_record, "unexpected records"),
    "duplicate site": (claims_other_site, "already answered"), "unknown site": (unknown_site, "site-id 7"),
    "prototypes of another site": (prototypes_of_other_site, "prototype record must hold"),
}


def real_replies() -> tuple[Config, list[Message]]:
    """Round-1 training replies of both sites of a real fedbn-proto run, as the server receives them."""
    grid, _ = shared_run("fedbn-proto")
    return federated_config(grid.run_config), [wire(grid.delivery(p, 1).reply) for p in (0, 1)]


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_bad_reply_is_rejected_and_the_round_goes_on(case: str, caplog: pytest.LogCaptureFixture) -> None:
    corrupt, reason = CORRUPTIONS[case]
    config, replies = real_replies()
    genuine = {k: v.numpy() for k, v in replies[0].content[R.WEIGHTS].items()}
    corrupt(replies[1])
    strategy = strategy_for(config, min_sites=1)
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    rejected = [r.getMessage() for r in caplog.records if "rejected reply" in r.getMessage()]
    assert len(rejected) == 1 and reason in rejected[0], rejected
    assert f"(node {replies[1].metadata.src_node_id})" in rejected[0]
    if case not in ("duplicate site", "unknown site"):  # else the reply's own claim is all the server has
        assert SITE_B in rejected[0]
    # only site A's update is averaged in, and only its prototypes enter the bank
    assert arrays is not None and list(arrays.keys()) == list(genuine)
    assert all(np.array_equal(arrays[k].numpy(), genuine[k]) for k in genuine)
    assert strategy.bank.sites.tolist() == [0, 0]


@pytest.mark.parametrize("case", ["NaN", "prototype dimension", "absurd num-examples"])
def test_too_few_sound_replies_stop_the_run(case: str) -> None:
    config, replies = real_replies()
    CORRUPTIONS[case][0](replies[1])
    with pytest.raises(NotEnoughSites, match="min-sites"):
        strategy_for(config, min_sites=2).aggregate_train(1, replies)


def test_sound_replies_pass() -> None:
    config, replies = real_replies()
    arrays, _ = strategy_for(config, min_sites=2).aggregate_train(1, replies)
    assert arrays is not None


def update_norm(reply: Message, sent: ArrayRecord) -> float:
    """L2 norm of (reply - sent) over all float tensors, computed independently of the server's code."""
    diffs = [reply.content[R.WEIGHTS][k].numpy().astype(np.float64) - sent[k].numpy()
             for k in sent.keys() if np.issubdtype(sent[k].numpy().dtype, np.floating)]
    return float(np.sqrt(sum(np.sum(d ** 2) for d in diffs)))


def test_update_norm_bound(caplog: pytest.LogCaptureFixture) -> None:
    grid, _ = shared_run("fedbn-proto")
    config, replies = real_replies()
    sent = grid.delivery(0, 1).message.content[R.WEIGHTS]
    norms = [update_norm(r, sent) for r in replies]
    assert min(norms) > 0 and abs(norms[0] - norms[1]) > 1e-3 * max(norms)

    def accepted(bound: float) -> list[int]:
        strategy = strategy_for(config, min_sites=1, max_update_norm=bound)
        strategy.reference = {k: v.numpy() for k, v in sent.items()}  # as configure_train sets it
        strategy.aggregate_train(1, [wire(r) for r in replies])
        return sorted(set(strategy.bank.sites.tolist()))

    small, large = sorted(range(2), key=lambda i: norms[i])
    assert accepted(max(norms) * 1.001) == [0, 1]
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        assert accepted((norms[0] + norms[1]) / 2) == [small]
    assert any("exceeds the bound" in r.getMessage() for r in caplog.records)
    with pytest.raises(NotEnoughSites):
        accepted(min(norms) * 0.999)


def nan_from_site_b_in_round_1(partition: int, reply: Message) -> Message:
    if partition == 1 and reply.metadata.message_type == "train":
        nan_weight(reply)
    return reply


def test_federation_continues_without_a_bad_site(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """End to end: site B's round-1 update carries a NaN; with min-sites=1 the round averages site A alone."""
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        grid = run_federation(tmp_path, tamper=nan_from_site_b_in_round_1, method="fedbn-proto",
                              overrides="min-sites=1", **{"num-server-rounds": 1})
    assert any("rejected reply of site site_b_covidct" in r.getMessage() and "NaN" in r.getMessage()
               for r in caplog.records)
    site_a = grid.delivery(0, 1).reply.content[R.WEIGHTS]
    evaluated = grid.delivery(0, 1, "evaluate").message.content[R.WEIGHTS]
    assert list(evaluated.keys()) == list(site_a.keys())
    assert all(np.array_equal(evaluated[k].numpy(), site_a[k].numpy()) for k in site_a.keys())
    assert grid.banks[1].sites.tolist() == [0, 0]


def test_federation_stops_when_too_few_sites_remain(tmp_path: Path) -> None:
    with pytest.raises(NotEnoughSites):
        run_federation(tmp_path, tamper=nan_from_site_b_in_round_1, method="fedbn", **{"num-server-rounds": 1})
