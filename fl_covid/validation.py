"""Checks on what a site sends back, so the server can reject a bad update instead of averaging it in."""

from __future__ import annotations

import math
from typing import Collection, Mapping

import numpy as np

MAX_EXAMPLES = 10_000_000


def check_num_examples(num_examples: object) -> str | None:
    """Why an example count must be rejected (not an integer in [1, MAX_EXAMPLES]), or None."""
    if not isinstance(num_examples, (int, float)) or isinstance(num_examples, bool) \
            or not 0 < num_examples <= MAX_EXAMPLES or int(num_examples) != num_examples:
        return f"num-examples {num_examples!r} is not an integer in [1, {MAX_EXAMPLES}]"
    return None


def check_metrics(metrics: Mapping[str, object], expected: Collection[str],
                  lists: Mapping[str, int] | None = None) -> str | None:
    """Why a reply's metrics must be rejected: keys other than ``expected``, a value that is not a finite
    number, or a list where not allowed (``lists``: key -> length; list values must lie in [0, 1])."""
    lists = lists or {}
    if set(metrics) != set(expected):
        return (f"metric keys: missing {sorted(set(expected) - set(metrics))}, "
                f"unexpected {sorted(set(metrics) - set(expected))}")
    for key, value in metrics.items():
        if key in lists:
            if not isinstance(value, list) or len(value) != lists[key] or not all(
                    isinstance(v, (int, float)) and 0 <= v <= 1 for v in value):
                return f"metric {key} must be a list of {lists[key]} values in [0, 1]"
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metric {key} = {value!r} is not a finite number"
    return None


def check_update(expected: Mapping[str, tuple[tuple[int, ...], np.dtype]], received: Mapping[str, np.ndarray],
                 num_examples: object, max_norm: float = 0.0,
                 reference: Mapping[str, np.ndarray] | None = None) -> str | None:
    """Why a weight update must be rejected, or None when it is sound.

    ``expected``: name -> (shape, dtype) of the shared weights; ``received``: the reply's arrays;
    ``max_norm`` > 0 bounds the L2 norm of (received - reference) over all float tensors.
    """
    if reason := check_num_examples(num_examples):
        return reason
    missing, extra = set(expected) - set(received), set(received) - set(expected)
    if missing or extra:
        return f"wrong keys: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
    sq = 0.0
    for name, (shape, dtype) in expected.items():
        a = received[name]
        if tuple(a.shape) != tuple(shape):
            return f"tensor {name} has shape {tuple(a.shape)}, expected {tuple(shape)}"
        if a.dtype != dtype and not (a.dtype == np.float16 and np.issubdtype(dtype, np.floating)):
            return f"tensor {name} has dtype {a.dtype}, expected {np.dtype(dtype)}"
        if np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all():
                return f"tensor {name} contains NaN or Inf"
            if max_norm > 0 and reference is not None:
                sq += float(np.sum((a.astype(np.float64) - reference[name]) ** 2))
    if max_norm > 0 and sq ** 0.5 > max_norm:
        return f"update norm {sq ** 0.5:.3g} exceeds the bound {max_norm:.3g}"
    return None


def check_prototypes(vectors: np.ndarray, counts: np.ndarray, dim: int, num_classes: int = 2) -> str | None:
    """Why a site's prototypes must be rejected: shape (C, dim) with counts (C,), finite, unit or zero rows."""
    if vectors.shape != (num_classes, dim):
        return f"prototypes have shape {tuple(vectors.shape)}, expected ({num_classes}, {dim})"
    if counts.shape != (num_classes,) or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        return f"prototype counts must be {num_classes} non-negative integers, got {counts!r}"
    if not np.isfinite(vectors).all():
        return "prototypes contain NaN or Inf"
    norms = np.linalg.norm(vectors, axis=1)
    if not np.all((np.abs(norms - 1) < 1e-3) | ((norms == 0) & (counts == 0))):
        return f"prototype rows must be unit vectors (zero where a class has no images), norms {norms.round(3)}"
    return None
