"""A site's complete trained model on disk: the weights it uses (shared weights + its own BN, adapters or auxiliary
branch) and a model card.

Layout, written by every site after a federated run's last round and by ``fl-covid-central`` for every site::

    <folder>/model.pt     the one-site model's state dict, plain tensors (read with torch.load(weights_only=True))
    <folder>/model.json   the model card: architecture, input, classes and decision threshold (chosen on the
                          site's validation split by Youden's J, ``threshold_rule`` says so; 0.5 without a
                          validation split of both classes), run, training data fingerprint, the site's validation
                          metrics, intended use, data licences, the shift profile of its training images
                          (fl_covid.shift; aggregates only) and the AUC measured at unseen sites
                          (``fl-covid-evaluate`` adds it)

Folders are ``<run dir or state dir>/<run name>/site-<name>/model``. Nothing here is shared with other sites.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fl_covid.config import Config, load_config
from fl_covid.data import CLASSES, Site, data_licence
from fl_covid.errors import ConfigError
from fl_covid.model import COVIDNet, build_model, load_partial
from fl_covid.reporting import atomic_write_bytes, write_json

WEIGHTS_FILE = "model.pt"
CARD_FILE = "model.json"
INTENDED_USE = ("Research only, not for clinical use: trained on public 2D CT slices whose labels and sources "
                "carry known biases; not validated for diagnosis or triage.")
THRESHOLD = 0.5  # the decision threshold of a card without one, and of a site whose validation split cannot choose
YOUDEN_RULE = "Youden's J on the validation split"
DEFAULT_RULE = f"{THRESHOLD} (no validation split with both classes)"


def training_fingerprint(site: Site, indices: Any) -> str:
    """SHA-256 over the training images' relative paths, labels and decoded pixels (in index order)."""
    h = hashlib.sha256()
    for i in sorted(int(i) for i in indices):
        h.update(f"{site.paths[i]}\t{int(site.labels[i])}\n".encode())
        h.update(site.images[i].numpy().tobytes())
    return h.hexdigest()


def model_card(config: Config, site: Site, train_indices: Any, *, run: str, method: str, rounds: int,
               validation: dict[str, float] | None, shift: dict[str, Any] | None,
               operating_threshold: float | None) -> dict[str, Any]:
    """The model card of ``site``'s model trained under ``config`` (JSON-friendly); ``shift``: the site's shift
    profile (``fl_covid.shift.shift_profile``), None when it has too few images for one; ``operating_threshold``:
    the decision threshold chosen on the site's validation split (``fl_covid.metrics.operating_threshold``), None
    when the split lacks a class (the card then says 0.5)."""
    try:
        version = metadata.version("fl-covid")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "format": 1,
        "architecture": config.arch, "width": config.width, "image_size": config.image_size,
        "classes": list(CLASSES), "positive_class": CLASSES[1],
        "threshold": THRESHOLD if operating_threshold is None else float(operating_threshold),
        "threshold_rule": DEFAULT_RULE if operating_threshold is None else YOUDEN_RULE,
        "method": method, "run": run, "rounds": rounds, "site": site.name, "sites": list(config.sites),
        "training_images": len(train_indices), "training_data_sha256": training_fingerprint(site, train_indices),
        "validation_metrics": validation or {},
        "shift": shift,
        "unseen_site_auc": {},
        "config": config.to_dict(),
        "intended_use": INTENDED_USE,
        "data_licences": {name: data_licence(name, site.root if name == site.name else None)
                          for name in config.sites},
        "fl_covid_version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def save_site_model(folder: Path, state: dict[str, torch.Tensor], card: dict[str, Any]) -> None:
    """Write a one-site model's state dict and its card into ``folder`` (atomically, file by file)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, buf)
    atomic_write_bytes(Path(folder) / WEIGHTS_FILE, buf.getvalue())
    write_json(Path(folder) / CARD_FILE, card)


def record_unseen_auc(folder: str | Path, site: str, metrics: dict[str, Any], **about: Any) -> None:
    """Add the AUC measured on unseen site ``site`` (and ``about`` it: BN choice, output folder) to the card in
    ``folder``; a later measurement on the same site replaces it."""
    file = Path(folder).expanduser() / CARD_FILE
    card = json.loads(file.read_text())
    card.setdefault("unseen_site_auc", {})[site] = {
        "auc": metrics["auc"], "n": metrics["n"], **about,
        "measured": datetime.now(UTC).isoformat(timespec="seconds")}
    write_json(file, card)


@dataclass(frozen=True)
class SiteModel:
    """A loaded site model: the network (eval mode), its card and the config it was trained with."""

    model: COVIDNet
    card: dict[str, Any]
    config: Config

    @property
    def threshold(self) -> float:
        """P(COVID) at or above which an image is COVID: the card's (0.5 in a card without one)."""
        return float(self.card.get("threshold", THRESHOLD))


def load_site_model(folder: str | Path) -> SiteModel:
    """Read ``folder``/model.pt (plain tensors only) and model.json; FileNotFoundError / ConfigError naming the
    file when it is not a site model."""
    folder = Path(folder).expanduser()
    weights, card_file = folder / WEIGHTS_FILE, folder / CARD_FILE
    for f in (weights, card_file):
        if not f.is_file():
            raise FileNotFoundError(f"{folder} is not a model folder: {f.name} is missing (a run writes one per site "
                                    "in site-<name>/model)")
    card = json.loads(card_file.read_text())
    if card.get("format") != 1:
        raise ConfigError(f"{card_file}: unknown model card format {card.get('format')!r}")
    config = load_config(None, card["config"])
    model = build_model(config)  # the card's config names the method: its adapters / auxiliary branch come back
    state = torch.load(weights, map_location="cpu", weights_only=True)
    load_partial(model, state, set())
    return SiteModel(model.eval(), card, config)
