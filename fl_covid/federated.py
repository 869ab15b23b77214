"""What one site does in a federated round, free of Flower.

A round has two steps at a site. At its start the site receives the global weights and *summarises* them: loads
them with its own BN, re-estimates its BN statistics under them (``bn-recalibration``), evaluates them on its
validation split and test fold when an evaluation is due, and computes its prototypes in that network, so the
prototype bank of a round lives in the network every site starts the round from. Then it *trains* from them.
Shared weights are every float tensor except the site-specific ones (``local_keys``: BatchNorm's, and the
adapters' and auxiliary branches' of the methods that have them); FedAvg shares BN too. A site's BN parameters and
statistics, adapters, auxiliary branch, optimizer state and the round it last completed stay with the site
(``LocalState``; its ``bn`` holds every site-specific tensor).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_covid.algorithms import Payload, algorithm_for
from fl_covid.checkpoint import (
    PREDICTIONS_CSV,
    RECEIVED,
    SITE_MODEL,
    SITE_STATE,
    VAL_PREDICTIONS_CSV,
    StateStore,
    optimizer_from_tensors,
    optimizer_to_tensors,
    tensor_digest,
)
from fl_covid.config import Config
from fl_covid.data import IndexStream, Site, Split, random_crops
from fl_covid.engine import Chunk, evaluate, make_optimizer, predict, recalibrate_bn, set_lr, train_steps
from fl_covid.layout import flatten, layout_size, unflatten
from fl_covid.metrics import operating_point, roc_on_grid
from fl_covid.model import COVIDNet, bn_keys, initial_model, load_partial, local_keys
from fl_covid.objective import build_objective
from fl_covid.observe import emit
from fl_covid.privacy import private_prototypes
from fl_covid.prototypes import PrototypeBank, class_prototypes
from fl_covid.reporting import write_predictions
from fl_covid.seeding import derive
from fl_covid.shift import shift_profile
from fl_covid.site_model import model_card, save_site_model
from fl_covid.transport import Transfer, site_reply, weights_digest

log = logging.getLogger(__name__)


@dataclass
class LocalState:
    """What never leaves a site: BN tensors, optimizer state and the last completed round."""

    bn: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    round: int = 0
    residual: np.ndarray | None = None  # compression=int8: the quantisation error carried into the next reply
    algorithm: dict[str, torch.Tensor] = field(default_factory=dict)  # what the method's algorithm keeps here

    def save(self, folder: Path, **meta: Any) -> None:
        """Persist atomically (with extra JSON ``meta``) so that a restarted site resumes with its own BN."""
        groups = {"bn": self.bn, "optimizer": self.optimizer}
        if self.algorithm:
            groups["algorithm"] = self.algorithm
        if self.residual is not None:
            groups["residual"] = {"flat": torch.from_numpy(np.asarray(self.residual, dtype=np.float32))}
        StateStore(folder).save(groups, {"round": self.round, **meta})

    @staticmethod
    def load(folder: Path, max_round: int | None = None) -> LocalState | None:
        """The newest saved state, or the newest of a round <= ``max_round``: a site asked to train round r
        after the server resumed from an earlier checkpoint must not start from its own aborted round r."""
        loaded = StateStore(folder).load(("bn", "optimizer", "residual", "algorithm"), max_round)
        if loaded is None:
            return None
        tensors, meta = loaded
        residual = tensors["residual"]["flat"].numpy() if "residual" in tensors else None
        return LocalState(tensors.get("bn", {}), tensors.get("optimizer", {}), int(meta["round"]), residual,
                          tensors.get("algorithm", {}))

    def provenance(self) -> dict[str, Any]:
        """What a round started from, for the site's records: the round and a digest of the BN tensors."""
        return {"round": self.round, "bn-sha256": tensor_digest(self.bn)}


@dataclass
class Received:
    """The weights of a round's summary message as the site holds them (flat float32) and the BN state to train
    them with, kept between the summary and the train message of the round (which names them by digest)."""

    flat: np.ndarray
    bn: dict[str, torch.Tensor]
    round: int

    def save(self, folder: Path) -> None:
        StateStore(folder).save({"weights": {"flat": torch.from_numpy(self.flat)}, "bn": self.bn},
                                {"round": self.round})

    @staticmethod
    def load(folder: Path) -> Received | None:
        loaded = StateStore(folder).load(("weights", "bn"))
        if loaded is None:
            return None
        tensors, meta = loaded
        return Received(tensors["weights"]["flat"].numpy(), tensors.get("bn", {}), int(meta["round"]))

    @staticmethod
    def of_round(folder: Path, server_round: int, digest: object) -> Received:
        """The weights kept from the summary of ``server_round``, which the train message names by ``digest``;
        ValueError when the site holds no such weights."""
        received = Received.load(folder)
        if received is None or received.round != server_round or weights_digest(received.flat) != digest:
            raise ValueError(f"no weights of round {server_round} with the digest the server names")
        return received


def shared_keys(model: COVIDNet, config: Config) -> list[str]:
    """Names of the tensors a site sends and receives, in state-dict order: every float tensor but the
    site-specific ones (``local_keys``: BN, adapters, auxiliary branches, found by module type); BN's too when the
    method shares BN (FedAvg), adapters and auxiliary branches never. BN's integer step counters never travel."""
    local = local_keys(model)
    if config.spec.shares_bn:
        local -= bn_keys(model)
    return [k for k, v in model.state_dict().items() if k not in local and v.is_floating_point()]


def initial_shared(config: Config) -> tuple[dict[str, torch.Tensor], int]:
    """The server's starting weights (``initial_model``: the same subset the sites exchange) and the projection's
    width."""
    model = initial_model(config)
    state = model.state_dict()
    return {k: state[k] for k in shared_keys(model, config)}, model.proj_dim


@dataclass
class Summary:
    """What a site makes of the weights it received at the start of a round (before training on them).

    ``metrics``: test-fold metrics and the validation split's as ``val_<name>`` (None when no evaluation was
    due), in the final summary also the site's operating point as ``op_<name>`` (``operating_point``: the
    threshold chosen on the validation split, the test metrics at it; absent when the split lacks a class);
    ``roc_tpr`` / ``probs``: the test fold's ROC on the grid and per-image P(COVID), (n_test,);
    ``val_probs``: the validation split's per-image P(COVID), (n_val,); ``prototypes``: this
    site's prototypes in the received network (None when the method exchanges none); ``bn``: the BN state to
    train from (statistics re-estimated under the received weights with ``bn-recalibration``, else the site's).
    """

    metrics: dict[str, float] | None
    roc_tpr: list[float] | None
    probs: np.ndarray | None
    prototypes: PrototypeBank | None
    bn: dict[str, torch.Tensor]
    val_probs: np.ndarray | None = None


class SiteRunner:
    """One site's model, data and local state handling: the summary of received weights and a round of training."""

    def __init__(self, config: Config, site_id: int, site: Site, split: Split, device: torch.device) -> None:
        self.config, self.site_id, self.site, self.split, self.device = config, site_id, site, split, device
        self.model = initial_model(config)  # site-specific layers start seeded (``init``), as the shared ones
        self.keys = shared_keys(self.model, config)
        self.local_keys = set(self.model.state_dict()) - set(self.keys)
        state = self.model.state_dict()
        self.layout = tuple((k, tuple(state[k].shape)) for k in self.keys)  # transfer order of the shared weights
        self.size = layout_size(self.layout)  # values in the flat shared weights
        self.algorithm = algorithm_for(config, self.size)
        self.initial_local = self._local_part()  # a site's first round starts from these (the runner is reused)

    def _load(self, shared: dict[str, torch.Tensor], bn: dict[str, torch.Tensor] | None) -> None:
        """Shared weights from the server; this site's own BN when it has one (FedBN), else the initial one.
        Every tensor of the model is set, so a runner reused for the next message keeps nothing of the last."""
        if list(shared) != self.keys:
            raise ValueError(f"site '{self.site.name}': received {len(shared)} shared tensors, expected "
                             f"{len(self.keys)} for method {self.config.method}")
        tensors = {**self.initial_local, **shared}
        if bn and not self.config.spec.shares_bn:
            tensors.update(bn)
        load_partial(self.model, tensors, self.local_keys - set(tensors))
        emit("loaded", site=self.site_id, model=self.model)

    def _local_part(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        return {k: state[k].detach().cpu().clone() for k in sorted(self.local_keys)}

    def summary_indices(self, server_round: int) -> np.ndarray:
        """The training images passed through the received model at the start of ``server_round``: a seeded
        random subset of ``summary-images`` (all of them when 0 or more than there are)."""
        train, n = self.split.train, self.config.summary_images
        if not n or n >= len(train):
            return train
        g = torch.Generator().manual_seed(derive(self.config.seed, "summary", self.site_id, server_round))
        return np.sort(train[torch.randperm(len(train), generator=g)[:n].numpy()])

    def summarise(self, shared: dict[str, torch.Tensor], local: LocalState | None, server_round: int,
                  evaluate_now: bool, prototypes_due: bool, noise: torch.Generator | None = None) -> Summary:
        """Load the received weights with this site's BN, re-estimate the BN statistics under them
        (``bn-recalibration``, on the ``summary-images`` subset, through the site's ``bn-transform``), evaluate on
        the validation split and the test fold (``evaluate_now``) and compute this site's prototypes
        (``prototypes_due``, methods that exchange them; through the same transform as the statistics).
        ``noise``: DP noise source (dp-epsilon > 0). With DP the prototypes summarise every training image: a subset
        drawn by position would change with any added or removed image, and the clipped class sums would lose their
        sensitivity bound."""
        cfg = self.config
        self._load(shared, local.bn if local is not None else None)
        images, labels = self.site.images, self.site.labels
        subset = self.summary_indices(server_round)
        training_transform = cfg.bn_transforms[self.site_id] == "train"
        if cfg.bn_recalibration and not cfg.spec.shares_bn:
            crops = (torch.Generator().manual_seed(derive(cfg.seed, "bn-crops", self.site_id, server_round))
                     if training_transform else None)
            recalibrate_bn(self.model, images[subset], cfg.image_size, device=self.device, crops=crops)
        metrics = roc = probs = val_probs = None
        if evaluate_now:
            val, val_probs = evaluate(self.model, images[self.split.val], labels[self.split.val], 0, cfg.image_size,
                              self.device)
            metrics, probs = evaluate(self.model, images[self.split.test], labels[self.split.test], 0,
                                      cfg.image_size, self.device)
            metrics.update({f"val_{k}": v for k, v in val.items() if k != "n"})
            roc = roc_on_grid(labels[self.split.test].numpy(), probs)
        prototypes = None
        if prototypes_due and cfg.spec.prototypes:
            members = self.split.train if cfg.dp_epsilon > 0 else subset
            seen = images[members]
            if training_transform:  # the same images as the statistics: training crops (resized to their size: as is)
                seen = random_crops(seen, cfg.image_size, torch.Generator().manual_seed(
                    derive(cfg.seed, "prototype-crops", self.site_id, server_round)))
            _, z = predict(self.model, seen, 0, cfg.image_size, device=self.device, with_projections=True)
            y = labels[members]
            prototypes = PrototypeBank.of_site(self.site_id, *(
                private_prototypes(z, y, cfg.dp_epsilon, cfg.dp_delta, noise, cfg.dp_clip, cfg.min_prototype_images)
                if cfg.dp_epsilon > 0 else
                class_prototypes(z, y, per_class=cfg.prototypes_per_class, min_count=cfg.min_prototype_images,
                                 seed=derive(cfg.seed, "prototypes", self.site_id, server_round))))
        return Summary(metrics, roc, probs, prototypes, self._local_part(), val_probs)

    def train(self, shared: dict[str, torch.Tensor], bn: dict[str, torch.Tensor] | None, local: LocalState | None,
              lr: float, server_round: int, bank: PrototypeBank | None, received: Payload | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, float], LocalState, Payload]:
        """One round of local training from the received weights with ``bn`` (the summary's BN, else the site's
        own) and what the method's algorithm received (``received``): returns (shared weights, metrics, new local
        state, what the algorithm sends back)."""
        started = time.perf_counter()
        cfg, spec, algorithm = self.config, self.config.spec, self.algorithm
        received = received or {}
        kept = local.algorithm if local is not None else {}
        self._load(shared, bn if bn is not None else (local.bn if local is not None else None))
        optimizer = make_optimizer(self.model, lr, algorithm.local_optimizer)
        if local is not None and local.optimizer and cfg.optimizer_state == "keep":
            optimizer_from_tensors(optimizer, local.optimizer)
        set_lr(optimizer, lr)
        stream = IndexStream(self.split.train, torch.Generator().manual_seed(
            derive(cfg.seed, "batches", self.site_id, server_round)))
        images, labels = self.site.images, self.site.labels

        def next_batch() -> list[Chunk]:
            idx = stream.next(cfg.batch_size)
            return [Chunk(0, images[idx], labels[idx])]

        candidates = bank.candidates_for(self.site_id) if (spec.prototypes and bank is not None) else None
        terms = algorithm.site_terms(received, kept, lambda flat: unflatten(flat, self.layout))
        stats = train_steps(
            self.model, optimizer, next_batch, cfg.local_steps, build_objective(cfg, candidates, shared, terms),
            image_size=cfg.image_size, grad_clip=cfg.grad_clip, augment=cfg.augmentation, mixstyle=cfg.mixstyle,
            device=self.device,
            generator=torch.Generator().manual_seed(derive(cfg.seed, "augment", self.site_id, server_round)),
        )
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        trained = {k: state[k] for k in self.keys}
        sent, keep = algorithm.site_update(received, kept, flatten(shared, self.layout), flatten(trained, self.layout),
                                           cfg.local_steps, lr)
        new_local = LocalState(self._local_part(), optimizer_to_tensors(optimizer), server_round, algorithm=keep)
        stats["seconds"] = time.perf_counter() - started
        return trained, stats, new_local, sent

    def summary_round(self, folder: Path, flat: np.ndarray, server_round: int, evaluate_now: bool,
                      prototypes_due: bool, final: bool, noise: torch.Generator | None = None) -> Summary:
        """A summary message at this site, files included: the received weights ``flat`` (N,) summarised
        (``summarise``) with the site's state of the round before; kept with the re-estimated BN for the round's
        training (``received/``), or after the last round (``final``) saved as the site's final model with its
        model card, whose decision threshold is the operating point's (added to the metrics as ``op_<name>``); the
        per-image predictions written when evaluated."""
        local = LocalState.load(folder / SITE_STATE, server_round - 1)
        summary = self.summarise(unflatten(flat, self.layout), local, server_round, evaluate_now, prototypes_due,
                                 noise)
        if final:
            point = self.operating_point(summary)
            if point is not None:
                summary.metrics.update({f"op_{k}": v for k, v in point.items()})
            self._save_final_model(folder, summary, point)
        else:  # the train message of this round names these weights by their digest
            Received(flat, summary.bn, server_round).save(folder / RECEIVED)
        if summary.metrics is not None:
            write_predictions(folder / PREDICTIONS_CSV, self.site, self.split.test, summary.probs)
            write_predictions(folder / VAL_PREDICTIONS_CSV, self.site, self.split.val, summary.val_probs)
        return summary

    def operating_point(self, summary: Summary) -> dict[str, float] | None:
        """The operating point of an evaluated summary (``fl_covid.metrics.operating_point``): the threshold chosen
        on this site's validation predictions and the test fold's metrics at it; None without an evaluation or when
        the validation split lacks a class."""
        if summary.metrics is None:
            return None
        labels = self.site.labels
        return operating_point(labels[self.split.val].numpy(), summary.val_probs, labels[self.split.test].numpy(),
                               summary.probs)

    def _save_final_model(self, folder: Path, summary: Summary, point: dict[str, float] | None) -> None:
        """The site's complete final model (the global weights with its own BN, as loaded by the final summary)
        and its model card: training images, validation metrics, decision threshold (``point``'s, the operating
        point, else 0.5), shift profile."""
        cfg, images = self.config, self.site.images
        profile = shift_profile(self.model, images[self.split.train], images[self.split.val], cfg.image_size,
                                seed=cfg.seed, device=self.device)
        validation = {k[4:]: v for k, v in (summary.metrics or {}).items() if k.startswith("val_")}
        save_site_model(folder / SITE_MODEL, self.model.state_dict(), model_card(
            cfg, self.site, self.split.train, run=folder.parent.name, method=cfg.method,
            rounds=cfg.num_server_rounds, validation=validation, shift=profile,
            operating_threshold=point["threshold"] if point is not None else None))

    def train_round(self, folder: Path, flat: np.ndarray, bn: dict[str, torch.Tensor] | None, lr: float,
                    server_round: int, bank: PrototypeBank | None, received: Payload
                    ) -> tuple[Transfer, dict[str, float], Payload]:
        """A train message at this site, files included: ``train`` from the received weights ``flat`` (N,) with
        the site's state of the round before; the trained weights encoded for the reply
        (``fl_covid.transport.site_reply``, whose int8 quantisation error goes into the new state), the new state
        saved before the reply leaves. Returns (the reply's weights, training metrics, the algorithm's payload)."""
        start = LocalState.load(folder / SITE_STATE, server_round - 1)
        trained, stats, local, sent = self.train(unflatten(flat, self.layout), bn, start, lr, server_round, bank,
                                                 received)
        weights, local.residual = site_reply(flatten(trained, self.layout), flat,
                                             start.residual if start is not None else None, self.config.compression)
        local.save(folder / SITE_STATE, started_from=(start or LocalState()).provenance())
        return weights, stats, sent
