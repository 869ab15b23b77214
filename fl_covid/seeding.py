"""One formula for every random stream of a run, so that streams never collide and each is reproducible.

``derive(seed, "batches", site, round)`` is the first 63 bits of SHA-256 over the run's ``seed`` and the stream's
name and indices. Streams in use: ``init`` (model weights, ``fl_covid.model.initial_model``: the server, every
federated site and the centralized driver start from the same weights), ``batches`` and ``augment`` (per site and
round in a federation, per site in centralized training), ``prototypes`` (k-means of sub-prototypes, per site and
round), ``summary`` (which training images a site passes through the received model at the start of a round, per
site and round). Folds use ``seed`` itself (scikit-learn's ``random_state``), so that every method sees the same
split for the same (fold, seed). DP noise is the exception: it is seeded from a secret of the site
(fl_covid.privacy), never from ``seed``, which the server knows.
"""

from __future__ import annotations

import hashlib


def derive(seed: int, stream: str, *indices: int) -> int:
    """A 63-bit seed for the random stream ``stream`` with ``indices`` (site, round, ...) of a run's ``seed``."""
    text = "|".join([str(seed), stream, *map(str, indices)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
