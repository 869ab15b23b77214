"""The one training and evaluation loop, used by the centralized trainer and the Flower client alike.

A step draws one chunk per site (``Chunk``: BN index, uint8 images, labels); each chunk goes through the model
with its own BN, then CE over all logits + alpha * NT-Xent over all projections and the extra candidates
(the other sites' prototypes in the federated protocol).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl_covid.data import augment, eval_input
from fl_covid.losses import NTXentLoss
from fl_covid.metrics import binary_metrics


@dataclass(frozen=True)
class Chunk:
    """Part of a step's batch from one site: ``images`` (b, 1, R, R) uint8, ``labels`` (b,), ``site`` BN index."""

    site: int
    images: torch.Tensor
    labels: torch.Tensor


def select_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Adam:
    """Adam over every parameter (SPEC: Adam, lr 1e-4)."""
    return torch.optim.Adam(model.parameters(), lr=lr)


def cosine_lr(base_lr: float, step: int, total: int) -> float:
    """Cosine annealing from ``base_lr`` at step 0 towards 0 at ``total``."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    next_batch: Callable[[], list[Chunk]],
    steps: int,
    *,
    image_size: int,
    generator: torch.Generator,
    alpha: float = 0.0,
    temperature: float = 0.05,
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    grad_clip: float = 5.0,
    lr_at: Callable[[int], float] | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Run ``steps`` optimisation steps; returns mean loss, ce, con and train accuracy over them.

    ``alpha`` > 0 adds NT-Xent over the projections of the whole step (all chunks) plus ``candidates``
    ((P, D) vectors, (P,) labels), which are detached. ``lr_at(step)`` sets the learning rate per step.
    """
    device = torch.device(device)
    use_cuda = device.type == "cuda"
    contrastive = NTXentLoss(temperature) if alpha > 0 else None
    cand = None
    if candidates is not None and contrastive is not None and len(candidates[0]):
        cand = (candidates[0].to(device), candidates[1].to(device))
    model.to(device).train()
    sums = torch.zeros(4, device=device)  # loss, ce, con, correct
    seen = 0
    for step in range(steps):
        if lr_at is not None:
            set_lr(optimizer, lr_at(step))
        chunks = next_batch()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
            logits, projections, labels = [], [], []
            for c in chunks:
                x = augment(c.images, image_size, generator).to(device, non_blocking=True)
                if use_cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                features = model.forward_features(x, c.site)
                logits.append(model.forward_head(features, c.site))
                if contrastive is not None:
                    projections.append(model.project(features, c.site))
                labels.append(c.labels.to(device, non_blocking=True))
            logit, label = torch.cat(logits).float(), torch.cat(labels)
            ce = F.cross_entropy(logit, label)
            con = (contrastive(torch.cat(projections).float(), label, *(cand or (None, None)))
                   if contrastive is not None else torch.zeros((), device=device))
            loss = ce + alpha * con
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}: lower lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        sums += torch.stack([loss.detach(), ce.detach(), con.detach(), (logit.argmax(1) == label).sum()])
        seen += len(label)
        if progress is not None:
            progress(1)
    loss, ce, con, correct = sums.tolist()
    n = max(steps, 1)
    return {"loss": loss / n, "ce": ce / n, "con": con / n, "train_accuracy": correct / max(seen, 1)}


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, site: int, image_size: int, batch_size: int = 128,
    device: torch.device | str = "cpu", with_projections: bool = False,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """Eval mode over uint8 (N, 1, R, R): P(COVID) (N,) and, if asked, unit projections (N, D) on the CPU."""
    device = torch.device(device)
    model.to(device).eval()
    probs, projs = [], []
    for start in range(0, len(images), batch_size):
        x = eval_input(images[start:start + batch_size], image_size).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            features = model.forward_features(x, site)
            probs.append(torch.softmax(model.forward_head(features, site).float(), 1)[:, 1])
            if with_projections:
                projs.append(model.project(features, site).float())
    p = torch.cat(probs).cpu().numpy() if probs else np.zeros(0)
    return p, (torch.cat(projs).cpu() if with_projections else None)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, site: int, image_size: int,
             device: torch.device | str = "cpu") -> tuple[dict[str, float], np.ndarray]:
    """Metrics (accuracy, f1, sensitivity, precision, specificity, auc, n) and the per-image probabilities."""
    probs, _ = predict(model, images, site, image_size, device=device)
    return binary_metrics(labels.numpy(), probs), probs
