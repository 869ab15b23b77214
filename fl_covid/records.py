"""Torch state <-> Flower records, and the record and metric keys every site and the server share.

Shared weights travel as ONE flat vector: every shared tensor in the order of a ``Layout`` that both sides derive
from the model, encoded as ``fl_covid.transport`` says (``compression``: float32, float16, or int8 differences
with their scales). One array instead of one per tensor makes a message a handful of objects for Flower to move,
whatever the model's depth. Whatever is received is judged from its metadata (serialisation, dtype, shape, byte
size) before anything is decoded.

The only module of the library that imports Flower.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fl_covid.layout import Layout, flatten, layout_of, layout_size, unflatten  # noqa: F401 - records of this layout
from fl_covid.metrics import METRIC_NAMES, OPERATING_POINT_NAMES
from fl_covid.prototypes import PrototypeBank
from fl_covid.transport import INT8_BLOCK, Transfer, dequantize, encode, wire_dtype

NPY_HEADER_MAX = 4096  # bytes an .npy header may add to an array's data

# RecordDict keys of messages
WEIGHTS = "arrays"  # ArrayRecord holding FLAT: shared weights (BN included under fedavg)
FLAT = "weights"  # the one array of a weights record (int8 differences under compression=int8)
SCALES = "scales"  # int8 differences: one float32 scale per INT8_BLOCK values
PROTOTYPES = "prototypes"  # ArrayRecord: prototype bank (server -> site) or a site's prototypes (site -> server)
CONFIG = "config"  # ConfigRecord: server-round, lr, run-name
PAYLOAD = "algorithm"  # ArrayRecord: a method's own vectors over the shared layout (fl_covid.algorithms), both ways
METRICS = "metrics"  # MetricRecord of a reply
SIGNATURE = "signature"  # ConfigRecord: the Ed25519 signature of a deployment's message (fl_covid.trust)
# ConfigRecord keys
ROUND = "server-round"  # the round about to be trained (num-server-rounds + 1: the final evaluation)
LR = "lr"
RUN_NAME = "run-name"  # names the run directory and each site's state folder; kept on resume
EVALUATE = "evaluate"  # summary message: evaluate the received weights on the validation split and test fold
FINAL = "final"  # summary message after the last round: evaluate, keep the final model
PROTOTYPES_DUE = "prototypes-due"  # summary message: compute and send this site's prototypes (prototype-every)
DIGEST = "weights-sha256"  # train message without weights: train from the weights of this round's summary
BASE = "base-sha256"  # summary under int8: the weights carry the difference from the weights of this digest
# signature record keys
SIG = "ed25519"  # base64 signature of the message's statement
ORIGIN = "origin-run"  # instruction: the run whose folder the site works in (a resume names its predecessor)
# MetricRecord keys (identical on every site; the site is a number, never part of a name)
NUM_EXAMPLES = "num-examples"
WEIGHT = "aggregation-weight"  # set by the server on accepted replies, never taken from a site
SITE_ID = "site-id"
ROC_TPR = "roc-tpr"
TRAIN_METRICS = ("loss", "ce", "con", "train_accuracy", "seconds")
VAL_METRICS = tuple(f"val_{m}" for m in METRIC_NAMES)  # the validation split's metrics
# the site's operating point (fl_covid.metrics.operating_point): the threshold chosen on its validation split and
# the test fold's metrics at it
OPERATING_METRICS = tuple(f"op_{m}" for m in OPERATING_POINT_NAMES)
# every metric key of a reply: the server rejects replies with other keys
TRAIN_REPLY_METRICS = (NUM_EXAMPLES, SITE_ID, *TRAIN_METRICS)
SUMMARY_REPLY_METRICS = (NUM_EXAMPLES, SITE_ID)  # + EVALUATION_METRICS when an evaluation was asked for
EVALUATION_METRICS = (*METRIC_NAMES, *VAL_METRICS, ROC_TPR)  # + OPERATING_METRICS in the final summary, when the
# site's validation split has both classes
# prototype record keys: the fields of a PrototypeBank (``PrototypeBank.tensors``)
P_VECTORS, P_LABELS, P_SITES, P_COUNTS = "vectors", "labels", "sites", "counts"


def difference_record(q: np.ndarray, scales: np.ndarray) -> ArrayRecord:
    """An int8 difference (``fl_covid.transport.quantize``) as the record that carries it."""
    return ArrayRecord({FLAT: Array(np.ascontiguousarray(q)), SCALES: Array(np.ascontiguousarray(scales))})


def read_difference(record: object, size: int) -> np.ndarray:
    """A received int8 difference record -> the float32 difference (N,), checked from the metadata first."""
    transfer = read_transfer(record, size, "int8", difference=True)
    return dequantize(transfer.values, transfer.scales)


def weights_record(flat: np.ndarray, compression: str = "none") -> ArrayRecord:
    """Flat float32 weights -> the record that carries them, encoded by ``encode``."""
    return transfer_record(Transfer(encode(flat, compression)))


def read_weights(record: object, size: int, compression: str) -> np.ndarray:
    """A received weights record -> flat float32 weights (N,), after checking from the metadata that it holds
    exactly one array of ``size`` values in the dtype of ``compression``. ValueError naming the problem."""
    return read_transfer(record, size, compression, difference=False).applied_to(None)


def transfer_record(transfer: Transfer) -> ArrayRecord:
    """Shared weights as they travel -> the record that carries them: whole weights as one array, an int8
    difference as its values and scales."""
    if transfer.scales is not None:
        return difference_record(transfer.values, transfer.scales)
    return ArrayRecord({FLAT: Array(np.ascontiguousarray(transfer.values))})


def read_transfer(record: object, size: int, compression: str, difference: bool) -> Transfer:
    """A received weights record -> the ``Transfer`` it carries: an int8 difference of ``size`` values with its
    scales (``difference``), else ``size`` whole weights in the dtype of ``compression``; each array checked from
    its metadata before it is decoded. ValueError naming the problem."""
    if difference:
        if not isinstance(record, ArrayRecord) or set(record) != {FLAT, SCALES}:
            keys = sorted(record)[:3] if isinstance(record, ArrayRecord) else type(record).__name__
            raise ValueError(f"difference record must hold arrays '{FLAT}' and '{SCALES}', got {keys}")
        q = checked_array(record, FLAT, (size,), (np.dtype(np.int8),))
        scales = checked_array(record, SCALES, (-(-size // INT8_BLOCK),), (np.dtype(np.float32),))
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise ValueError("difference scales must be finite and >= 0")
        return Transfer(q, scales)
    if not isinstance(record, ArrayRecord) or set(record) != {FLAT}:
        keys = sorted(record)[:3] if isinstance(record, ArrayRecord) else type(record).__name__
        raise ValueError(f"weights record must hold one array '{FLAT}', got {keys}")
    return Transfer(checked_array(record, FLAT, (size,), (wire_dtype(compression),)))


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Any name -> tensor mapping -> ArrayRecord, one array per tensor (prototype banks)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in tensors.items()})


def payload_record(payload: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A method's payload (name -> float32 (N,) over the shared layout) as the record that carries it."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in payload.items()})


def read_payload(record: object, names: tuple[str, ...], size: int) -> dict[str, np.ndarray]:
    """A received payload record -> name -> float32 (N,): exactly ``names``, each ``size`` finite float32 values,
    judged from the metadata before decoding. ValueError naming the problem."""
    if not isinstance(record, ArrayRecord) or set(record) != set(names):
        keys = sorted(record)[:4] if isinstance(record, ArrayRecord) else type(record).__name__
        raise ValueError(f"payload record must hold the arrays {sorted(names)}, got {keys}")
    out = {n: checked_array(record, n, (size,), (np.dtype(np.float32),)) for n in names}
    if not all(np.isfinite(v).all() for v in out.values()):
        raise ValueError("payload record contains NaN or Inf")
    return out


def bank_to_record(bank: PrototypeBank) -> ArrayRecord:
    """A prototype bank as the record that carries it, one array per field (``PrototypeBank.tensors``)."""
    return to_record(bank.tensors())


def reply_content(metrics: Mapping[str, Any], weights: Transfer | None = None,
                  prototypes: PrototypeBank | None = None, payload: Mapping[str, np.ndarray] | None = None
                  ) -> RecordDict:
    """A site's reply: its metric record and the records of what else it sends (the weights of a training reply,
    prototypes, the method's payload)."""
    content = RecordDict({WEIGHTS: transfer_record(weights)} if weights is not None else {})
    content[METRICS] = MetricRecord(dict(metrics))
    if prototypes is not None:
        content[PROTOTYPES] = bank_to_record(prototypes)
    if payload:
        content[PAYLOAD] = payload_record(payload)
    return content


def checked_array(record: ArrayRecord, name: str, shape: tuple[int, ...], dtypes: tuple[np.dtype, ...]
                  ) -> np.ndarray:
    """One array of a received record, judged from its metadata (serialisation, dtype, shape, byte size) before it
    is decoded, then checked again after decoding (the bytes could say otherwise). ValueError."""
    arr = record.get(name)
    if not isinstance(arr, Array):
        raise ValueError(f"array {name} is missing")
    if arr.stype != "numpy.ndarray":
        raise ValueError(f"array {name} has serialisation {str(arr.stype)[:40]!r}, expected numpy.ndarray")
    try:
        dtype, dims = np.dtype(arr.dtype), tuple(int(d) for d in arr.shape)
    except (TypeError, ValueError) as e:
        raise ValueError(f"array {name} has unreadable metadata") from e
    if dtype not in dtypes:
        raise ValueError(f"array {name} has dtype {dtype}, expected {' or '.join(map(str, dtypes))}")
    if dims != tuple(shape):
        raise ValueError(f"array {name} has shape {dims}, expected {tuple(shape)}")
    nbytes = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if not nbytes <= len(arr.data) <= nbytes + NPY_HEADER_MAX:
        raise ValueError(f"array {name} holds {len(arr.data)} bytes, not the {nbytes} its shape and dtype need")
    try:
        a = arr.numpy()
    except Exception as e:
        raise ValueError(f"array {name} cannot be decoded ({type(e).__name__})") from e
    if a.dtype != dtype or a.shape != dims:
        raise ValueError(f"array {name} decodes to {a.dtype} {a.shape}, not the {dtype} {dims} it declares")
    return a


def read_bank(record: object, dim: int, max_rows: int) -> PrototypeBank:
    """A received prototype record -> PrototypeBank, each array checked from its metadata before decoding (at most
    ``max_rows`` rows of ``dim`` float32 values, int64 labels, sites and counts). ValueError."""
    if not isinstance(record, ArrayRecord) or set(record) != {P_VECTORS, P_LABELS, P_SITES, P_COUNTS}:
        raise ValueError(f"prototype record must be an ArrayRecord with keys {[P_VECTORS, P_LABELS, P_SITES, P_COUNTS]}")
    vectors = record[P_VECTORS]
    rows = vectors.shape[0] if isinstance(vectors, Array) and len(vectors.shape) == 2 else -1
    if not 0 <= rows <= max_rows:
        raise ValueError(f"prototype record has {rows} rows, at most {max_rows} expected")
    arrays = {P_VECTORS: checked_array(record, P_VECTORS, (rows, dim), (np.dtype(np.float32),)),
              **{k: checked_array(record, k, (rows,), (np.dtype(np.int64),)) for k in (P_LABELS, P_SITES, P_COUNTS)}}
    return PrototypeBank.from_tensors({k: torch.from_numpy(a.copy()) for k, a in arrays.items()})


def content_digest(content: RecordDict) -> str:
    """SHA-256 of a message's content without its signature record: Flower's object id, a hash over every record's
    serialised bytes, the same at both ends of the wire."""
    return RecordDict({k: v for k, v in content.items() if k != SIGNATURE}).object_id


def signature_record(signature: str, origin: int | None = None) -> ConfigRecord:
    """The record that carries a message's signature (and, for an instruction, the run it works in)."""
    return ConfigRecord({SIG: signature, **({ORIGIN: origin} if origin is not None else {})})


def read_signature(content: RecordDict) -> tuple[object, object]:
    """(signature, origin run) of a received message; None for what it lacks (the verifier refuses it)."""
    record = content.get(SIGNATURE) if SIGNATURE in content else None
    if not isinstance(record, ConfigRecord):
        return None, None
    return record.get(SIG), record.get(ORIGIN)
