"""Seeds: the centralized driver and a federation of the same seed and config start from the same weights, site by
site, per-site modules (BN, adapters, MS-Net's auxiliary branches) included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl_covid import centralized
from fl_covid.config import load_config
from fl_covid.data import load_configured_site
from fl_covid.federated import SiteRunner, initial_shared
from fl_covid.model import COVIDNet, one_site_state

# each centralized method and the federated method with the same network
COUNTERPARTS = {"single": "fedbn", "joint": "fedavg", "sepnorm": "fedbn", "contrastive": "fedbn-proto",
                "series-adapter": "fedbn-series-adapter", "parallel-adapter": "fedbn-parallel-adapter",
                "ms-net": "fedbn-ms-net"}


class _Started(Exception):
    """Raised by the stand-in optimizer factory once it has seen the centralized model, to stop the run."""


def _centralized_initial_model(method: str, output_dir: Path, monkeypatch: pytest.MonkeyPatch) -> COVIDNet:
    """The model the centralized driver builds for ``method`` (its first, for ``single``), before any step."""
    seen: list[COVIDNet] = []

    def make_optimizer(model: COVIDNet, lr: float) -> torch.optim.Optimizer:
        seen.append(model)
        raise _Started

    monkeypatch.setattr(centralized, "make_optimizer", make_optimizer)
    config = load_config("configs/smoke.yaml", {"output-dir": str(output_dir)})
    with pytest.raises(_Started):
        centralized.run_central(config, method, show_progress=False)
    return seen[0]


@pytest.mark.parametrize("method", COUNTERPARTS)
def test_centralized_and_federated_runs_start_from_the_same_weights(method: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    central = _centralized_initial_model(method, tmp_path, monkeypatch)
    config = load_config("configs/smoke.yaml", {"method": COUNTERPARTS[method], "output-dir": str(tmp_path)})
    shared, _ = initial_shared(config)
    for site in range(central.num_sites):
        runner = SiteRunner(config, site, *load_configured_site(config, site), torch.device("cpu"))
        federated = runner.model.state_dict()
        assert all(torch.equal(federated[k], v) for k, v in shared.items())  # the server's weights are the site's
        started = one_site_state(central, site)
        assert started.keys() == federated.keys()
        differ = [k for k in federated if not torch.equal(started[k], federated[k])]
        assert not differ, f"site {site} of {method} starts elsewhere than in {COUNTERPARTS[method]}: {differ}"
