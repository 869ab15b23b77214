"""The transfer layout of the shared weights: every shared tensor, in an order both sides derive from the model,
as one flat float32 vector (N,). Flower-free: the site's runner and the algorithms use it; ``fl_covid.records``
turns the vectors into Flower records."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

Layout = tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape) of every shared tensor, in transfer order


def layout_of(tensors: Mapping[str, torch.Tensor]) -> Layout:
    """The transfer layout of float tensors (name -> tensor, in the mapping's order)."""
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise ValueError(f"shared tensor {name} is {t.dtype}; only float32 tensors are shared")
    return tuple((name, tuple(t.shape)) for name, t in tensors.items())


def layout_size(layout: Layout) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) for _, shape in layout)


def flatten(tensors: Mapping[str, torch.Tensor], layout: Layout) -> np.ndarray:
    """Shared tensors -> one float32 vector (N,) in ``layout`` order; KeyError / ValueError when they differ."""
    parts = []
    for name, shape in layout:
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(t.shape)}, the layout says {shape}")
        parts.append(t.detach().cpu().reshape(-1).to(torch.float32))
    return torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)


def unflatten(flat: np.ndarray, layout: Layout) -> dict[str, torch.Tensor]:
    """Inverse of ``flatten``: (N,) -> name -> float32 tensor (writable copies)."""
    if flat.shape != (layout_size(layout),):
        raise ValueError(f"flat weights have shape {flat.shape}, the layout needs ({layout_size(layout)},)")
    out, start = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape, dtype=np.int64))
        out[name] = torch.from_numpy(np.array(flat[start:start + n], dtype=np.float32)).reshape(shape)
        start += n
    return out
