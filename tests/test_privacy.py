"""Privacy audit of real federated rounds (tests/inprocess.py, smoke config, embedded CT images): every record
that leaves a site holds only the shared weights, example counts, per-class prototypes with their counts
(fedbn-proto only) and aggregate metrics. No images, per-image embeddings or labels, and no BN statistics under
the FedBN methods."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fl_covid import records as R
from fl_covid.config import Config, federated_config
from fl_covid.data import load_configured_site
from fl_covid.federated import shared_keys
from fl_covid.model import bn_keys, create_model
from tests.inprocess import Delivery, InProcessGrid, shared_run, wire

METHODS = ("fedavg", "fedbn", "fedbn-proto")
# The whitelist, written out here on purpose (not imported from the code under audit).
TRAIN_METRICS = {"num-examples", "site-id", "loss", "ce", "con", "train_accuracy", "seconds"}
EVALUATE_METRICS = {"num-examples", "site-id", "accuracy", "f1", "sensitivity", "precision", "specificity", "auc",
                    "roc-tpr"}
PROTOTYPE_ARRAYS = {"vectors": ((2, 128), np.float32), "labels": ((2,), np.int64), "sites": ((2,), np.int64),
                    "counts": ((2,), np.int64)}
ROC_POINTS = 101


def site_sizes(grid: InProcessGrid) -> dict[int, dict[str, int]]:
    """Per site: number of training, test and all images, from the same config and data as the run."""
    config = federated_config(grid.run_config)
    out = {}
    for p in range(len(config.sites)):
        site, split = load_configured_site(config, p)
        out[p] = {"train": len(split.train), "test": len(split.test), "all": len(site)}
    return out


def local_bn_after(grid: InProcessGrid, index: int) -> dict[str, torch.Tensor]:
    """The BN tensors a site holds after delivery ``index``: what its model loaded at its evaluation of that round
    (the state its training saved)."""
    d = grid.deliveries[index]
    return grid.delivery(d.partition, d.round, "evaluate").loaded_bn


def holds(flat: np.ndarray, values: np.ndarray) -> bool:
    """Whether ``values`` (1-D) appears as a contiguous run inside ``flat``."""
    starts = np.flatnonzero(flat[: len(flat) - len(values) + 1] == values[0])
    return any(np.array_equal(flat[i:i + len(values)], values) for i in starts)


def audit(d: Delivery, method: str, config: Config, sizes: dict[str, int], local_bn: dict[str, torch.Tensor]
          ) -> None:
    """Assert that the reply of delivery ``d`` holds only what may leave the site."""
    model = create_model(config.arch, config.width, 1, image_size=config.image_size)
    state = model.state_dict()
    content = d.reply.content
    train = d.kind == "train"
    records = {"metrics"} | ({"arrays"} if train else set()) | (
        {"prototypes"} if train and method == "fedbn-proto" else set())
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
            local = [t.numpy().ravel() for t in local_bn.values() if t.numel() > 1]
            assert local, "the site holds no BN state"
            assert not any(holds(flat, b) for b in local)
    if "prototypes" in content:
        protos = {k: v.numpy() for k, v in content["prototypes"].items()}
        assert set(protos) == set(PROTOTYPE_ARRAYS)
        for name, (shape, dtype) in PROTOTYPE_ARRAYS.items():
            assert protos[name].shape == shape and protos[name].dtype == dtype, name
        assert protos["labels"].tolist() == [0, 1] and protos["sites"].tolist() == [d.partition] * 2
        assert int(protos["counts"].sum()) == sizes["train"]  # class counts of the training images
        small_arrays += protos.values()

    metrics = dict(content["metrics"])
    assert set(metrics) == (TRAIN_METRICS if train else EVALUATE_METRICS)
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
    assert len(grid.deliveries) == 8  # 2 sites x 2 rounds x (train + evaluate)
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


@pytest.mark.parametrize("leak", [leak_bn_renamed, leak_bn_inside_weights, leak_embeddings, leak_labels_as_metric,
                                  leak_image])
def test_the_audit_catches_a_leak(leak: Callable[[Message, dict[str, torch.Tensor]], None]) -> None:
    """The audit above is not vacuous: a reply with one extra leak fails it."""
    grid, _ = shared_run("fedbn-proto")
    sizes, config = site_sizes(grid), federated_config(grid.run_config)
    index = next(i for i, d in enumerate(grid.deliveries) if d.kind == "train")
    d, bn = grid.deliveries[index], local_bn_after(grid, index)
    audit(d, "fedbn-proto", config, sizes[d.partition], bn)
    leaky = wire(d.reply)
    leak(leaky, bn)
    with pytest.raises(AssertionError):
        audit(dataclasses.replace(d, reply=leaky), "fedbn-proto", config, sizes[d.partition], bn)
