"""Differentially private prototypes (fl_covid/privacy.py): noise calibration, clipping, accounting against
hand-computed values, 'dp-epsilon 0 means off', and a real federated round with DP on (tests/inprocess.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_accounting import dp_event, pld
from scipy import optimize, stats

from fl_covid import records as R
from fl_covid.config import load_config
from fl_covid.errors import ConfigError
from fl_covid.privacy import (
    PrivacyLedger,
    clip_rows,
    gaussian_sigma,
    noise_generator,
    noisy_class_sums,
    privacy_report,
    private_prototypes,
    release_digest,
)
from server.strategy import NotEnoughSites
from tests.inprocess import run_dir, run_federation, shared_run, wire


def unit_projections(n: int = 40, dim: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    return z, torch.arange(n) % 2


def test_sigma_makes_a_release_exactly_epsilon_delta() -> None:
    """Both mechanisms of a release share one noise multiplier s, so the release is sqrt(2) / s-GDP; s is the
    smallest for which that is (epsilon, delta)-DP: the Gaussian mechanism's closed form (Balle & Wang 2018,
    Theorem 8), written out here with scipy, gives delta at epsilon."""
    for epsilon in (0.1, 0.5, 1.0, 10.0, 50.0):
        mu = math.sqrt(2) / gaussian_sigma(epsilon, 1e-5, 1.0)
        delta = stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2)
        assert delta == pytest.approx(1e-5, rel=1e-6)
    assert gaussian_sigma(0.5, 1e-5, 2.0) == 2 * gaussian_sigma(0.5, 1e-5, 1.0)  # linear in the sensitivity
    with pytest.raises(ValueError):
        gaussian_sigma(0.0, 1e-5, 1.0)


def test_noise_scale_matches_the_formula() -> None:
    z, y = unit_projections()
    clip = 0.5  # unit rows clipped to 0.5: the sums' sensitivity is 0.5, the counts' 1
    true_sums = torch.stack([clip * z[y == c].sum(0) for c in (0, 1)]).double()
    true_counts = torch.tensor([20.0, 20.0], dtype=torch.float64)
    sigma, sigma_count = gaussian_sigma(1.0, 1e-5, clip), gaussian_sigma(1.0, 1e-5, 1.0)
    assert sigma == pytest.approx(clip * sigma_count)
    g = torch.Generator().manual_seed(1)
    draws = [noisy_class_sums(z, y, clip, sigma, sigma_count, g) for _ in range(1000)]
    sum_noise = torch.stack([s for s, _ in draws]) - true_sums  # (1000, 2, 128): 256000 samples
    count_noise = torch.stack([c for _, c in draws]) - true_counts  # 2000 samples
    assert sum_noise.std().item() == pytest.approx(sigma, rel=0.01)
    assert abs(sum_noise.mean().item()) < 4 * sigma / math.sqrt(sum_noise.numel())
    assert count_noise.std().item() == pytest.approx(sigma_count, rel=0.06)


def test_private_prototypes_use_the_calibrated_noise() -> None:
    z, y = unit_projections()
    eps, delta, clip = 0.7, 1e-6, 0.5
    vectors, labels, counts = private_prototypes(z, y, eps, delta, torch.Generator().manual_seed(3), clip)
    sums, noisy_counts = noisy_class_sums(z, y, clip, gaussian_sigma(eps, delta, clip), gaussian_sigma(eps, delta, 1),
                                          torch.Generator().manual_seed(3))
    assert torch.allclose(vectors, F.normalize(sums, dim=1).float()) and labels.tolist() == [0, 1]
    assert counts.dtype == torch.int64 and torch.equal(counts, noisy_counts.round().clamp(min=1).long())
    assert torch.allclose(vectors.norm(dim=1), torch.ones(2))
    # a class with fewer images than min_count is withheld; the others' noisy counts never fall below it
    vectors, labels, counts = private_prototypes(z, y, eps, delta, torch.Generator().manual_seed(3), clip,
                                                 min_count=21)
    assert len(vectors) == 0 and len(labels) == 0 and len(counts) == 0
    few = torch.cat([y[y == 0], y[y == 1][:5]]), torch.cat([z[y == 0], z[y == 1][:5]])
    vectors, labels, counts = private_prototypes(few[1], few[0], eps, delta, torch.Generator().manual_seed(3), clip,
                                                 min_count=10)
    assert labels.tolist() == [0] and int(counts[0]) >= 10


def test_each_image_contributes_at_most_clip() -> None:
    z, y = unit_projections()
    clipped = clip_rows(3.0 * z, 0.25)
    assert torch.allclose(clipped.norm(dim=1), torch.full((len(z),), 0.25))
    short = 0.1 * z
    assert torch.equal(clip_rows(short, 0.25), short)  # rows within the bound are left alone
    sums, counts = noisy_class_sums(3.0 * z, y, 0.25, 0.0, 0.0, torch.Generator())
    assert torch.allclose(sums[1], 0.25 * z[y == 1].double().sum(0)) and counts.tolist() == [20.0, 20.0]


def gdp_epsilon(mu: float, delta: float) -> float:
    """Closed form: the epsilon at ``delta`` of a mu-GDP mechanism (Dong, Roth & Su 2022), which is exactly what a
    composition of Gaussian mechanisms with noise multipliers s_i is, with mu = sqrt(sum 1 / s_i^2)."""
    def gap(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta
    return optimize.brentq(gap, 0.0, 100.0)


@pytest.mark.parametrize("epsilon, rounds", [(1.0, 6), (0.5, 20), (4.0, 3)])
def test_accounting_matches_the_closed_form_of_composed_gaussians(epsilon: float, rounds: int) -> None:
    delta = 1e-5
    report = privacy_report(epsilon, delta, 1.0, rounds)
    sigma = gaussian_sigma(epsilon, delta, 1.0)  # both releases of a round, sensitivity 1 (clip 1)
    mu = math.sqrt(2 * rounds) / sigma
    assert report["total"]["epsilon"] == pytest.approx(gdp_epsilon(mu, delta), rel=0.01)
    assert report["per-release"]["epsilon"] == pytest.approx(gdp_epsilon(math.sqrt(2) / sigma, delta), rel=0.01)
    # the clip rescales the noise, not the guarantee
    assert privacy_report(epsilon, delta, 2.0, rounds)["total"]["epsilon"] == pytest.approx(
        report["total"]["epsilon"], rel=1e-9)


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 1.0, 4.0, 10.0, 50.0])
def test_a_release_spends_at_most_its_epsilon(epsilon: float) -> None:
    """dp-epsilon is the epsilon of one release (class sums and counts together, at dp-delta): the reported
    per-release epsilon never exceeds it and is tight (no more noise than needed), and Google's PLD accountant, an
    independent upper bound, finds the same for the noise the release adds."""
    delta = 1e-5
    report = privacy_report(epsilon, delta, 1.0, 1)
    assert report["per-release"]["epsilon"] <= epsilon and report["total"]["epsilon"] <= epsilon
    assert report["per-release"]["epsilon"] == pytest.approx(epsilon, rel=1e-6)
    accountant = pld.PLDAccountant(value_discretization_interval=1e-3 * epsilon)
    accountant.compose(dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(report["sigma-sum"]),
                                                 dp_event.GaussianDpEvent(report["sigma-count"])]))
    assert accountant.get_epsilon(delta) == pytest.approx(epsilon, rel=0.01)


def test_the_ledger_counts_each_distinct_release(tmp_path: Path) -> None:
    """The same release asked again (a resume repeats its noise exactly) counts once; a release of the same run and
    round with any other input (here another epsilon) is a release of its own and counts."""
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    settings = {"dp-epsilon": 1.0, "dp-delta": 1e-5, "dp-clip": 1.0}
    for run in ("run-a", "run-b"):
        for rnd in (1, 2, 3):
            ledger.record(ledger.release(run, rnd, 1.0, 1e-5, release_digest("w", settings)))
    ledger.record(ledger.release("run-a", 2, 1.0, 1e-5, release_digest("w", settings)))  # the same, after a resume
    again = PrivacyLedger(tmp_path / "ledger.json")
    assert len(again.releases) == 6
    assert again.epsilon(1e-5) == pytest.approx(privacy_report(1.0, 1e-5, 1.0, 6)["total"]["epsilon"], rel=1e-9)
    # the round released again at another epsilon: a seventh release, and its noise is drawn afresh
    other = {**settings, "dp-epsilon": 0.5}
    again.record(again.release("run-a", 2, 0.5, 1e-5, release_digest("w", other)))
    assert len(PrivacyLedger(tmp_path / "ledger.json").releases) == 7
    assert again.epsilon(1e-5) > privacy_report(1.0, 1e-5, 1.0, 6)["total"]["epsilon"]
    # planned releases count only for rounds without a recorded release
    assert again.epsilon(1e-5, again.planned("run-a", 3, 1.0, 1e-5)) == again.epsilon(1e-5)
    assert again.epsilon(1e-5, again.planned("run-c", 1, 1.0, 1e-5)) > again.epsilon(1e-5)


def test_the_ledger_counts_entries_of_the_classic_calibration_at_their_cost(tmp_path: Path) -> None:
    """A ledger written before the exact calibration (entries without gdp-mu) keeps counting those releases at the
    noise they had: the classic multiplier sqrt(2 ln(1.25 / delta)) / epsilon for each of the two mechanisms."""
    file = tmp_path / "ledger.json"
    file.write_text(json.dumps({"releases": {"old|1|d": {"dp-epsilon": 1.0, "dp-delta": 1e-5}}}))
    classic = math.sqrt(2 * math.log(1.25 / 1e-5)) / 1.0
    assert PrivacyLedger(file).epsilon(1e-5) == pytest.approx(gdp_epsilon(math.sqrt(2) / classic, 1e-5), rel=1e-6)
    assert PrivacyLedger(file).epsilon(1e-5) > 1.0  # the classic pair spent more than its nominal epsilon


def test_the_noise_depends_on_everything_released() -> None:
    """Releases of one round that differ in any input draw independent noise, so that several releases at
    different settings cannot be combined to cancel the noise (the same release repeats its noise exactly)."""
    settings = {"dp-epsilon": 1.0, "dp-delta": 1e-5, "dp-clip": 1.0, "min-prototype-images": 10}
    base = release_digest("w" * 64, settings)

    def draw(secret: bytes = b"s" * 32, release: str = base) -> torch.Tensor:
        return torch.randn(64, generator=noise_generator(secret, "run", 1, release), dtype=torch.float64)

    assert torch.equal(draw(), draw())
    others = [release_digest("w" * 64, {**settings, "dp-epsilon": 2.0}),
              release_digest("w" * 64, {**settings, "dp-clip": 0.5}),
              release_digest("w" * 64, {**settings, "dp-delta": 1e-6}),
              release_digest("w" * 64, {**settings, "min-prototype-images": 11}),
              release_digest("v" * 64, settings)]
    assert len({base, *others}) == 6
    for release in others:
        assert abs(float(torch.corrcoef(torch.stack([draw(), draw(release=release)]))[0, 1])) < 0.5


def test_a_site_refuses_a_run_beyond_its_privacy_budget(tmp_path: Path) -> None:
    one, two = (privacy_report(0.5, 1e-5, 1.0, k)["total"]["epsilon"] for k in (1, 2))
    budget = (one + two) / 2  # room for one release, not two
    run_federation(tmp_path, node_config={"dp-budget": str(budget)}, overrides="dp-epsilon=0.5",
                   **{"num-server-rounds": 1})
    assert (run_dir(tmp_path) / "final_metrics.json").is_file()
    with pytest.raises(NotEnoughSites):  # a second run would exceed the budget: refused before any release
        run_federation(tmp_path, node_config={"dp-budget": str(budget)}, overrides="dp-epsilon=0.5", run_id=7,
                       **{"num-server-rounds": 1})
    for site in ("site_a_sarscov2", "site_b_covidct"):
        assert len(PrivacyLedger(tmp_path / f".privacy-ledger-{site}.json").releases) == 1


def test_config_keys() -> None:
    config = load_config("configs/smoke.yaml")
    assert config.dp_epsilon == 0.0  # off by default
    with pytest.raises(ConfigError, match="dp-epsilon"):
        load_config("configs/smoke.yaml", {"dp-epsilon": "-1"})
    with pytest.raises(ConfigError, match="dp-delta"):
        load_config("configs/smoke.yaml", {"dp-epsilon": "1", "dp-delta": "0"})
    with pytest.raises(ConfigError, match="fedbn-proto"):
        load_config("configs/smoke.yaml", {"dp-epsilon": "1", "method": "fedbn"})


def test_epsilon_zero_means_no_noise() -> None:
    """dp-epsilon 0 (the default): a site's prototypes are reproducible and carry the true class counts."""
    grid, output = shared_run("fedbn-proto")
    d = grid.delivery(1, 2, "evaluate")  # the summary that computes the round's prototypes
    again = grid.replay(d)
    for key in (R.P_VECTORS, R.P_COUNTS):
        assert np.array_equal(again.content[R.PROTOTYPES][key].numpy(), d.reply.content[R.PROTOTYPES][key].numpy())
    summarised = grid.delivery(1, 2).reply.content[R.METRICS][R.NUM_EXAMPLES]  # every training image (smoke)
    assert int(d.reply.content[R.PROTOTYPES][R.P_COUNTS].numpy().sum()) == summarised
    assert not (run_dir(output) / "privacy.json").exists()


def test_federated_round_with_dp(tmp_path: Path) -> None:
    grid = run_federation(tmp_path, method="fedbn-proto", overrides="dp-epsilon=0.5 dp-delta=1e-5",
                          **{"num-server-rounds": 1})
    report = json.loads((run_dir(tmp_path) / "privacy.json").read_text())
    assert report == json.loads(json.dumps(privacy_report(0.5, 1e-5, 1.0, releases=1)))
    assert grid.banks[1].sites.tolist() == [0, 0, 1, 1]  # the server accepted both sites' noisy prototypes
    d = grid.delivery(0, 1, "evaluate")
    secret = tmp_path / ".noise-secret-site_a_sarscov2"
    assert secret.is_file() and len(secret.read_bytes()) == 32 and secret.stat().st_mode & 0o077 == 0
    # the noise is a function of the site's secret, the run and the round, not of the seed the server knows:
    # another run name (a replay of the same summary) draws other noise from the same network ...
    again = grid.replay(d)
    first = torch.from_numpy(d.reply.content[R.PROTOTYPES][R.P_VECTORS].numpy())
    second = torch.from_numpy(again.content[R.PROTOTYPES][R.P_VECTORS].numpy())
    assert not torch.equal(first, second) and torch.allclose(first.norm(dim=1), torch.ones(2))
    # ... and another secret other noise again, while the same secret, run and round repeat it exactly
    assert torch.equal(torch.randn(5, generator=noise_generator(b"s" * 32, "r", 1, "x")),
                       torch.randn(5, generator=noise_generator(b"s" * 32, "r", 1, "x")))
    assert not torch.equal(torch.randn(5, generator=noise_generator(b"s" * 32, "r", 1, "x")),
                           torch.randn(5, generator=noise_generator(b"t" * 32, "r", 1, "x")))


def test_prototypes_are_released_on_the_schedule_only(tmp_path: Path) -> None:
    """prototype-every 2 over 3 rounds: the summaries of rounds 1 and 3 carry prototypes (the bank of round 1 is
    sent again in round 2), the sites count two DP releases, each over every training image."""
    grid = run_federation(tmp_path, method="fedbn-proto", overrides="dp-epsilon=50 prototype-every=2 summary-images=4 eval-every=1",
                          **{"num-server-rounds": 3})
    for rnd, due in ((1, True), (2, False), (3, True), (4, False)):  # 4: the final summary
        for site in (0, 1):
            d = grid.delivery(site, rnd, "evaluate")
            assert d.message.content[R.CONFIG][R.PROTOTYPES_DUE] is due
            assert (R.PROTOTYPES in d.reply.content) is due, (rnd, site)
    assert torch.equal(grid.banks[2].vectors, grid.banks[1].vectors)
    assert not torch.equal(grid.banks[3].vectors, grid.banks[1].vectors)
    # with DP the (noisy) counts are over the whole training split, not over the 4 images of summary-images
    counts = grid.delivery(0, 1, "evaluate").reply.content[R.PROTOTYPES][R.P_COUNTS].numpy()
    assert counts.sum() > 6  # 9 training images in the smoke site; sigma of a count at epsilon 50: about 0.1
    for site in ("site_a_sarscov2", "site_b_covidct"):
        releases = PrivacyLedger(tmp_path / f".privacy-ledger-{site}.json").releases
        assert sorted(int(k.split("|")[1]) for k in releases) == [1, 3], releases
    assert json.loads((run_dir(tmp_path) / "privacy.json").read_text())["releases"] == 2
    # a server asking for prototypes off the schedule gets nothing
    d = grid.delivery(0, 2, "evaluate")
    content = wire(d.message).content
    content[R.CONFIG][R.PROTOTYPES_DUE] = True
    reply = grid.replay(d, content)
    assert reply.has_error() and not reply.has_content()
