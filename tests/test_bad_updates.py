"""The server rejects unsound replies, whatever they hold, logs them naming the site, and goes on with the others
when enough sites remain (config key min-sites), else stops with NotEnoughSites. The bad replies are real replies
of an in-process federation (tests/inprocess.py) with one thing corrupted; no corruption may crash the server."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord

from fl_covid import records as R
from fl_covid.config import Config, federated_config
from fl_covid.federated import initial_shared
from fl_covid.validation import MAX_EXAMPLES
from server.strategy import NotEnoughSites, SitesMixin, build_strategy
from tests.inprocess import run_federation, shared_run, wire

SITE_B = "site_b_covidct"


def strategy_for(config: Config, on_row: Callable[[str, dict], None] | None = None, **overrides: Any) -> SitesMixin:
    """The server's strategy as server_app builds it for ``config`` with ``overrides`` (``on_row``: receives the
    rows it logs)."""
    config = config.replace(**overrides)
    initial, proj_dim = initial_shared(config)
    return build_strategy(config, "bad-updates", R.layout_size(R.layout_of(initial)), proj_dim, on_row=on_row)


def flat(m: Message) -> np.ndarray:
    return m.content[R.WEIGHTS][R.FLAT].numpy().copy()


def set_flat(m: Message, value: np.ndarray) -> None:
    m.content[R.WEIGHTS] = ArrayRecord({R.FLAT: Array(np.ascontiguousarray(value))})


def set_array(record: ArrayRecord, key: str, value: np.ndarray) -> None:
    record[key] = Array(np.ascontiguousarray(value))


def nan_weight(m: Message) -> None:
    a = flat(m)
    a[7] = np.nan
    set_flat(m, a)


def inf_weight(m: Message) -> None:
    a = flat(m)
    a[-1] = -np.inf
    set_flat(m, a)


def extra_array(m: Message) -> None:  # e.g. a site that sends its BN statistics after all
    set_array(m.content[R.WEIGHTS], "features.0.bns.0.running_mean", np.zeros(8, np.float32))


def short_weights(m: Message) -> None:
    set_flat(m, flat(m)[:-1])


def float64_weights(m: Message) -> None:
    set_flat(m, flat(m).astype(np.float64))


def unknown_serialisation(m: Message) -> None:
    a = m.content[R.WEIGHTS][R.FLAT]
    m.content[R.WEIGHTS][R.FLAT] = Array(dtype=a.dtype, shape=a.shape, stype="pickle", data=a.data)


def garbage_bytes(m: Message) -> None:
    a = m.content[R.WEIGHTS][R.FLAT]
    m.content[R.WEIGHTS][R.FLAT] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=b"\x93NUMPY" + bytes(len(a.data) - 6))


def lying_metadata(m: Message) -> None:  # declares the expected float32 vector, holds an int8 one of the same bytes
    a = m.content[R.WEIGHTS][R.FLAT]
    fake = Array(np.zeros(len(a.data) - 128, np.int8))
    m.content[R.WEIGHTS][R.FLAT] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=fake.data)


def oversize_data(m: Message) -> None:
    a = m.content[R.WEIGHTS][R.FLAT]
    m.content[R.WEIGHTS][R.FLAT] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data + bytes(10 ** 6))


def weights_as_config(m: Message) -> None:
    m.content[R.WEIGHTS] = ConfigRecord({"weights": 1})


def prototypes_wrong_dimension(m: Message) -> None:
    set_array(m.content[R.PROTOTYPES], R.P_VECTORS, m.content[R.PROTOTYPES][R.P_VECTORS].numpy()[:, :64].copy())


def prototypes_nan(m: Message) -> None:
    v = m.content[R.PROTOTYPES][R.P_VECTORS].numpy().copy()
    v[1, 3] = np.nan
    set_array(m.content[R.PROTOTYPES], R.P_VECTORS, v)


def prototypes_not_unit(m: Message) -> None:
    set_array(m.content[R.PROTOTYPES], R.P_VECTORS, m.content[R.PROTOTYPES][R.P_VECTORS].numpy() * 50)


def prototype_counts_as_strings(m: Message) -> None:
    set_array(m.content[R.PROTOTYPES], R.P_COUNTS, np.array(["5", "6"]))


def prototype_counts_negative(m: Message) -> None:
    set_array(m.content[R.PROTOTYPES], R.P_COUNTS, np.array([-3, 5], np.int64))


def prototype_label_out_of_range(m: Message) -> None:
    set_array(m.content[R.PROTOTYPES], R.P_LABELS, np.array([0, 7], np.int64))


def prototypes_too_many_rows(m: Message) -> None:
    rows = 200_000
    record = m.content[R.PROTOTYPES]
    for key, value in ((R.P_VECTORS, np.tile(record[R.P_VECTORS].numpy()[:1], (rows, 1))),
                       (R.P_LABELS, np.zeros(rows, np.int64)), (R.P_SITES, np.ones(rows, np.int64)),
                       (R.P_COUNTS, np.full(rows, 5, np.int64))):
        set_array(record, key, value)


def prototypes_as_metrics(m: Message) -> None:
    m.content[R.PROTOTYPES] = MetricRecord({"vectors": [0.5, 0.5]})


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


def site_id_as_list(m: Message) -> None:
    m.content[R.METRICS][R.SITE_ID] = [1]


# corruptions of a training reply (weights, counts, metrics) ...
CORRUPTIONS = {
    "NaN": (nan_weight, "NaN or Inf"), "Inf": (inf_weight, "NaN or Inf"),
    "extra array": (extra_array, "one array"), "short weights": (short_weights, "has shape"),
    "float64 weights": (float64_weights, "has dtype"), "unknown serialisation": (unknown_serialisation, "pickle"),
    "garbage bytes": (garbage_bytes, "cannot be decoded"), "lying metadata": (lying_metadata, "decodes to"),
    "oversize data": (oversize_data, "bytes"), "weights as a config record": (weights_as_config, "one array"),
    "absurd num-examples": (absurd_examples, "num-examples"), "negative num-examples": (negative_examples,
                                                                                       "num-examples"),
    "fractional num-examples": (fractional_examples, "num-examples"), "NaN metric": (nan_metric, "finite"),
    "extra metric": (extra_metric, "metric keys"), "extra record": (extra_record, "unexpected records"),
    "duplicate site": (lambda m: m.content[R.METRICS].__setitem__(R.SITE_ID, 0), "belongs to another node"),
    "unknown site": (unknown_site, "site-id '7'"), "site id as a list": (site_id_as_list, "site-id '[1]'"),
}
# ... and of a summary reply (the prototypes of the round's bank)
SUMMARY_CORRUPTIONS = {
    "prototype dimension": (prototypes_wrong_dimension, "has shape"),
    "prototype NaN": (prototypes_nan, "NaN or Inf"), "prototype norm": (prototypes_not_unit, "unit vectors"),
    "prototype counts as strings": (prototype_counts_as_strings, "has dtype"),
    "negative prototype count": (prototype_counts_negative, "fewer than the minimum"),
    "prototype label": (prototype_label_out_of_range, "labels must lie"),
    "200,000 prototype rows": (prototypes_too_many_rows, "at most 2 expected"),
    "prototypes as metrics": (prototypes_as_metrics, "must be an ArrayRecord"),
    "prototypes of another site": (prototypes_of_other_site, "prototypes of site-id 1 only"),
    "no prototypes": (lambda m: m.content.pop(R.PROTOTYPES), "no prototypes record"),
    "claims the other site": (claims_other_site, "belongs to another node"),
}


def real_replies(kind: str = "train") -> tuple[Config, list[Message]]:
    """Round-1 replies (``train``, or ``evaluate`` for the summary with the prototypes) of both sites of a real
    fedbn-proto run, as the server receives them."""
    grid, _ = shared_run("fedbn-proto")
    return federated_config(grid.run_config), [wire(grid.delivery(p, 1, kind).reply) for p in (0, 1)]


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_bad_training_reply_is_rejected_and_the_round_goes_on(case: str, caplog: pytest.LogCaptureFixture) -> None:
    corrupt, reason = CORRUPTIONS[case]
    config, replies = real_replies()
    genuine = flat(replies[0])
    corrupt(replies[1])
    strategy = strategy_for(config, min_sites=1)
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    rejected = [r.getMessage() for r in caplog.records if "rejected training reply" in r.getMessage()]
    assert len(rejected) == 1 and reason in rejected[0], rejected
    assert f"(node {replies[1].metadata.src_node_id})" in rejected[0]
    if case not in ("duplicate site", "unknown site", "site id as a list"):  # else the claim is all there is
        assert SITE_B in rejected[0]
    # only site A's update is averaged in
    assert arrays is not None and list(arrays.keys()) == [R.FLAT]
    assert np.array_equal(arrays[R.FLAT].numpy(), genuine)


@pytest.mark.parametrize("case", SUMMARY_CORRUPTIONS)
def test_bad_prototypes_are_rejected_and_the_round_goes_on(case: str, caplog: pytest.LogCaptureFixture) -> None:
    corrupt, reason = SUMMARY_CORRUPTIONS[case]
    config, replies = real_replies("evaluate")
    corrupt(replies[1])
    strategy = strategy_for(config, min_sites=1)
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        strategy.aggregate_evaluate(1, replies)
    rejected = [r.getMessage() for r in caplog.records if "rejected summary reply" in r.getMessage()]
    assert len(rejected) == 1 and reason in rejected[0], rejected
    assert strategy.bank.sites.tolist() == [0, 0]  # only site A's prototypes enter the bank


@pytest.mark.parametrize("case", ["NaN", "absurd num-examples"])
def test_too_few_sound_replies_stop_the_run(case: str) -> None:
    config, replies = real_replies()
    CORRUPTIONS[case][0](replies[1])
    with pytest.raises(NotEnoughSites, match="min-sites"):
        strategy_for(config, min_sites=2).aggregate_train(1, replies)
    config, summaries = real_replies("evaluate")
    prototypes_nan(summaries[1])
    with pytest.raises(NotEnoughSites, match="min-sites"):
        strategy_for(config, min_sites=2).aggregate_evaluate(1, summaries)


def test_sound_replies_are_averaged_with_the_weights_the_server_computes() -> None:
    config, replies = real_replies()
    expected = (flat(replies[0]).astype(np.float64) + flat(replies[1])) / 2  # equal weights: same steps
    arrays, _ = strategy_for(config, min_sites=2, fedavg_weights="equal").aggregate_train(1, replies)
    assert np.allclose(arrays[R.FLAT].numpy(), expected, atol=1e-6)


def test_a_server_step_other_than_one_scales_the_sites_mean_update() -> None:
    """``server-lr`` on a FedAvg method (fedbn-proto): the server moves from its weights by server-lr times the
    sites' mean update (FedAvgM without momentum)."""
    config, replies = real_replies()
    initial, _ = initial_shared(config)
    start = R.flatten(initial, R.layout_of(initial))
    strategy = strategy_for(config, min_sites=2, fedavg_weights="equal", server_lr=2.0)
    strategy.current_arrays = R.weights_record(start)  # what the round's configure_train hands FedAvgM
    arrays, _ = strategy.aggregate_train(1, replies)
    mean = (flat(replies[0]).astype(np.float64) + flat(replies[1])) / 2
    assert not np.allclose(mean, start, atol=1e-4)
    assert np.allclose(arrays[R.FLAT].numpy(), start + 2 * (mean - start), atol=1e-5)
    assert type(strategy_for(config)).__name__ == "SitesFedAvg"  # server-lr 0 (usual: 1): plain FedAvg


def test_dataset_weights_are_pinned_at_the_first_reply(caplog: pytest.LogCaptureFixture) -> None:
    config, replies = real_replies()
    strategy = strategy_for(config, min_sites=1, fedavg_weights="dataset")
    sizes = [int(r.content[R.METRICS][R.NUM_EXAMPLES]) for r in replies]
    arrays, _ = strategy.aggregate_train(1, [wire(r) for r in replies])
    expected = (sizes[0] * flat(replies[0]).astype(np.float64) + sizes[1] * flat(replies[1])) / sum(sizes)
    assert np.allclose(arrays[R.FLAT].numpy(), expected, atol=1e-6)
    inflated = wire(replies[1])
    inflated.content[R.METRICS][R.NUM_EXAMPLES] = MAX_EXAMPLES  # a bid to decide the average alone
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        strategy.aggregate_train(2, [wire(replies[0]), inflated])
    assert any("num-examples changed" in r.getMessage() for r in caplog.records)


def test_a_node_is_pinned_to_its_site(caplog: pytest.LogCaptureFixture) -> None:
    config, replies = real_replies()
    strategy = strategy_for(config, min_sites=1)
    strategy.aggregate_train(1, [wire(r) for r in replies])
    swapped = [wire(replies[1]), wire(replies[0])]  # each node now claims the other's site
    for m, other in zip(swapped, replies):
        m.metadata.__dict__["_src_node_id"] = other.metadata.src_node_id
    with caplog.at_level(logging.WARNING, logger="server.strategy"), pytest.raises(NotEnoughSites):
        strategy.aggregate_train(2, swapped)
    assert sum("but claims site-id" in r.getMessage() for r in caplog.records) == 2


def test_registered_nodes_are_pinned_before_the_first_round(caplog: pytest.LogCaptureFixture) -> None:
    """site-nodes (from the operator's registration): a node claiming another site is rejected in round 1."""
    config, replies = real_replies("evaluate")
    node_a, node_b = (r.metadata.src_node_id for r in replies)
    impostor = wire(replies[1])
    claims_other_site(impostor)  # site B's node claims site A, and answers first
    strategy = strategy_for(config, min_sites=1, site_nodes=f"{config.sites[0]}={node_a},{config.sites[1]}={node_b}")
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        strategy.aggregate_evaluate(1, [impostor, wire(replies[0])])
    assert any("but claims site-id 0" in r.getMessage() for r in caplog.records)
    assert strategy.bank.sites.tolist() == [0, 0]  # the genuine site A was accepted


def test_remote_error_text_is_quoted_and_truncated(caplog: pytest.LogCaptureFixture) -> None:
    grid, _ = shared_run("fedbn-proto")
    config, replies = real_replies()
    forged = "x\nINFO flwr: FINAL fedbn-proto site_b_covidct: AUC 0.9990" + "y" * 5000
    error = wire(Message(Error(code=0, reason=forged), reply_to=wire(grid.delivery(1, 1).message)))
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        strategy_for(config, min_sites=1).aggregate_train(1, [wire(replies[0]), error])
    lines = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and len(lines[0]) < 400 and "\\nINFO" in lines[0]


def test_update_norm_bound(caplog: pytest.LogCaptureFixture) -> None:
    grid, _ = shared_run("fedbn-proto")
    config, replies = real_replies()
    sent = grid.delivery(0, 1, "evaluate").message.content[R.WEIGHTS]  # the train message names them by digest
    norms = [float(np.linalg.norm(flat(r).astype(np.float64) - sent[R.FLAT].numpy())) for r in replies]
    assert min(norms) > 0 and abs(norms[0] - norms[1]) > 1e-3 * max(norms)

    def accepted(bound: float) -> list[int]:
        strategy = strategy_for(config, min_sites=1, max_update_norm=bound)
        strategy.sites_copy.trained_from = sent[R.FLAT].numpy()  # as configure_train sets it
        strategy.aggregate_train(1, [wire(r) for r in replies])
        return sorted(strategy.dataset_sizes)  # the sites whose reply was accepted

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
    assert any("rejected training reply of site site_b_covidct" in r.getMessage() and "NaN" in r.getMessage()
               for r in caplog.records)
    site_a = grid.delivery(0, 1).reply.content[R.WEIGHTS][R.FLAT].numpy()
    evaluated = grid.delivery(0, 2, "evaluate").message.content[R.WEIGHTS][R.FLAT].numpy()  # the final summary
    assert np.array_equal(evaluated, site_a)


def test_federation_stops_when_too_few_sites_remain(tmp_path: Path) -> None:
    with pytest.raises(NotEnoughSites):
        run_federation(tmp_path, tamper=nan_from_site_b_in_round_1, method="fedbn", **{"num-server-rounds": 1})


def final_summaries() -> tuple[Config, list[Message]]:
    """The replies of both sites to the final summary (the last weights evaluated, with each site's operating
    point) of a real fedbn run, as the server receives them."""
    grid, _ = shared_run("fedbn")
    config = federated_config(grid.run_config)
    return config, [wire(grid.delivery(p, config.num_server_rounds + 1, "evaluate").reply) for p in (0, 1)]


def drop_operating_point(m: Message, keep: tuple[str, ...] = ()) -> None:
    """A reply as from a site whose validation split cannot choose an operating point (``keep``: a part of it)."""
    for key in R.OPERATING_METRICS:
        if key not in keep:
            m.content[R.METRICS].pop(key)


def test_the_final_evaluation_carries_each_sites_operating_point_whole_or_not_at_all(
        caplog: pytest.LogCaptureFixture) -> None:
    config, replies = final_summaries()
    final = config.num_server_rounds + 1
    assert all(set(R.OPERATING_METRICS) <= set(r.content[R.METRICS]) for r in replies)

    def evaluate(server_round: int, messages: list[Message]) -> tuple[dict[str, dict], list[str]]:
        rows: dict[str, dict] = {}
        strategy = strategy_for(config, lambda kind, row: rows.setdefault(str(row["site"]), dict(row)), min_sites=1)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="server.strategy"):
            mean = strategy.aggregate_evaluate(server_round, messages)
        assert mean is not None and not set(R.OPERATING_METRICS) & set(mean)  # each site's own, never averaged
        return rows, [r.getMessage() for r in caplog.records if "rejected summary reply" in r.getMessage()]

    rows, rejected = evaluate(final, [wire(r) for r in replies])
    assert not rejected and all(set(R.OPERATING_METRICS) <= set(row) for row in rows.values())
    without = wire(replies[1])
    drop_operating_point(without)  # accepted beside a site that has one: the run goes on
    rows, rejected = evaluate(final, [wire(replies[0]), without])
    assert not rejected and set(R.OPERATING_METRICS) <= set(rows[config.sites[0]])
    assert not set(R.OPERATING_METRICS) & set(rows[SITE_B])
    partial = wire(replies[1])
    drop_operating_point(partial, keep=("op_threshold",))
    _, rejected = evaluate(final, [wire(replies[0]), partial])
    assert len(rejected) == 1 and SITE_B in rejected[0] and "missing ['op_accuracy'" in rejected[0]
    earlier = wire(replies[0])
    drop_operating_point(earlier)  # an operating point only in the final evaluation
    _, rejected = evaluate(final - 1, [earlier, wire(replies[1])])
    assert len(rejected) == 1 and SITE_B in rejected[0] and "unexpected [\"'op_" in rejected[0]
