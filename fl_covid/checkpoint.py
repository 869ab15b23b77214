"""Atomic, pickle-free persistence of tensors (NPZ) and small metadata (JSON) for sites and the server, and the
server's state between rounds (``ServerState``) from which a run resumes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_covid.errors import ConfigError
from fl_covid.prototypes import PrototypeBank
from fl_covid.reporting import atomic_write_bytes, write_json

STATE_JSON = "state.json"
# settings that may differ when a run resumes: where files are and how long to wait, not what is learned
RESUMABLE_KEYS = frozenset({"output-dir", "data-root", "min-sites", "round-timeout", "device", "num-threads",
                            "resume", "site-nodes"})
SAMPLING = "every connected node is sent every round (no sampling); the server draws no random numbers"
# A site's folder for one run, under its state root: <root>/<run name>/site-<name>/{state,state.previous,model}
SITE_STATE = "state"
RECEIVED = "received"  # the weights of the current round's summary message and the BN to train them with
SITE_MODEL = "model"
PREDICTIONS_CSV = "predictions.csv"
VAL_PREDICTIONS_CSV = "val_predictions.csv"  # the validation split's, for decisions pooled over folds


def site_folder(root: Path, run_name: str, site: str) -> Path:
    """A site's folder of one run: its training state, its final model and its per-image predictions."""
    return Path(root) / run_name / f"site-{site}"


def prune_site_states(root: Path, site: str, keep: int) -> list[Path]:
    """Delete this site's training state (BN, optimizer) of all but the ``keep`` most recently saved runs under
    ``root``; models, predictions and anything else stay. Returns the deleted folders."""
    states = sorted(Path(root).glob(f"*/site-{site}/{SITE_STATE}/{STATE_JSON}"), key=lambda f: f.stat().st_mtime,
                    reverse=True)
    deleted = []
    for file in states[keep:]:
        for name in (SITE_STATE, RECEIVED):
            for folder in (file.parent.with_name(name), file.parent.with_name(name + ".previous")):
                if folder.exists():
                    shutil.rmtree(folder, ignore_errors=True)
                    deleted.append(folder)
    return deleted


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """name -> tensor as an uncompressed NPZ, written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **{k: v.detach().cpu().numpy() for k, v in tensors.items()})
    atomic_write_bytes(path, buf.getvalue())


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    with np.load(path, allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k].copy()) for k in z.files}


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name): equal iff bitwise equal."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name].detach().cpu().numpy())
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Per-parameter optimizer state (Adam moments and step) as ``state.<param index>.<name>`` tensors."""
    out = {}
    for pid, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"state.{pid}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what ``optimizer_to_tensors`` saved into an optimizer over the same parameters."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    sd = optimizer.state_dict()
    n_params = sum(len(g["params"]) for g in sd["param_groups"])
    if state and max(state) >= n_params:
        raise ValueError(f"optimizer state has {max(state) + 1} parameters, the model has {n_params}")
    sd["state"] = state
    optimizer.load_state_dict(sd)


# the last state each folder was saved with by this process, by save id: a load that finds the same save id on
# disk takes a copy of these instead of reading the files (a site reads back its state every round)
_SAVED: OrderedDict[Path, tuple[str, dict[str, dict[str, torch.Tensor]]]] = OrderedDict()
_SAVED_FOLDERS = 8


def _copy(groups: dict[str, dict[str, torch.Tensor]], names: tuple[str, ...] | None = None
          ) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.detach().cpu().clone() for k, v in g.items()} for n, g in groups.items()
            if names is None or n in names}


class StateStore:
    """A folder holding one party's state: ``<name>.npz`` tensor groups and ``state.json`` metadata.

    A save replaces the folder as a whole: the new state is written into a temporary folder beside it and renamed
    into place, so a killed process leaves either the old or the new state, never a mix. The state it replaces is
    kept as ``<folder>.previous`` when its ``round`` is lower than the new one (a site that trained a round the
    server never completed can then go back to the round before). Between the two renames only the previous
    state exists; ``load`` falls back to it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.previous = self.folder.with_name(self.folder.name + ".previous")

    def save(self, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        """Write every tensor group and the metadata into a new folder, then swap it in."""
        parent = self.folder.parent
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".{self.folder.name}.tmp-*"):  # left by a process killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{self.folder.name}.tmp-"))
        meta = {**meta, "save-id": uuid.uuid4().hex}
        key = self.folder.resolve()
        _SAVED.pop(key, None)
        try:
            for name, group in tensors.items():
                save_tensors(tmp / f"{name}.npz", group)
            write_json(tmp / STATE_JSON, meta)
            old = _meta(self.folder)
            if old is None and self.folder.is_dir():
                if any(self.folder.iterdir()):
                    raise FileExistsError(f"{self.folder} holds files but no {STATE_JSON}, so it is not a saved "
                                          "state; move it away or choose another folder")
                self.folder.rmdir()
            discard = None
            if old is not None and _older(old, meta):
                shutil.rmtree(self.previous, ignore_errors=True)
                os.rename(self.folder, self.previous)
            elif self.folder.exists():
                discard = Path(tempfile.mkdtemp(dir=parent, prefix=f".{self.folder.name}.tmp-old-"))
                os.rename(self.folder, discard / "state")
            os.rename(tmp, self.folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if discard is not None:
            shutil.rmtree(discard, ignore_errors=True)
        _SAVED[key] = (meta["save-id"], _copy(tensors))
        while len(_SAVED) > _SAVED_FOLDERS:
            _SAVED.popitem(last=False)

    def load(self, names: tuple[str, ...], max_round: int | None = None
             ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None:
        """The newest complete state (whose ``round`` is at most ``max_round`` if given): its tensor groups among
        ``names`` and its metadata; None when there is none."""
        for folder in (self.folder, self.previous):
            meta = _meta(folder)
            if meta is None or (max_round is not None and int(meta.get("round", 0)) > max_round):
                continue
            saved = _SAVED.get(folder.resolve())
            if saved is not None and saved[0] == meta.get("save-id"):
                return _copy(saved[1], names), meta
            return {n: load_tensors(folder / f"{n}.npz") for n in names if (folder / f"{n}.npz").is_file()}, meta
        return None


def _meta(folder: Path) -> dict[str, Any] | None:
    """The metadata of a complete state folder, else None."""
    file = folder / STATE_JSON
    return json.loads(file.read_text()) if file.is_file() else None


def _older(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a state with metadata ``old`` precedes ``new`` (states without rounds always do)."""
    return "round" not in old or "round" not in new or int(old["round"]) < int(new["round"])


@dataclass
class ServerState:
    """What the server holds after a completed round: the shared weights it will send next, the prototype bank,
    the server optimizer's state (FedAdam / FedYogi moments, FedAvgM momentum; empty for FedAvg), the per-site
    metric rows so far and the config (kebab-case dict) of the run. The server's only randomness, node sampling,
    is re-seeded from ``seed`` and the round (``SAMPLING``), so no RNG state needs saving."""

    round: int
    shared: dict[str, torch.Tensor]
    bank: PrototypeBank
    history: list[dict[str, Any]]
    config: dict[str, Any]
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        """Write the whole state atomically (``StateStore``)."""
        tensors = {"shared": self.shared, "bank": self.bank.tensors(), "server-optimizer": self.optimizer}
        meta = {"round": self.round, "sampling": SAMPLING, "config": self.config, "history": self.history}
        StateStore(folder).save(tensors, meta)

    @staticmethod
    def load(folder: Path) -> ServerState | None:
        """The last saved state, or None when ``folder`` holds none."""
        loaded = StateStore(folder).load(("shared", "bank", "server-optimizer"))
        if loaded is None:
            return None
        tensors, meta = loaded
        return ServerState(int(meta["round"]), tensors["shared"], PrototypeBank.from_tensors(tensors["bank"]),
                           meta["history"], meta["config"], tensors.get("server-optimizer", {}))

    def check_config(self, config: dict[str, Any], folder: Path) -> None:
        """ConfigError unless ``config`` matches the saved run's, except for ``RESUMABLE_KEYS``."""
        keys = sorted((set(config) | set(self.config)) - RESUMABLE_KEYS)
        diff = [f"{k}: saved {self.config.get(k)!r}, now {config.get(k)!r}" for k in keys
                if self.config.get(k) != config.get(k)]
        if diff:
            raise ConfigError(f"resume: the run config differs from the one of the checkpoint in {folder} ("
                              + "; ".join(diff) + "); resume with the run's original settings")
