"""Torch state <-> Flower records, and the record and metric keys every site and the server share.

The only module of the library that imports Flower.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

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
# context.state keys (stay on the site)
STATE_BN = "local-bn"
STATE_OPTIMIZER = "local-optimizer"
STATE_META = "local-meta"
# prototype record keys
P_VECTORS, P_LABELS, P_SITES, P_COUNTS = "vectors", "labels", "sites", "counts"


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """State dict (or any name -> tensor mapping) -> ArrayRecord, in the mapping's order."""
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> name -> tensor (copies, writable)."""
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


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
