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
TRAIN_METRICS = ("loss", "ce", "con", "train_accuracy", "seconds")
# every metric key of a train / evaluate reply: the server rejects replies with other keys
TRAIN_REPLY_METRICS = (NUM_EXAMPLES, SITE_ID, *TRAIN_METRICS)
EVALUATE_REPLY_METRICS = (NUM_EXAMPLES, SITE_ID, *METRIC_NAMES, ROC_TPR)
# context.state keys (stay on the site)
STATE_BN = "local-bn"
STATE_OPTIMIZER = "local-optimizer"
STATE_META = "local-meta"
# suffix of the float32 scale that follows an int8-encoded tensor (config key 'compression')
INT8_SCALE = "::int8-scale"
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
    """Shared weights for transfer (config key ``compression``): ``fp16`` casts float arrays to float16,
    ``int8`` stores ``round(a / s)`` as int8 with a float32 per-tensor scale ``s = max|a| / 127`` under
    ``name + INT8_SCALE`` (error at most s / 2); integer arrays and ``none`` pass unchanged, keys keep their order."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} is not one of {COMPRESSIONS} (config key 'compression')")
    out: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        if compression == "none" or not np.issubdtype(a.dtype, np.floating):
            out[name] = a
            continue
        peak = float(np.abs(a).max()) if a.size else 0.0
        if not np.isfinite(peak) or (compression == "fp16" and peak > float(np.finfo(np.float16).max)):
            raise ValueError(f"tensor {name} (max |value| {peak:.3g}) cannot be sent as {compression}; "
                             "set compression=none")
        if compression == "fp16":
            out[name] = a.astype(np.float16)
        else:
            scale = np.float32(peak / 127 if peak > 0 else 1.0)
            out[name] = np.clip(np.rint(a / scale), -127, 127).astype(np.int8)
            out[name + INT8_SCALE] = np.array(scale, dtype=np.float32)
    return out


def decode(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of ``encode``, whatever the compression: float16 and scaled int8 arrays -> float32, the rest
    unchanged, scale entries dropped. ValueError when a scale is orphaned, not a positive finite float32 scalar,
    or belongs to an array that is not int8."""
    out: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        if name.endswith(INT8_SCALE):
            if name[:-len(INT8_SCALE)] not in arrays:
                raise ValueError(f"array {name} is an int8 scale without its tensor")
            continue
        scale = arrays.get(name + INT8_SCALE)
        if scale is not None:
            if a.dtype != np.int8 or scale.shape != () or scale.dtype != np.float32 \
                    or not np.isfinite(scale) or scale <= 0:
                raise ValueError(f"tensor {name}: int8 encoding needs an int8 array and a positive float32 scale, "
                                 f"got {a.dtype} and {scale.dtype} {scale.shape}")
            out[name] = a.astype(np.float32) * scale
        else:
            out[name] = a.astype(np.float32) if a.dtype == np.float16 else a
    return out


def decode_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A received weights record (any compression) -> name -> float32 / integer tensor (writable copies)."""
    return {k: torch.from_numpy(np.array(a, copy=True))
            for k, a in decode({k: v.numpy() for k, v in record.items()}).items()}


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
