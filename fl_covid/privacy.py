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

Normalising the noisy sum is post-processing. Accounting composes the privacy loss distributions of the Gaussian
mechanisms (Google's dp-accounting, PLD accountant: numerically tight, for any epsilon) over the two releases of
a round and over rounds; a site's ``PrivacyLedger`` composes its releases over all its runs, for the policy's
``dp-budget``. The noise of a release is drawn from a generator seeded by a secret of the site with the run, the
round and a digest of everything released (weights, epsilon, delta, clip, summary settings), so the same release
asked again repeats its noise and is counted once, and any other release of a round draws fresh noise and is
counted again.

The guarantee covers the prototype record only: shared weights, ``num-examples`` and metrics leave the site
without noise (see docs/threat-model.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from dp_accounting import dp_event, pld

from fl_covid.reporting import write_json

if TYPE_CHECKING:
    from fl_covid.config import Config

# the settings a prototype release depends on besides the weights (its noise and ledger entry name them)
RELEASE_SETTINGS = ("dp-epsilon", "dp-delta", "dp-clip", "min-prototype-images", "prototypes-per-class",
                    "summary-images", "bn-recalibration", "image-size")


class BudgetExceeded(RuntimeError):
    """Prototype releases would take a site's total privacy loss above its policy's ``dp-budget``."""


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Noise standard deviation of the classic Gaussian mechanism for (epsilon, delta)-DP."""
    if epsilon <= 0 or not 0 < delta < 1 or sensitivity <= 0:
        raise ValueError(f"need epsilon > 0, 0 < delta < 1, sensitivity > 0; got {epsilon}, {delta}, {sensitivity}")
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


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


def release_digest(weights_digest: str, settings: dict[str, object]) -> str:
    """SHA-256 naming one release by everything it depends on: the digest of the weights it summarises and the
    settings of the release (``dp-epsilon``, ``dp-delta``, ``dp-clip`` and the summary's settings)."""
    body = json.dumps({"weights": weights_digest, **settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def noise_generator(secret: bytes, run_name: str, server_round: int, release: str) -> torch.Generator:
    """The generator of one release's DP noise: seeded from the site's secret with the run, the round and the
    ``release_digest`` of everything released. The server, which knows the run's seed, cannot predict it; the
    same release asked again (a resumed run repeating an interrupted round) repeats its noise exactly, which
    reveals nothing new, while a release with any other input (another epsilon, clip or weights) draws fresh
    noise, so that several releases of one round cannot be combined to cancel it."""
    digest = hashlib.sha256(secret + f"|{run_name}|{server_round}|{release}|prototype-noise".encode()).digest()
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


def release_event(epsilon: float, delta: float, clip: float) -> dp_event.DpEvent:
    """One round's release of one site: the Gaussian mechanism on the class sums (sensitivity ``clip``) composed
    with the one on the class counts (sensitivity 1), as dp-accounting events (noise multiplier = sigma /
    sensitivity, which does not depend on ``clip``)."""
    sums = gaussian_sigma(epsilon, delta, clip) / clip
    counts = gaussian_sigma(epsilon, delta, 1.0)
    return dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(sums), dp_event.GaussianDpEvent(counts)])


def composed_epsilon(events: list[tuple[dp_event.DpEvent, int]], delta: float, largest_epsilon: float = 1.0
                     ) -> float:
    """The epsilon at ``delta`` of ``count`` releases of each event, composed by privacy loss distributions
    (Google's dp-accounting PLD accountant, tight for Gaussian mechanisms). The privacy loss is discretised in steps
    of 1e-4 x max(1, ``largest_epsilon``, the largest per-release epsilon): the accountant's cost grows with the
    loss range over the step, and its pessimistic discretisation keeps the result an upper bound either way."""
    if not events:
        return 0.0
    accountant = pld.PLDAccountant(value_discretization_interval=1e-4 * max(1.0, largest_epsilon))
    for event, count in events:
        accountant.compose(event, count)
    return float(accountant.get_epsilon(delta))


def releases_through(config: Config, server_round: int) -> int:
    """The prototype releases each site has made in rounds 1..``server_round`` (one per round of the schedule)."""
    return sum(map(config.prototypes_due, range(1, server_round + 1)))


def run_privacy_report(config: Config, server_round: int) -> dict[str, object]:
    """``privacy_report`` of a run's releases after ``server_round`` (the server's ``privacy.json``)."""
    return privacy_report(config.dp_epsilon, config.dp_delta, config.dp_clip, releases_through(config, server_round))


def privacy_report(epsilon: float, delta: float, clip: float, releases: int) -> dict[str, object]:
    """Per-release and total guarantee of ``releases`` prototype releases by one site (one per round in which
    prototypes were due; JSON-friendly)."""
    event = release_event(epsilon, delta, clip)
    return {
        "mechanism": "Gaussian noise on per-class sums of clipped projections and on per-class counts",
        "neighbouring": "add or remove one training image of a site",
        "scope": "the prototype record of each site; shared weights, num-examples and metrics carry no noise",
        "dp-epsilon": epsilon, "dp-delta": delta, "dp-clip": clip,
        "sigma-sum": gaussian_sigma(epsilon, delta, clip), "sigma-count": gaussian_sigma(epsilon, delta, 1.0),
        "releases": releases,
        "per-release": {"epsilon": composed_epsilon([(event, 1)], delta, epsilon), "delta": delta},
        "total": {"epsilon": composed_epsilon([(event, releases)], delta, epsilon), "delta": delta,
                  "accounting": "privacy loss distributions of the Gaussian mechanisms (dp-accounting PLD), "
                                "composed over the two releases of a round and over rounds"},
    }


class PrivacyLedger:
    """The prototype releases of one site over all its runs, kept in its state folder, so that the site can hold
    its total privacy loss under the policy's ``dp-budget``. A release is keyed by run, round and its
    ``release_digest``: the same release asked again (it repeats its noise exactly) is counted once, every
    distinct release of a round is counted."""

    def __init__(self, file: Path) -> None:
        self.file = Path(file)
        self.releases: dict[str, dict[str, float]] = (
            json.loads(self.file.read_text())["releases"] if self.file.is_file() else {})

    @staticmethod
    def of_site(root: Path, site: str) -> PrivacyLedger:
        """The ledger of ``site`` in its state root (``<root>/.privacy-ledger-<site>.json``)."""
        return PrivacyLedger(Path(root) / f".privacy-ledger-{site}.json")

    def epsilon(self, delta: float, planned: dict[str, dict[str, float]] | None = None) -> float:
        """The total epsilon at ``delta`` of every recorded release and the ``planned`` ones (``planned``, keyed
        by run and round, counts only rounds without a recorded release)."""
        done = {k.rsplit("|", 1)[0] for k in self.releases}
        todo = {k: r for k, r in (planned or {}).items() if k not in done}
        counts: dict[tuple[float, float], int] = {}
        for r in [*self.releases.values(), *todo.values()]:
            key = (r["dp-epsilon"], r["dp-delta"])
            counts[key] = counts.get(key, 0) + 1
        return composed_epsilon([(release_event(e, d, 1.0), n) for (e, d), n in counts.items()], delta,
                                max((e for e, _ in counts), default=1.0))

    @staticmethod
    def planned(run: str, server_round: int, epsilon: float, delta: float) -> dict[str, dict[str, float]]:
        """A release a run will make in ``server_round`` (for the budget check before it starts)."""
        return {f"{run}|{server_round}": {"dp-epsilon": epsilon, "dp-delta": delta}}

    @staticmethod
    def release(run: str, server_round: int, epsilon: float, delta: float, digest: str
                ) -> dict[str, dict[str, float]]:
        """One release: run, round and its ``release_digest``."""
        return {f"{run}|{server_round}|{digest}": {"dp-epsilon": epsilon, "dp-delta": delta}}

    def record(self, releases: dict[str, dict[str, float]]) -> None:
        self.releases.update(releases)
        write_json(self.file, {"releases": self.releases})


def check_run_budget(config: Config, root: Path, site: str, run: str, budget: float) -> None:
    """Before a site works on a run: BudgetExceeded when the run's planned prototype releases (one per round of its
    schedule that has no recorded release yet) would bring the site's total privacy loss above ``budget`` (the
    policy's ``dp-budget``; 0 = no bound). Runs without DP prototypes spend nothing."""
    if not budget or not config.spec.prototypes or config.dp_epsilon <= 0:
        return
    ledger = PrivacyLedger.of_site(root, site)
    planned: dict[str, dict[str, float]] = {}
    for rnd in filter(config.prototypes_due, range(1, config.num_server_rounds + 1)):
        planned.update(ledger.planned(run, rnd, config.dp_epsilon, config.dp_delta))
    if (total := ledger.epsilon(config.dp_delta, planned)) > budget:
        raise BudgetExceeded(f"the run's prototype releases would bring this site's total privacy loss to epsilon "
                             f"{total:.3g} at delta {config.dp_delta}, above its dp-budget {budget}")


def release_noise(config: Config, root: Path, site: str, run: str, server_round: int, weights_digest: str,
                  budget: float) -> torch.Generator:
    """The DP noise of one prototype release of ``site`` (state root ``root``), seeded by everything released
    (``release_digest`` of the received weights' digest and ``RELEASE_SETTINGS``). The release is recorded in the
    site's ledger first; BudgetExceeded when it would take the site beyond ``budget`` (0 = no bound). The same
    release asked again is not counted again; a release of the round with other inputs is a new release."""
    digest = release_digest(weights_digest, {k: config.to_dict()[k] for k in RELEASE_SETTINGS})
    ledger = PrivacyLedger.of_site(root, site)
    release = ledger.release(run, server_round, config.dp_epsilon, config.dp_delta, digest)
    if budget and not release.keys() <= ledger.releases.keys() and \
            (total := ledger.epsilon(config.dp_delta, release)) > budget:
        raise BudgetExceeded(f"another prototype release would bring this site's total privacy loss to epsilon "
                             f"{total:.3g}, above its dp-budget {budget}")
    ledger.record(release)
    return noise_generator(site_secret(Path(root) / f".noise-secret-{site}"), run, server_round, digest)
