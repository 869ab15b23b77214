"""What one site does in a federated round, free of Flower: FedAvg, FedBN and FedBN + prototype contrastive.

Shared weights are every tensor except BatchNorm's (all tensors under FedAvg). A site's BN parameters and
statistics, its optimizer state and the round it last completed stay with the site (``LocalState``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_covid.checkpoint import StateStore, optimizer_from_tensors, optimizer_to_tensors, tensor_digest
from fl_covid.config import Config
from fl_covid.data import IndexStream, Site, Split
from fl_covid.engine import Chunk, evaluate, make_optimizer, predict, set_lr, train_steps
from fl_covid.metrics import roc_on_grid
from fl_covid.model import COVIDNet, bn_keys, create_model, load_partial
from fl_covid.observe import emit
from fl_covid.privacy import private_prototypes
from fl_covid.prototypes import PrototypeBank, class_prototypes

log = logging.getLogger(__name__)


@dataclass
class LocalState:
    """What never leaves a site: BN tensors, optimizer state and the last completed round."""

    bn: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    round: int = 0

    def save(self, folder: Path, **meta: Any) -> None:
        """Persist atomically (with extra JSON ``meta``) so that a restarted site resumes with its own BN."""
        StateStore(folder).save({"bn": self.bn, "optimizer": self.optimizer}, {"round": self.round, **meta})

    @staticmethod
    def load(folder: Path, max_round: int | None = None) -> "LocalState | None":
        """The newest saved state, or the newest of a round <= ``max_round``: a site asked to train round r
        after the server resumed from an earlier checkpoint must not start from its own aborted round r."""
        loaded = StateStore(folder).load(("bn", "optimizer"), max_round)
        if loaded is None:
            return None
        tensors, meta = loaded
        return LocalState(tensors.get("bn", {}), tensors.get("optimizer", {}), int(meta["round"]))

    def provenance(self) -> dict[str, Any]:
        """What a round started from, for the site's records: the round and a digest of the BN tensors."""
        return {"round": self.round, "bn-sha256": tensor_digest(self.bn)}


def shared_keys(model: COVIDNet, config: Config) -> list[str]:
    """Names of the tensors a site sends and receives, in state-dict order: every float tensor but BN's (BN's too
    when the method shares BN, FedAvg). BN's integer step counters never travel."""
    local = set() if config.spec.shares_bn else bn_keys(model)
    return [k for k, v in model.state_dict().items() if k not in local and v.is_floating_point()]


def initial_shared(config: Config) -> tuple[dict[str, torch.Tensor], int]:
    """The server's starting weights (seeded: the same subset the sites exchange) and the projection's width."""
    torch.manual_seed(config.seed)
    model = create_model(config.arch, config.width, 1, image_size=config.image_size)
    state = model.state_dict()
    return {k: state[k] for k in shared_keys(model, config)}, model.proj_dim


class SiteRunner:
    """One site's model, data and local state handling for a round of training or evaluation."""

    def __init__(self, config: Config, site_id: int, site: Site, split: Split, device: torch.device) -> None:
        self.config, self.site_id, self.site, self.split, self.device = config, site_id, site, split, device
        self.model = create_model(config.arch, config.width, 1, image_size=config.image_size)
        self.keys = shared_keys(self.model, config)
        self.local_keys = set(self.model.state_dict()) - set(self.keys)
        state = self.model.state_dict()
        self.layout = tuple((k, tuple(state[k].shape)) for k in self.keys)  # transfer order of the shared weights

    def _load(self, shared: dict[str, torch.Tensor], local: LocalState | None) -> None:
        """Shared weights from the server; this site's own BN when it has one (FedBN)."""
        if list(shared) != self.keys:
            raise ValueError(f"site '{self.site.name}': received {len(shared)} shared tensors, expected "
                             f"{len(self.keys)} for method {self.config.method}")
        tensors = dict(shared)
        if local is not None and local.bn and not self.config.spec.shares_bn:
            tensors.update(local.bn)
        load_partial(self.model, tensors, self.local_keys - set(tensors))
        emit("loaded", site=self.site_id, model=self.model)

    def train(self, shared: dict[str, torch.Tensor], local: LocalState | None, lr: float, server_round: int,
              bank: PrototypeBank | None, noise: torch.Generator | None = None
              ) -> tuple[dict[str, torch.Tensor], PrototypeBank | None, dict[str, float], LocalState]:
        """One round: returns (shared weights, this site's prototypes or None, metrics, new local state).
        ``noise``: the generator of the prototypes' DP noise (needed when dp-epsilon > 0)."""
        started = time.perf_counter()
        cfg = self.config
        self._load(shared, local)
        optimizer = make_optimizer(self.model, lr)
        if local is not None and local.optimizer:
            optimizer_from_tensors(optimizer, local.optimizer)
        set_lr(optimizer, lr)
        seed = cfg.seed * 1_000_003 + self.site_id * 10_007 + server_round
        stream = IndexStream(self.split.train, torch.Generator().manual_seed(seed))
        images, labels = self.site.images, self.site.labels

        def next_batch() -> list[Chunk]:
            idx = stream.next(cfg.batch_size)
            return [Chunk(0, images[idx], labels[idx])]

        spec = cfg.spec
        candidates = bank.candidates_for(self.site_id) if (spec.prototypes and bank is not None) else None
        stats = train_steps(
            self.model, optimizer, next_batch, cfg.local_steps, image_size=cfg.image_size,
            generator=torch.Generator().manual_seed(seed + 1), alpha=cfg.alpha if spec.contrastive else 0.0,
            temperature=cfg.temperature, candidates=candidates, grad_clip=cfg.grad_clip, device=self.device,
        )
        prototypes = None
        if spec.prototypes:
            _, z = predict(self.model, images[self.split.train], 0, cfg.image_size, device=self.device,
                           with_projections=True)
            train_labels = labels[self.split.train]
            prototypes = PrototypeBank.of_site(self.site_id, *(
                private_prototypes(z, train_labels, cfg.dp_epsilon, cfg.dp_delta, noise, cfg.dp_clip,
                                   cfg.min_prototype_images) if cfg.dp_epsilon > 0 else
                class_prototypes(z, train_labels, per_class=cfg.prototypes_per_class,
                                 min_count=cfg.min_prototype_images, seed=seed)))
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        new_local = LocalState({k: state[k] for k in sorted(self.local_keys)}, optimizer_to_tensors(optimizer),
                               server_round)
        stats["seconds"] = time.perf_counter() - started
        return {k: state[k] for k in self.keys}, prototypes, stats, new_local

    def evaluate(self, shared: dict[str, torch.Tensor], local: LocalState | None
                 ) -> tuple[dict[str, float], list[float], np.ndarray]:
        """Global shared weights + this site's BN on its test fold: metrics, ROC TPR on the grid, probabilities."""
        self._load(shared, local)
        test = self.split.test
        metrics, probs = evaluate(self.model, self.site.images[test], self.site.labels[test], 0,
                                  self.config.image_size, self.device)
        return metrics, roc_on_grid(self.site.labels[test].numpy(), probs), probs
