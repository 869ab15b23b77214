"""A finished run directory as reusable models: its config and each training site's complete model.

Every run writes ``RUN/site-<name>/model/`` (fl_covid.site_model) for each training site: the federated sites
after the last round (in a simulation, where the run directory is also the sites' state folder; in a deployment
the models stay at the hospitals), ``fl-covid-central`` for every site. The shared weights are the same in every
site's model except under ``single``, where each site has a model of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fl_covid.checkpoint import SITE_MODEL, site_folder
from fl_covid.config import Config, load_config
from fl_covid.model import COVIDNet, bn_keys, load_partial
from fl_covid.reporting import CONFIG_JSON
from fl_covid.site_model import SiteModel, load_site_model


def site_model_dir(run_dir: Path, site: str) -> Path:
    """Folder of one site's final model inside a run directory."""
    return site_folder(Path(run_dir).parent, Path(run_dir).name, site) / SITE_MODEL


@dataclass(frozen=True)
class TrainedRun:
    """What a run directory holds for reuse: its config and the final model of every training site."""

    dir: Path
    config: Config
    method: str

    @staticmethod
    def load(run_dir: str | Path) -> TrainedRun:
        run_dir = Path(run_dir).expanduser().resolve()
        file = run_dir / CONFIG_JSON
        if not file.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_JSON}); pass the folder that "
                                    "fl-covid-central or the federated server wrote")
        config = load_config(None, json.loads(file.read_text()))
        return TrainedRun(run_dir, config, config.method)

    def site_model(self, site: str) -> SiteModel:
        if site not in self.config.sites:
            raise ValueError(f"site {site!r} did not train in run {self.dir}; its sites are {list(self.config.sites)}")
        return load_site_model(site_model_dir(self.dir, site))

    def site_bn(self, site: str) -> dict[str, torch.Tensor]:
        """A training site's BN tensors (parameters and statistics)."""
        model = self.site_model(site).model
        keys = bn_keys(model)
        return {k: v for k, v in model.state_dict().items() if k in keys}

    def model(self, bn: dict[str, torch.Tensor], site: str | None = None) -> COVIDNet:
        """One-site model with the final weights of ``site``'s model (any training site's when the shared weights
        are common to all) and the given BN."""
        if site is None:
            if not self.config.spec.pooled and not self.config.spec.federated and len(self.config.sites) > 1:
                raise ValueError(f"run {self.dir} trained one model per site (method {self.method}); train on the "
                                 "one site only (sites=[NAME]) to evaluate it elsewhere")
            site = self.config.sites[0]
        model = self.site_model(site).model
        load_partial(model, {**model.state_dict(), **bn}, set())
        return model.eval()
