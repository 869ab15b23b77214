"""Torch state <-> Flower records, and the record and metric keys every site and the server share.

The only module of the library that imports Flower.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fl_covid.config import COMPRESSIONS
from fl_covid.metrics import METRIC_NAMES
from fl_covid.prototypes import PrototypeBank

# RecordDict keys of messages
WEIGHTS = "arrays"  # ArrayRecord: shared weights (all weights under fedavg)
PROTOTYPES = "prototypes"  # ArrayRecord: prototype bank (server -> site) or a site's prototypes (site -> server)
CONFIG = "config"  # ConfigRecord: server-round, lr
METRICS = "metrics"  # MetricRecord of a reply
# ConfigRecord keys
ROUND = "server-round"
LR = "lr"
RUN_NAME = "run-name"  # names the run directory and each site's state folder; kept on resume
# MetricRecord keys (identical on every site; the site is a number, never part of a name)
NUM_EXAMPLES = "num-examples"
SITE_ID = "site-id"
ROC_TPR = "roc-tpr"
TRAIN_METRICS = ("loss", "ce", "con", "train_accuracy", "seconds", "examples_seen")
# every metric key of a train / evaluate reply: the server rejects replies with other keys
TRAIN_REPLY_METRICS = (NUM_EXAMPLES, SITE_ID, *TRAIN_METRICS)
EVALUATE_REPLY_METRICS = (NUM_EXAMPLES, SITE_ID, *METRIC_NAMES, ROC_TPR)
# context.state keys (stay on the site)
STATE_BN = "local-bn"
STATE_OPTIMIZER = "local-optimizer"
STATE_META = "local-meta"
# prototype record keys
P_VECTORS, P_LABELS, P_SITES, P_COUNTS = "vectors", "labels", "sites", "counts"


def to_record(tensors: Mapping[str, torch.Tensor], compression: str = "none") -> ArrayRecord:
    """State dict (or any name -> tensor mapping) -> ArrayRecord in the mapping's order, encoded by ``encode``."""
    arrays = encode({k: v.detach().cpu().contiguous().numpy() for k, v in tensors.items()}, compression)
    return ArrayRecord({k: Array(a) for k, a in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> name -> tensor (copies, writable)."""
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def encode(arrays: Mapping[str, np.ndarray], compression: str) -> dict[str, np.ndarray]:
    """Shared weights for transfer (config key ``compression``): ``fp16`` casts float32 arrays to float16 (relative
    error at most 2**-11, half the bytes). Other dtypes pass unchanged: integer BN counters and the float64 that
    FedAvg's averaging makes of them. ``none`` changes nothing; keys keep their order."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} is not one of {COMPRESSIONS} (config key 'compression')")
    out: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        if compression == "none" or a.dtype != np.float32:
            out[name] = a
            continue
        peak = float(np.abs(a).max()) if a.size else 0.0
        if not peak <= float(np.finfo(np.float16).max):  # also catches NaN
            raise ValueError(f"tensor {name} (max |value| {peak:.3g}) cannot be sent as {compression}; "
                             "set compression=none")
        out[name] = a.astype(np.float16)
    return out


def decode(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of ``encode``, whatever the compression: float16 arrays -> float32, the rest unchanged."""
    return {name: a.astype(np.float32) if a.dtype == np.float16 else a for name, a in arrays.items()}


def decode_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A received weights record (any compression) -> name -> float32 / integer tensor (writable copies)."""
    raw = {k: v.numpy() for k, v in record.items()}
    return {k: torch.from_numpy(a.copy() if a is raw[k] else a) for k, a in decode(raw).items()}


def encode_record(record: ArrayRecord, compression: str) -> ArrayRecord:
    """An ArrayRecord of float32 / integer weights -> the same record encoded for transfer (see ``encode``)."""
    if compression == "none":
        return record
    return ArrayRecord({k: Array(a) for k, a in encode({k: v.numpy() for k, v in record.items()}, compression).items()})


def decode_record(record: ArrayRecord) -> ArrayRecord:
    """A received weights record (any compression) -> the same record in float32, for checks and averaging."""
    return ArrayRecord({k: Array(a) for k, a in decode({k: v.numpy() for k, v in record.items()}).items()})


def bank_to_record(bank: PrototypeBank) -> ArrayRecord:
    return to_record({P_VECTORS: bank.vectors, P_LABELS: bank.labels, P_SITES: bank.sites, P_COUNTS: bank.counts})


def bank_from_record(record: ArrayRecord) -> PrototypeBank:
    """ArrayRecord -> PrototypeBank; ValueError if keys or shapes do not form a bank."""
    t = from_record(record)
    if set(t) != {P_VECTORS, P_LABELS, P_SITES, P_COUNTS}:
        raise ValueError(f"prototype record has keys {sorted(t)}, expected {[P_VECTORS, P_LABELS, P_SITES, P_COUNTS]}")
    n = t[P_VECTORS].shape[0]
    if t[P_VECTORS].ndim != 2 or any(t[k].shape != (n,) for k in (P_LABELS, P_SITES, P_COUNTS)):
        raise ValueError("prototype record shapes do not match: vectors (P, D), labels/sites/counts (P,)")
    if not torch.isfinite(t[P_VECTORS]).all():
        raise ValueError("prototype vectors contain NaN or Inf")
    return PrototypeBank(t[P_VECTORS].float(), t[P_LABELS].long(), t[P_SITES].long(), t[P_COUNTS].long())
