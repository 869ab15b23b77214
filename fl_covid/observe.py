"""Observation points for tests and tools, so that they watch a run without patching its code.

Product code calls ``emit(event, **payload)`` at a few points (``loaded``: a site's model right after it loaded
the shared weights and its own BN; ``aggregated``: the server's prototype bank after a round's aggregation).
``watching(fn)`` registers ``fn(event, payload)`` for the duration of a ``with`` block. Nothing listens in
production, where ``emit`` costs one empty loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Observer = Callable[[str, dict[str, Any]], None]
_observers: list[Observer] = []


def emit(event: str, **payload: Any) -> None:
    for observer in _observers:
        observer(event, payload)


@contextmanager
def watching(observer: Observer) -> Iterator[None]:
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)
