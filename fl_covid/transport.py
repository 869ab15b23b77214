"""How the shared weights travel between the server and the sites (config key ``compression``), Flower-free.

Shared weights are one flat float32 vector (N,) in the transfer layout (``fl_covid.layout``). ``none`` sends them
as they are, ``fp16`` as float16 (half the bytes, relative error at most 2**-11). ``int8`` sends *differences*
from weights the receiver already holds, after a first whole float32 copy: the server the change of the global
weights since the copy every site holds, a site the change its training made. A difference is quantised in
blocks of INT8_BLOCK values, each with one float32 scale, and each side carries its quantisation error into its
next difference (error feedback): the server by tracking the copy the sites hold (``SitesCopy``), a site by
keeping the error in its local state (``site_reply``). ``fl_covid.records`` turns a ``Transfer`` into the Flower
record that carries it and back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fl_covid.config import COMPRESSIONS

INT8_BLOCK = 16384


def encode(flat: np.ndarray, compression: str) -> np.ndarray:
    """Flat float32 weights for transfer (config key ``compression``): ``fp16`` halves the bytes (relative error at
    most 2**-11); ``none`` sends them as they are, and so does ``int8`` when whole weights must travel (a first
    copy), which are then sent as float32."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} is not one of {COMPRESSIONS} (config key 'compression')")
    if compression in ("none", "int8"):
        return flat
    peak = float(np.abs(flat).max()) if flat.size else 0.0
    if not peak <= float(np.finfo(np.float16).max):  # also catches NaN
        raise ValueError(f"weights (max |value| {peak:.3g}) cannot be sent as {compression}; set compression=none")
    return flat.astype(np.float16)


def wire_dtype(compression: str) -> np.dtype:
    """The dtype whole weights travel in."""
    return np.dtype(np.float16 if compression == "fp16" else np.float32)


def sends_differences(compression: str) -> bool:
    """Whether a site's training reply is a difference from the weights it trained from (else whole weights)."""
    return compression == "int8"


def quantize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float values (N,) -> (int8 (N,), float32 scales (ceil(N / INT8_BLOCK),)): each block scaled so that its
    largest magnitude maps to 127, rounded to nearest."""
    n = len(values)
    blocks = np.pad(values.astype(np.float32), (0, -n % INT8_BLOCK)).reshape(-1, INT8_BLOCK)
    scales = np.abs(blocks).max(axis=1) / 127.0
    safe = np.where(scales > 0, scales, 1.0)[:, None]
    q = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int8).reshape(-1)[:n]
    return q, scales.astype(np.float32)


def dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of ``quantize`` up to rounding: int8 (N,) and scales -> float32 (N,)."""
    n = len(q)
    blocks = np.pad(q.astype(np.float32), (0, -n % INT8_BLOCK)).reshape(-1, INT8_BLOCK)
    return (blocks * scales[:, None]).reshape(-1)[:n]


def weights_digest(flat: np.ndarray) -> str:
    """SHA-256 of flat float32 weights (a train message names the summary's weights by it)."""
    return hashlib.sha256(np.ascontiguousarray(flat, dtype=np.float32).tobytes()).hexdigest()


@dataclass(frozen=True)
class Transfer:
    """Shared weights as they travel: whole weights (``values`` float32 or float16 (N,), ``scales`` None), or an
    int8 difference from weights the receiver holds (``values`` int8 (N,), ``scales`` float32
    (ceil(N / INT8_BLOCK),), one per block)."""

    values: np.ndarray
    scales: np.ndarray | None = None

    @staticmethod
    def whole(flat: np.ndarray, compression: str) -> Transfer:
        """Whole float32 weights (N,) encoded for ``compression`` (``encode``)."""
        return Transfer(encode(flat, compression))

    @staticmethod
    def difference(change: np.ndarray) -> Transfer:
        """A float32 difference (N,), quantised to int8 blocks."""
        return Transfer(*quantize(change))

    @property
    def is_difference(self) -> bool:
        return self.scales is not None

    def applied_to(self, held: np.ndarray | None) -> np.ndarray:
        """The float32 weights (N,) the receiver holds afterwards: whole weights decoded, or the difference added
        to ``held``, the weights the receiver held before."""
        if self.scales is None:
            return self.values.astype(np.float32)
        if held is None:
            raise ValueError("a difference needs the weights it applies to")
        return held + dequantize(self.values, self.scales)


class SitesCopy:
    """The server's record of the global weights as every site holds them (float32 (N,), decoded as the sites
    decode them), from which it sends int8 differences whose quantisation error stays in the next difference, and
    of the weights the sites train from in a round, against which their replies are read and judged."""

    def __init__(self, compression: str) -> None:
        self.compression = compression
        self.held: np.ndarray | None = None  # None until whole weights were sent
        self.trained_from = np.zeros(0, np.float32)  # what this round's training replies start from

    def summary(self, flat: np.ndarray) -> tuple[Transfer, str | None]:
        """The weights of a summary message for global weights ``flat`` (N,): under int8, once the sites hold a
        copy, the change since that copy; else whole weights. With the digest of the copy a difference applies
        to (None for whole weights)."""
        if self.held is None or not sends_differences(self.compression):
            return self._whole(flat), None
        base = weights_digest(self.held)
        transfer = Transfer.difference(flat - self.held)
        self.held = transfer.applied_to(self.held)
        return transfer, base

    def train(self, flat: np.ndarray | None) -> Transfer | None:
        """The weights of a train message: whole ``flat`` (N,) when they travel with it (``none`` / ``fp16``
        without a summary this round), None when the sites train from the summary's weights. Either way those are
        what this round's replies start from."""
        transfer = self._whole(flat) if flat is not None else None
        if self.held is None:
            raise ValueError("the sites hold no weights yet: a train message without weights needs a summary first")
        self.trained_from = self.held
        return transfer

    def reply(self, transfer: Transfer) -> np.ndarray:
        """A site's trained weights (float32 (N,)) from its training reply: whole, or the difference from what it
        trained from."""
        return transfer.applied_to(self.trained_from)

    def _whole(self, flat: np.ndarray) -> Transfer:
        transfer = Transfer.whole(flat, self.compression)
        self.held = transfer.applied_to(None)
        return transfer


def site_received(transfer: Transfer, base: str | None, kept: np.ndarray | None) -> np.ndarray:
    """The float32 weights (N,) a site holds after receiving ``transfer``: whole weights, or a difference added to
    the weights it kept from its last summary (``kept``), which must be the weights of digest ``base`` the server
    names. ValueError when the site does not hold them or the weights are not finite."""
    if transfer.is_difference and (kept is None or weights_digest(kept) != base):
        raise ValueError("the server sent a difference from weights this site does not hold")
    flat = transfer.applied_to(kept)
    if not np.isfinite(flat).all():
        raise ValueError("the shared weights from the server contain NaN or Inf")
    return flat


def site_reply(trained: np.ndarray, start: np.ndarray, error: np.ndarray | None, compression: str
               ) -> tuple[Transfer, np.ndarray | None]:
    """A site's training reply for weights ``trained`` (N,) trained from ``start`` (N,), and the quantisation
    error it carries into its next reply: under int8 the change training made plus the ``error`` of its last
    reply (error feedback), else whole weights (no error)."""
    if not sends_differences(compression):
        return Transfer.whole(trained, compression), None
    change = trained - start + (error if error is not None else 0.0)
    transfer = Transfer.difference(change)
    return transfer, change - dequantize(transfer.values, transfer.scales)
