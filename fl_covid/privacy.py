"""Differentially private class prototypes (Gaussian mechanism) and their privacy accounting over rounds.

A site releases, once per round, its per-class prototypes and per-class image counts. With ``dp-epsilon`` > 0 it
releases instead: each class's SUM of training projections, every projection clipped to L2 norm ``clip``, plus
Gaussian noise, then normalised; and each class's count plus Gaussian noise, rounded and floored at the minimum
number of images per prototype.

Neighbouring datasets differ by adding or removing one training image (images, not patients: a patient with k
slices is protected at group level, roughly k times the epsilon). Adding one image changes one class sum by at
most ``clip`` in L2 norm and one class count by 1. Both Gaussian mechanisms get the same noise multiplier s
(sigma / sensitivity), so a release is a Gaussian mechanism of sensitivity 1 and noise s / sqrt(2): mu-GDP with
mu = sqrt(2) / s (Dong, Roth & Su 2022). ``dp-epsilon`` is the epsilon of one release at ``dp-delta``: s is the
smallest noise for which the release is exactly (epsilon, delta)-DP, from the closed form of the Gaussian
mechanism's privacy profile (the analytic Gaussian mechanism, Balle & Wang 2018, Theorem 8), valid for any
epsilon (the classic sqrt(2 ln(1.25 / delta)) / epsilon of Dwork & Roth holds for epsilon < 1 only, and there for
one mechanism, not the pair).

Normalising the noisy sum is post-processing. Releases compose exactly: Gaussian mechanisms of parameters mu_i
compose to sqrt(sum mu_i^2)-GDP, whose epsilon at delta is the same closed form, so the accounting over rounds
and over a site's runs (its ``PrivacyLedger``, for the policy's ``dp-budget``) is tight, with no discretisation,
and rounded up. The noise of a release is drawn from a generator seeded by a secret of the site with the run, the
round and a digest of everything released (weights, epsilon, delta, clip, noise multiplier, summary settings), so
the same release asked again repeats its noise and is counted once, and any other release of a round draws fresh
noise and is counted again.

The guarantee covers the prototype record only: shared weights, ``num-examples`` and metrics leave the site
without noise (see docs/threat-model.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.special import log_ndtr

from fl_covid.config import Config
from fl_covid.reporting import write_json

# the settings a prototype release depends on besides the weights (its noise and ledger entry name them)
RELEASE_SETTINGS = ("dp-epsilon", "dp-delta", "dp-clip", "min-prototype-images", "prototypes-per-class",
                    "summary-images", "bn-recalibration", "image-size")
ROUNDING_MARGIN = 1e-9  # a release is calibrated to (1 - ROUNDING_MARGIN) x its epsilon (``release_mu``)


class BudgetExceeded(RuntimeError):
    """Prototype releases would take a site's total privacy loss above its policy's ``dp-budget``."""


def gdp_delta(mu: float, epsilon: float) -> float:
    """The delta at ``epsilon`` of a mu-GDP mechanism (a Gaussian mechanism with noise 1 / mu times its
    sensitivity): Phi(mu / 2 - epsilon / mu) - e^epsilon Phi(-mu / 2 - epsilon / mu) (Balle & Wang 2018,
    Theorem 8), in log space so that a large epsilon neither overflows nor cancels."""
    upper = float(log_ndtr(mu / 2 - epsilon / mu))
    if upper == -math.inf:
        return 0.0
    lower = epsilon + float(log_ndtr(-mu / 2 - epsilon / mu))
    return -math.exp(upper) * math.expm1(lower - upper)


def _last_true(holds: Callable[[float], bool], inside: float, outside: float) -> float:
    """The float nearest ``outside`` at which ``holds`` (monotone between the two, true at ``inside``, false at
    ``outside``) is still true, by bisection down to adjacent floats."""
    while (mid := (inside + outside) / 2) not in (inside, outside):
        inside, outside = (mid, outside) if holds(mid) else (inside, mid)
    return inside


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon >= 0 at which a mu-GDP mechanism is (epsilon, ``delta``)-DP (rounded up)."""
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    def holds(epsilon: float) -> bool:  # false below the answer, true from it on
        return gdp_delta(mu, epsilon) <= delta

    inside = 1.0
    while not holds(inside):
        inside *= 2
    return _last_true(holds, inside, inside / 2 if inside > 1 else 0.0)


@cache
def gdp_mu(epsilon: float, delta: float) -> float:
    """The largest mu for which a mu-GDP mechanism is (``epsilon``, ``delta``)-DP (rounded down)."""
    if epsilon <= 0 or not 0 < delta < 1:
        raise ValueError(f"need epsilon > 0 and 0 < delta < 1; got {epsilon}, {delta}")
    def holds(mu: float) -> bool:  # true up to the answer, false above it
        return gdp_delta(mu, epsilon) <= delta

    inside = 1.0
    while not holds(inside):
        inside /= 2
    while holds(2 * inside):
        inside *= 2
    return _last_true(holds, inside, 2 * inside)


def release_mu(epsilon: float, delta: float) -> float:
    """The GDP parameter of one release at dp-epsilon ``epsilon``: (epsilon, ``delta``)-DP with a relative margin
    of ROUNDING_MARGIN in epsilon, far above the rounding error of ``gdp_delta`` and negligible in noise."""
    return gdp_mu(epsilon * (1 - ROUNDING_MARGIN), delta)


def noise_multiplier(epsilon: float, delta: float) -> float:
    """sigma / sensitivity of both Gaussian mechanisms of a release (class sums, class counts), so that the
    release, sqrt(2) / multiplier - GDP, is (``epsilon``, ``delta``)-DP (``release_mu``)."""
    return math.sqrt(2) / release_mu(epsilon, delta)


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Noise standard deviation of a release's Gaussian mechanism of ``sensitivity`` (``noise_multiplier``)."""
    if epsilon <= 0 or not 0 < delta < 1 or sensitivity <= 0:
        raise ValueError(f"need epsilon > 0, 0 < delta < 1, sensitivity > 0; got {epsilon}, {delta}, {sensitivity}")
    return sensitivity * noise_multiplier(epsilon, delta)


def composed_epsilon(mus: Iterable[float], delta: float) -> float:
    """The epsilon at ``delta`` of releases of parameters ``mus`` together: Gaussian mechanisms compose exactly to
    sqrt(sum mu^2)-GDP (Dong, Roth & Su 2022, Corollary 3.3)."""
    return gdp_epsilon(math.sqrt(sum(mu * mu for mu in mus)), delta)


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


def releases_through(config: Config, server_round: int) -> int:
    """The prototype releases each site has made in rounds 1..``server_round`` (one per round of the schedule)."""
    return sum(map(config.prototypes_due, range(1, server_round + 1)))


def run_privacy_report(config: Config, server_round: int) -> dict[str, object]:
    """``privacy_report`` of a run's releases after ``server_round`` (the server's ``privacy.json``)."""
    return privacy_report(config.dp_epsilon, config.dp_delta, config.dp_clip, releases_through(config, server_round))


def privacy_report(epsilon: float, delta: float, clip: float, releases: int) -> dict[str, object]:
    """Per-release and total guarantee of ``releases`` prototype releases by one site (one per round in which
    prototypes were due; JSON-friendly)."""
    mu = release_mu(epsilon, delta)
    return {
        "mechanism": "Gaussian noise on per-class sums of clipped projections and on per-class counts",
        "neighbouring": "add or remove one training image of a site",
        "scope": "the prototype record of each site; shared weights, num-examples and metrics carry no noise",
        "dp-epsilon": epsilon, "dp-delta": delta, "dp-clip": clip,
        "sigma-sum": gaussian_sigma(epsilon, delta, clip), "sigma-count": gaussian_sigma(epsilon, delta, 1.0),
        "releases": releases,
        "per-release": {"epsilon": composed_epsilon([mu], delta), "delta": delta},
        "total": {"epsilon": composed_epsilon([mu] * releases, delta), "delta": delta,
                  "accounting": "Gaussian differential privacy: the two Gaussian mechanisms of a release and all "
                                "releases compose exactly to one mu-GDP mechanism (Dong, Roth & Su 2022), its "
                                "epsilon at delta in closed form (Balle & Wang 2018)"},
    }


def classic_mu(epsilon: float, delta: float) -> float:
    """The GDP parameter of a release whose two mechanisms were each calibrated by the classic Gaussian mechanism,
    noise multiplier sqrt(2 ln(1.25 / delta)) / epsilon (ledger entries written before the exact calibration)."""
    return math.sqrt(2) * epsilon / math.sqrt(2 * math.log(1.25 / delta))


class PrivacyLedger:
    """The prototype releases of one site over all its runs, kept in its state folder, so that the site can hold
    its total privacy loss under the policy's ``dp-budget``. A release is keyed by run, round and its
    ``release_digest``: the same release asked again (it repeats its noise exactly) is counted once, every
    distinct release of a round is counted. Each entry holds its epsilon, delta and GDP parameter ``gdp-mu``;
    entries without one were calibrated by the classic Gaussian mechanism (``classic_mu``)."""

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
        return composed_epsilon([r.get("gdp-mu") or classic_mu(r["dp-epsilon"], r["dp-delta"])
                                 for r in [*self.releases.values(), *todo.values()]], delta)

    @staticmethod
    def entry(epsilon: float, delta: float) -> dict[str, float]:
        """What the ledger keeps of a release at dp-epsilon ``epsilon`` and dp-delta ``delta``."""
        return {"dp-epsilon": epsilon, "dp-delta": delta, "gdp-mu": release_mu(epsilon, delta)}

    @staticmethod
    def planned(run: str, server_round: int, epsilon: float, delta: float) -> dict[str, dict[str, float]]:
        """A release a run will make in ``server_round`` (for the budget check before it starts)."""
        return {f"{run}|{server_round}": PrivacyLedger.entry(epsilon, delta)}

    @staticmethod
    def release(run: str, server_round: int, epsilon: float, delta: float, digest: str
                ) -> dict[str, dict[str, float]]:
        """One release: run, round and its ``release_digest``."""
        return {f"{run}|{server_round}|{digest}": PrivacyLedger.entry(epsilon, delta)}

    def record(self, releases: dict[str, dict[str, float]]) -> None:
        """Add ``releases`` and write the ledger."""
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
    (``release_digest`` of the received weights' digest, ``RELEASE_SETTINGS`` and the noise multiplier). The
    release is recorded in the site's ledger first; BudgetExceeded when it would take the site beyond ``budget``
    (0 = no bound). The same release asked again is not counted again; a release of the round with other inputs is
    a new release."""
    settings = {k: config.to_dict()[k] for k in RELEASE_SETTINGS}
    settings["noise-multiplier"] = noise_multiplier(config.dp_epsilon, config.dp_delta)
    digest = release_digest(weights_digest, settings)
    ledger = PrivacyLedger.of_site(root, site)
    release = ledger.release(run, server_round, config.dp_epsilon, config.dp_delta, digest)
    if budget and not release.keys() <= ledger.releases.keys() and \
            (total := ledger.epsilon(config.dp_delta, release)) > budget:
        raise BudgetExceeded(f"another prototype release would bring this site's total privacy loss to epsilon "
                             f"{total:.3g}, above its dp-budget {budget}")
    ledger.record(release)
    return noise_generator(site_secret(Path(root) / f".noise-secret-{site}"), run, server_round, digest)
