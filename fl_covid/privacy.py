"""Differentially private class prototypes (Gaussian mechanism) and their privacy accounting over rounds.

A site releases, once per round, its per-class prototypes and per-class image counts. With ``dp-epsilon`` > 0 it
releases instead: each class's SUM of training projections, every projection clipped to L2 norm ``clip``, plus
Gaussian noise, then normalised; and each class's count plus Gaussian noise, rounded and floored at 0.

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

import math
import os

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


def secret_generator() -> torch.Generator:
    """A generator seeded from the operating system's entropy: DP noise must not be reproducible from the
    run's seed, which the server knows."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


@torch.no_grad()
def private_prototypes(projections: torch.Tensor, labels: torch.Tensor, epsilon: float, delta: float,
                       clip: float = 1.0, generator: torch.Generator | None = None, num_classes: int = 2
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(epsilon, delta)-DP version of ``class_prototypes``: (unit prototypes (C, D) float32, counts (C,) int64).

    ``generator`` only for tests; by default the noise comes from ``secret_generator()``.
    """
    sums, counts = noisy_class_sums(
        projections, labels, clip, gaussian_sigma(epsilon, delta, clip), gaussian_sigma(epsilon, delta, 1.0),
        generator if generator is not None else secret_generator(), num_classes)
    return F.normalize(sums, dim=1).float(), counts.round().clamp(min=0).to(torch.int64)


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
