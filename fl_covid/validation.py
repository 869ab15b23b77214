"""Checks on what crosses between a site and the server, in both directions: each returns why something must be
rejected (a short text) or None. They never trust a count, shape or dtype they are handed."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping

import numpy as np

from fl_covid.config import Config
from fl_covid.prototypes import PrototypeBank

MAX_EXAMPLES = 10_000_000
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
REMOTE_TEXT_CHARS = 200
NUM_CLASSES = 2  # every site's labels: NonCOVID 0, COVID 1 (fl_covid.data.CLASSES)


def remote_text(text: object) -> str:
    """Text from the other side, safe to log: quoted (so no line breaks or forged log lines) and truncated."""
    s = str(text)
    return repr(s[:REMOTE_TEXT_CHARS] + ("..." if len(s) > REMOTE_TEXT_CHARS else ""))


def check_run_name(name: object) -> str | None:
    """Why a run name (used as a folder name at every site) must be rejected: only [A-Za-z0-9._-], at most 128
    characters, not starting with a dot (so never '.', '..' or a hidden folder)."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        return f"run name {remote_text(name)} must be 1-128 characters of [A-Za-z0-9._-], not starting with '.'"
    return None


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
                f"unexpected {[remote_text(k) for k in sorted(set(metrics) - set(expected))][:5]}")
    for key, value in metrics.items():
        if key in lists:
            if not isinstance(value, list) or len(value) != lists[key] or not all(
                    isinstance(v, (int, float)) and 0 <= v <= 1 for v in value):
                return f"metric {key} must be a list of {lists[key]} values in [0, 1]"
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metric {key} = {remote_text(value)} is not a finite number"
    return None


def check_update(flat: np.ndarray, max_norm: float = 0.0, reference: np.ndarray | None = None) -> str | None:
    """Why decoded flat weights (N,) float32 must be rejected (NaN or Inf; with ``max_norm`` > 0, an L2 distance
    from ``reference``, the weights sent that round, above ``max_norm``), or None when they are sound."""
    if not np.isfinite(flat).all():
        return "weights contain NaN or Inf"
    if max_norm > 0 and reference is not None and len(reference) == len(flat):
        norm = float(np.linalg.norm(flat.astype(np.float64) - reference))
        if norm > max_norm:
            return f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}"
    return None


def check_prototypes(vectors: np.ndarray, labels: np.ndarray, sites: np.ndarray, counts: np.ndarray, *, dim: int,
                     num_classes: int, num_sites: int, max_rows: int, min_count: int) -> str | None:
    """Why prototype rows must be rejected (a site's reply, or the bank a site receives), or None.

    ``vectors`` (P, dim) finite unit rows; ``labels`` (P,) classes in [0, num_classes); ``sites`` (P,) site ids in
    [0, num_sites); ``counts`` (P,) integers, each at least ``min_count`` images; at most ``max_rows`` rows.
    """
    p = len(vectors) if vectors.ndim == 2 else -1
    if p < 0 or vectors.shape[1] != dim:
        return f"prototypes have shape {tuple(vectors.shape)}, expected (P, {dim})"
    if p > max_rows:
        return f"{p} prototype rows, at most {max_rows} expected"
    for name, a in (("labels", labels), ("sites", sites), ("counts", counts)):
        if a.shape != (p,) or not np.issubdtype(a.dtype, np.integer):
            return f"prototype {name} must be {p} integers, got shape {tuple(a.shape)} {a.dtype}"
    if not np.isfinite(vectors).all():
        return "prototypes contain NaN or Inf"
    if p and (labels.min() < 0 or labels.max() >= num_classes):
        return f"prototype labels must lie in [0, {num_classes})"
    if p and (sites.min() < 0 or sites.max() >= num_sites):
        return f"prototype site ids must lie in [0, {num_sites})"
    if p and counts.min() < min_count:
        return f"a prototype summarises {int(counts.min())} images, fewer than the minimum {min_count}"
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    if not np.all(np.abs(norms - 1) < 1e-3):
        return f"prototype rows must be unit vectors, norms {norms.round(3)[:6]}"
    return None


def max_prototype_rows(config: Config, sites: int = 1) -> int:
    """Rows the prototypes of ``sites`` sites may have: ``prototypes-per-class`` per class and site."""
    return sites * NUM_CLASSES * config.prototypes_per_class


def check_bank(bank: PrototypeBank, config: Config, dim: int, max_rows: int) -> str | None:
    """``check_prototypes`` of a decoded bank (a site's reply, or the bank a site receives) in the run of
    ``config``: at most ``max_rows`` unit rows of ``dim`` values, labels of its classes, ids of its sites, each row
    summarising at least ``min-prototype-images`` images."""
    return check_prototypes(bank.vectors.numpy(), bank.labels.numpy(), bank.sites.numpy(), bank.counts.numpy(),
                            dim=dim, num_classes=NUM_CLASSES, num_sites=len(config.sites), max_rows=max_rows,
                            min_count=config.min_prototype_images)


def check_instruction(server_round: object, lr: object, run_name: object, num_rounds: int, train: bool
                      ) -> str | None:
    """Why a site must reject the server's instruction: a round outside 1..``num_rounds``, a learning rate that is
    not a finite number in (0, 1] (training only), or an unsafe run name."""
    if not isinstance(server_round, int) or isinstance(server_round, bool) or not 1 <= server_round <= num_rounds:
        return f"server round {remote_text(server_round)} is not in 1..{num_rounds}"
    if train and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr)
                  or not 0 < lr <= 1):
        return f"learning rate {remote_text(lr)} is not in (0, 1]"
    return check_run_name(run_name)
