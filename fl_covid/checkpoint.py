"""Atomic, pickle-free persistence of tensors (NPZ) and small metadata (JSON) for sites and the server."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_covid.reporting import atomic_write_bytes, write_json


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """name -> tensor as an uncompressed NPZ, written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **{k: v.detach().cpu().numpy() for k, v in tensors.items()})
    atomic_write_bytes(path, buf.getvalue())


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    with np.load(path, allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k].copy()) for k in z.files}


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


class StateStore:
    """A folder holding one party's state: ``<name>.npz`` tensor files and ``state.json`` metadata."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def save(self, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        """Write every tensor group, then the metadata last: its presence marks a complete state."""
        for name, group in tensors.items():
            save_tensors(self.folder / f"{name}.npz", group)
        write_json(self.folder / "state.json", meta)

    def load(self, names: tuple[str, ...]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None:
        """The saved groups and metadata, or None when no complete state exists."""
        meta_file = self.folder / "state.json"
        if not meta_file.is_file():
            return None
        meta = json.loads(meta_file.read_text())
        return {n: load_tensors(self.folder / f"{n}.npz") for n in names if (self.folder / f"{n}.npz").is_file()}, meta
