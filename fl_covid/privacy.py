"""Differentially private class prototypes (Gaussian mechanism) and their privacy accounting over rounds.

A site releases, once per round, its per-class prototypes and per-class image counts. With ``dp-epsilon`` > 0 it
releases instead: each class's SUM of training projections, every projection clipped to L2 norm ``clip``, plus
Gaussian noise, then normalised; and each class's count plus Gaussian noise, rounded and floored at the minimum
number of images per prototype.

Neighbouring datasets differ by adding or removing one training image (images, not patients: a patient with k
slices is protected at group level, roughly k times the epsilon). Adding one image changes one class sum by at
most ``clip`` in L2 norm and one class count by 1, so the classic Gaussian mechanism (Dwork & Roth 2014,
Theorem A.1, stated for epsilon < 1) calibrates

    sigma_sum   = clip * sqrt(2 ln(1.25 / delta)) / epsilon      (sums, sensitivity clip)
    sigma_count =        sqrt(2 ln(1.25 / delta)) / epsilon      (counts, sensitivity 1)

Normalising the noisy sum is post-processing. Accounting uses zero-concentrated DP (Bun & Steinke 2016): a
Gaussian mechanism with sensitivity s and noise sigma is rho-zCDP with rho = s^2 / (2 sigma^2); rho adds up over
the two releases of a round and over rounds, and rho-zCDP implies (rho + 2 sqrt(rho ln(1/delta)), delta)-DP for
every delta > 0, for any epsilon (the classic calibration's epsilon < 1 condition is not needed for this bound).

The guarantee covers the prototype record only: shared weights, ``num-examples`` and metrics leave the site
without noise (see docs/threat-model.md).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Noise standard deviation of the classic Gaussian mechanism for (epsilon, delta)-DP."""
    if epsilon <= 0 or not 0 < delta < 1 or sensitivity <= 0:
        raise ValueError(f"need epsilon > 0, 0 < delta < 1, sensitivity > 0; got {epsilon}, {delta}, {sensitivity}")
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def zcdp_rho(sensitivity: float, sigma: float) -> float:
    """zCDP parameter of one Gaussian mechanism release."""
    return sensitivity ** 2 / (2 * sigma ** 2)


def zcdp_to_epsilon(rho: float, delta: float) -> float:
    """Epsilon of the (epsilon, delta)-DP guarantee implied by rho-zCDP (Bun & Steinke 2016, Prop. 1.3)."""
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


def clip_rows(vectors: torch.Tensor, clip: float) -> torch.Tensor:
    """(N, D) -> (N, D) with every row scaled down to L2 norm at most ``clip``."""
    norms = vectors.norm(dim=1, keepdim=True)
    return vectors * (clip / norms.clamp(min=clip))


def noisy_class_sums(projections: torch.Tensor, labels: torch.Tensor, clip: float, sigma_sum: float,
                     sigma_count: float, generator: torch.Generator, num_classes: int = 2
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """projections (N, D), labels (N,) -> (clipped class sums + N(0, sigma_sum^2) (C, D),
    class counts + N(0, sigma_count^2) (C,)), both float64."""
    onehot = F.one_hot(labels, num_classes).to(torch.float64)  # (N, C)
    sums = onehot.T @ clip_rows(projections.to(torch.float64), clip)
    counts = onehot.sum(0)
    sums = sums + sigma_sum * torch.randn(sums.shape, generator=generator, dtype=torch.float64)
    counts = counts + sigma_count * torch.randn(counts.shape, generator=generator, dtype=torch.float64)
    return sums, counts


def site_secret(file: Path) -> bytes:
    """The site's noise secret (32 random bytes, created on first use, readable by the site only); it never
    leaves the site."""
    if not file.is_file():
        file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(file.with_name(file.name + ".new"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        os.replace(file.with_name(file.name + ".new"), file)
    secret = file.read_bytes()
    if len(secret) != 32:
        raise ValueError(f"{file} does not hold a 32-byte noise secret; delete it to make a new one")
    return secret


def noise_generator(secret: bytes, run_name: str, server_round: int) -> torch.Generator:
    """The generator of one round's DP noise: seeded from the site's secret with the run and round. The server,
    which knows the run's seed, cannot predict the noise; a round released again (a resumed run repeating an
    interrupted round) repeats its noise exactly, which reveals nothing new and costs no privacy."""
    digest = hashlib.sha256(secret + f"|{run_name}|{server_round}|prototype-noise".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def private_prototypes(projections: torch.Tensor, labels: torch.Tensor, epsilon: float, delta: float,
                       generator: torch.Generator, clip: float = 1.0, min_count: int = 1,
                       num_classes: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(epsilon, delta)-DP version of ``class_prototypes`` with one prototype per class: (unit prototypes (P, D)
    float32, labels (P,), noisy counts (P,) int64, floored at ``min_count``). A class with fewer than
    ``min_count`` training images is withheld; that decision uses the true count and is not covered by the
    guarantee (it reveals only whether the class reaches the minimum).

    ``generator``: the noise source, ``noise_generator`` of the site's secret.
    """
    sums, counts = noisy_class_sums(
        projections, labels, clip, gaussian_sigma(epsilon, delta, clip), gaussian_sigma(epsilon, delta, 1.0),
        generator, num_classes)
    present = torch.bincount(labels, minlength=num_classes) >= min_count
    return (F.normalize(sums, dim=1).float()[present], torch.arange(num_classes)[present],
            counts.round().clamp(min=min_count).to(torch.int64)[present])


def privacy_report(epsilon: float, delta: float, clip: float, rounds: int) -> dict[str, object]:
    """Per-round and total guarantee of ``rounds`` prototype releases by one site (JSON-friendly)."""
    sigma_sum, sigma_count = gaussian_sigma(epsilon, delta, clip), gaussian_sigma(epsilon, delta, 1.0)
    rho = zcdp_rho(clip, sigma_sum) + zcdp_rho(1.0, sigma_count)
    return {
        "mechanism": "Gaussian noise on per-class sums of clipped projections and on per-class counts",
        "neighbouring": "add or remove one training image of a site",
        "scope": "the prototype record of each site; shared weights, num-examples and metrics carry no noise",
        "dp-epsilon": epsilon, "dp-delta": delta, "dp-clip": clip,
        "sigma-sum": sigma_sum, "sigma-count": sigma_count,
        "rounds": rounds,
        "per-round": {"rho": rho, "epsilon": zcdp_to_epsilon(rho, delta), "delta": delta},
        "total": {"rho": rho * rounds, "epsilon": zcdp_to_epsilon(rho * rounds, delta), "delta": delta,
                  "accounting": "zCDP (Bun & Steinke 2016): rho adds over releases and rounds"},
        "basic-composition": {"epsilon": 2 * epsilon * rounds, "delta": 2 * delta * rounds,
                              "valid": epsilon < 1},
    }
