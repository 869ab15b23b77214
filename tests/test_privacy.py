"""Privacy audit of real federated rounds (tests/inprocess.py, smoke config, embedded CT images): every record
that leaves a site holds only the shared weights, example counts, per-class prototypes with their counts
(fedbn-proto only) and aggregate metrics. No images, per-image embeddings or labels, and no BN statistics under
the FedBN methods."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fl_covid.config import Config, federated_config
from fl_covid.data import load_configured_site
from fl_covid.federated import shared_keys
from fl_covid.model import bn_keys, create_model
from tests.inprocess import Delivery, RecordingGrid, shared_run, wire

METHODS = ("fedavg", "fedbn", "fedbn-proto", "fedbn-proto-scaffold")
WITH_PROTOTYPES = {"fedbn-proto", "fedbn-proto-scaffold"}
# besides the weights, a training reply may carry these vectors of the shared size (the method's algorithm)
PAYLOADS = {"fedbn-proto-scaffold": {"control-delta"}}
# The whitelist, written out here on purpose (not imported from the code under audit).
TRAIN_METRICS = {"num-examples", "site-id", "loss", "ce", "con", "train_accuracy", "seconds"}
_SCORES = ("accuracy", "f1", "sensitivity", "precision", "specificity", "auc")
EVALUATE_METRICS = {"num-examples", "site-id", *_SCORES, *(f"val_{m}" for m in _SCORES), "roc-tpr"}
# the final evaluation adds the site's operating point: a threshold chosen on its validation split, test metrics at it
OPERATING_POINT = {"op_threshold", "op_accuracy", "op_f1", "op_sensitivity", "op_precision", "op_specificity"}
SUMMARY_METRICS = {"num-examples", "site-id"}  # a summary without an evaluation
PROTOTYPE_ARRAYS = {"vectors": ((2, 128), np.float32), "labels": ((2,), np.int64), "sites": ((2,), np.int64),
                    "counts": ((2,), np.int64)}
ROC_POINTS = 101


def site_sizes(grid: RecordingGrid) -> dict[int, dict[str, int]]:
    """Per site: number of training, test and all images, from the same config and data as the run."""
    config = federated_config(grid.run_config)
    out = {}
    for p in range(len(config.sites)):
        site, split = load_configured_site(config, p)
        out[p] = {"train": len(split.train), "test": len(split.test), "all": len(site)}
    return out


def local_bn_after(grid: RecordingGrid, index: int) -> list[dict[str, torch.Tensor]]:
    """The BN tensors a site held around delivery ``index``: what its model loaded for it and, after a training,
    the state the training saved (what the next summary loads)."""
    d = grid.deliveries[index]
    held = [d.loaded_bn or {}]
    if d.kind == "train":
        held.append(grid.delivery(d.partition, d.round + 1, "evaluate").loaded_bn)
    return held


def holds(flat: np.ndarray, values: np.ndarray) -> bool:
    """Whether ``values`` (1-D) appears as a contiguous run inside ``flat``."""
    starts = np.flatnonzero(flat[: len(flat) - len(values) + 1] == values[0])
    return any(np.array_equal(flat[i:i + len(values)], values) for i in starts)


def audit(d: Delivery, method: str, config: Config, sizes: dict[str, int], local_bn: list[dict[str, torch.Tensor]]
          ) -> None:
    """Assert that the reply of delivery ``d`` holds only what may leave the site."""
    model = create_model(config.arch, config.width, 1, image_size=config.image_size)
    state = model.state_dict()
    content = d.reply.content
    train = d.kind == "train"
    final = bool(d.message.content["config"]["final"]) if not train else False
    evaluated = not train and bool(d.message.content["config"]["evaluate"])
    records = {"metrics"} | ({"arrays"} if train else set()) | (
        {"prototypes"} if not train and method in WITH_PROTOTYPES and not final else set()) | (
        {"algorithm"} if train and method in PAYLOADS else set())
    assert set(content.keys()) == records
    assert isinstance(content["metrics"], MetricRecord) and not content.config_records

    small_arrays = []
    if train:
        weights = content["arrays"]
        assert isinstance(weights, ArrayRecord) and list(weights.keys()) == ["weights"]
        flat = weights["weights"].numpy()
        expected = shared_keys(model, config.replace(method=method))
        # exactly the model's shared values: nothing else fits in this vector
        assert flat.dtype == np.float32 and flat.shape == (sum(state[k].numel() for k in expected),)
        if method != "fedavg":
            assert not bn_keys(model) & set(expected)
            # and no BN statistic or parameter of this site travels inside it
            local = [t.numpy().ravel() for bn in local_bn for t in bn.values() if t.numel() > 1]
            assert local, "the site holds no BN state"
            assert not any(holds(flat, b) for b in local)
        if method in PAYLOADS:  # vectors over the shared values only, with no BN of this site inside
            payload = {k: v.numpy() for k, v in content["algorithm"].items()}
            assert set(payload) == PAYLOADS[method]
            assert all(v.dtype == np.float32 and v.shape == flat.shape for v in payload.values())
            # (a fresh BN's constant bias matches any run of zeros: unchanged weights give those; only BN tensors
            # that carry something of the site count)
            informative = [b for b in local if len(np.unique(b)) > 1]
            assert informative and not any(holds(v, b) for v in payload.values() for b in informative)
    if "prototypes" in content:
        protos = {k: v.numpy() for k, v in content["prototypes"].items()}
        assert set(protos) == set(PROTOTYPE_ARRAYS)
        for name, (shape, dtype) in PROTOTYPE_ARRAYS.items():
            assert protos[name].shape == shape and protos[name].dtype == dtype, name
        assert protos["labels"].tolist() == [0, 1] and protos["sites"].tolist() == [d.partition] * 2
        assert int(protos["counts"].sum()) == min(sizes["train"], config.summary_images or sizes["train"])
        small_arrays += protos.values()

    metrics = dict(content["metrics"])
    assert set(metrics) == (TRAIN_METRICS if train else SUMMARY_METRICS if not evaluated
                            else EVALUATE_METRICS | OPERATING_POINT if final else EVALUATE_METRICS)
    for key, value in metrics.items():
        if key == "roc-tpr":
            assert isinstance(value, list) and len(value) == ROC_POINTS and all(0 <= v <= 1 for v in value)
            small_arrays.append(np.asarray(value))
        else:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), key
    assert metrics["num-examples"] == sizes["train" if train else "test"]
    assert metrics["site-id"] == d.partition

    per_image = {sizes["train"], sizes["test"], sizes["all"]}  # no dimension of a per-image array
    for a in small_arrays:
        assert not per_image & set(a.shape), f"an array of shape {a.shape} has one entry per image"


@pytest.mark.parametrize("method", METHODS)
def test_only_weights_counts_prototypes_and_aggregates_leave_a_site(method: str) -> None:
    grid, _ = shared_run(method)
    sizes, config = site_sizes(grid), federated_config(grid.run_config)
    # a summary starts every round that needs prototypes or evaluates the round before, and ends the run: without
    # prototypes round 1 needs none
    summaries = 3 if method in WITH_PROTOTYPES else 2
    assert len(grid.deliveries) == 2 * (2 + summaries)  # 2 sites x (2 trainings + the summaries)
    assert all(not d.reply.has_error() for d in grid.deliveries)
    for i, d in enumerate(grid.deliveries):
        audit(d, method, config, sizes[d.partition], local_bn_after(grid, i))


def leak_bn_renamed(reply: Message, bn: dict[str, torch.Tensor]) -> None:
    name = next(k for k, v in bn.items() if v.numel() > 1)
    reply.content["arrays"]["conv.extra"] = Array(bn[name].numpy())


def leak_bn_inside_weights(reply: Message, bn: dict[str, torch.Tensor]) -> None:
    values = next(v for k, v in bn.items() if k.endswith("running_var") and v.numel() > 1).numpy()
    flat = reply.content["arrays"]["weights"].numpy().copy()
    flat[100:100 + len(values)] = values
    reply.content["arrays"]["weights"] = Array(flat)


def leak_embeddings(reply: Message, bn: dict[str, torch.Tensor]) -> None:
    reply.content["prototypes"]["vectors"] = Array(np.zeros((9, 128), np.float32))


def leak_labels_as_metric(reply: Message, bn: dict[str, torch.Tensor]) -> None:
    reply.content["metrics"]["labels"] = [0.0, 1.0, 1.0]


def leak_image(reply: Message, bn: dict[str, torch.Tensor]) -> None:
    reply.content["image"] = ArrayRecord({"x": Array(np.zeros((1, 37, 37), np.uint8))})


@pytest.mark.parametrize("leak, kind", [(leak_bn_renamed, "train"), (leak_bn_inside_weights, "train"),
                                        (leak_embeddings, "evaluate"), (leak_labels_as_metric, "evaluate"),
                                        (leak_image, "train")])
def test_the_audit_catches_a_leak(leak: Callable[[Message, dict[str, torch.Tensor]], None], kind: str) -> None:
    """The audit above is not vacuous: a reply with one extra leak fails it."""
    grid, _ = shared_run("fedbn-proto")
    sizes, config = site_sizes(grid), federated_config(grid.run_config)
    index = next(i for i, d in enumerate(grid.deliveries) if d.kind == kind)
    d, bn = grid.deliveries[index], local_bn_after(grid, index)
    audit(d, "fedbn-proto", config, sizes[d.partition], bn)
    leaky = wire(d.reply)
    leak(leaky, next(b for b in bn if b))
    with pytest.raises(AssertionError):
        audit(dataclasses.replace(d, reply=leaky), "fedbn-proto", config, sizes[d.partition], bn)
