"""A finished run directory as a reusable model: its config, final shared weights and each site's BatchNorm.

Layout, written by the federated server and sites (simulation) and by ``fl-covid-central``::

    RUN/config.json                 resolved config of the run
    RUN/checkpoint/shared.npz       final shared weights: every tensor under fedavg, all but BN otherwise
    RUN/site-<name>/state/bn.npz    the site's BN parameters and statistics (only step counters under fedavg)
    RUN/site-<name>/state/shared.npz  centralized ``single`` over several sites only: that site's own model

Tensor names are those of a one-site model (``create_model(..., num_sites=1)``); a centralized model with
per-site BN is stored the same way, BN index j becoming site j's ``bn.npz``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fl_covid.checkpoint import SITE_STATE, StateStore, load_tensors, site_folder
from fl_covid.config import Config, load_config
from fl_covid.model import COVIDNet, SiteBatchNorm, bn_keys, create_model, load_partial
from fl_covid.reporting import CONFIG_JSON

CHECKPOINT_DIR = "checkpoint"
SHARED_FILE = "shared.npz"
BN_FILE = "bn.npz"


def site_dir(run_dir: Path, site: str) -> Path:
    """Folder of one site's training state inside a run directory."""
    return site_folder(Path(run_dir).parent, Path(run_dir).name, site) / SITE_STATE


def site_bn_state(model: COVIDNet, index: int) -> dict[str, torch.Tensor]:
    """BN tensors of BN index ``index`` under the names of a one-site model (``...bns.0.<name>``)."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, SiteBatchNorm):
            for name, t in module.bns[index].state_dict().items():
                out[f"{prefix}.bns.0.{name}"] = t.detach().cpu().clone()
    return out


def save_central_model(run_dir: Path, model: COVIDNet, site_names: list[str], per_site_bn: bool,
                       own_model: bool, meta: dict) -> None:
    """Store a centrally trained ``model`` in the federated layout.

    ``per_site_bn``: BN index j belongs to ``site_names[j]`` (SepNorm, contrastive); else every site gets BN 0.
    ``own_model``: the model belongs to these sites only (``single`` with several sites), so its non-BN weights
    go to ``site-<name>/shared.npz`` instead of ``checkpoint/shared.npz``.
    """
    bn = bn_keys(model)
    shared = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in bn}
    if not own_model:
        StateStore(Path(run_dir) / CHECKPOINT_DIR).save({"shared": shared}, meta)
    for j, name in enumerate(site_names):
        groups = {"bn": site_bn_state(model, j if per_site_bn else 0)}
        if own_model:
            groups["shared"] = shared
        StateStore(site_dir(run_dir, name)).save(groups, meta)


@dataclass(frozen=True)
class TrainedRun:
    """What a run directory holds for reuse: config, final shared weights and each training site's BN."""

    dir: Path
    config: Config
    method: str

    @staticmethod
    def load(run_dir: str | Path) -> "TrainedRun":
        run_dir = Path(run_dir).expanduser().resolve()
        file = run_dir / CONFIG_JSON
        if not file.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_JSON}); pass the folder that "
                                    "fl-covid-central or the federated server wrote")
        config = load_config(None, json.loads(file.read_text()))
        return TrainedRun(run_dir, config, config.method)

    def _npz(self, path: Path, what: str) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise FileNotFoundError(f"run {self.dir}: no {what} at {path} (runs written before checkpoints were "
                                    "kept cannot be reused; train again)")
        return load_tensors(path)

    def shared(self, site: str | None = None) -> dict[str, torch.Tensor]:
        """Final shared weights: the site's own model if it has one (centralized ``single``), else the global."""
        if site is not None and (own := site_dir(self.dir, site) / SHARED_FILE).is_file():
            return load_tensors(own)
        if site is None and not (self.dir / CHECKPOINT_DIR / SHARED_FILE).is_file() and any(
                (site_dir(self.dir, s) / SHARED_FILE).is_file() for s in self.config.sites):
            raise ValueError(f"run {self.dir} trained one model per site (method {self.method}); train on the one "
                             "site only (sites=[NAME]) to evaluate it elsewhere")
        return self._npz(self.dir / CHECKPOINT_DIR / SHARED_FILE, "final shared weights")

    def site_bn(self, site: str) -> dict[str, torch.Tensor]:
        """A training site's BN tensors; under fedavg (BN shared) the BN part of the shared weights."""
        if site not in self.config.sites:
            raise ValueError(f"site {site!r} did not train in run {self.dir}; its sites are {list(self.config.sites)}")
        keys = bn_keys(self.new_model())
        bn = self._npz(site_dir(self.dir, site) / BN_FILE, f"BN state of site '{site}'")
        if self.config.spec.shares_bn:  # FedAvg: BN travelled with the shared weights
            bn.update({k: v for k, v in self.shared(site).items() if k in keys})
        return bn

    def new_model(self) -> COVIDNet:
        """An untrained one-site model of this run's architecture."""
        c = self.config
        return create_model(c.arch, c.width, 1, image_size=c.image_size)

    def model(self, bn: dict[str, torch.Tensor], site: str | None = None) -> COVIDNet:
        """One-site model with the final shared weights (``site``'s own under ``single``) and the given BN."""
        model = self.new_model()
        keys = bn_keys(model)
        tensors = {k: v for k, v in self.shared(site).items() if k not in keys}
        tensors.update(bn)
        load_partial(model, tensors, set())
        return model.eval()
