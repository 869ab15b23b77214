"""The one training and evaluation loop, used by the centralized trainer and the Flower client alike.

A step draws one chunk per site (``Chunk``: BN index, uint8 images, labels); each chunk goes through the model
with its own BN, then the step's objective (``fl_covid.objective``: CE plus the method's loss terms) is
minimised over all chunks together.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl_covid.data import eval_input, random_crops, to_input
from fl_covid.metrics import binary_metrics
from fl_covid.model import styles_mixed
from fl_covid.objective import Objective, StepOutput


@dataclass(frozen=True)
class Chunk:
    """Part of a step's batch from one site: ``images`` (b, 1, R, R) uint8, ``labels`` (b,), ``site`` BN index."""

    site: int
    images: torch.Tensor
    labels: torch.Tensor


# How often train_steps looks at the loss on the host: every look waits for the GPU to catch up.
FINITE_CHECK_EVERY = 50


def select_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` / ``cuda:N`` must exist.

    Under a Ray simulation with ``client-resources-num-gpus`` > 0 each client actor sees only its own GPU(s)
    through CUDA_VISIBLE_DEVICES, so ``cuda`` is that GPU; with 0 GPUs Ray hides them all and ``auto`` is the CPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"config key 'device' is {name!r} but this process sees {count} CUDA device(s) "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use 'auto' or 'cpu'")
    return device


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU batch to ``device`` without making the host wait: pinned, asynchronous on CUDA."""
    if device.type != "cuda":
        return images.to(device)
    return images.pin_memory().to(device, non_blocking=True)


def make_optimizer(model: nn.Module, lr: float, kind: str = "adam") -> torch.optim.Optimizer:
    """Adam over every parameter (SPEC: Adam, lr 1e-4), PyTorch's fused kernel (CPU and CUDA): the same update,
    one kernel instead of one per tensor (measured on CPU: the optimizer step in a quarter of the time); or plain
    SGD (``kind="sgd"``, no momentum: the local optimiser SCAFFOLD's control variates assume)."""
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    raise ValueError(f"optimizer kind must be 'adam' or 'sgd', got {kind!r}")


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
    objective: Objective,
    *,
    image_size: int,
    generator: torch.Generator,
    grad_clip: float,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    mixstyle: float = 0.0,
    lr_at: Callable[[int], float] | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    amp: bool | None = None,
) -> dict[str, float]:
    """Run ``steps`` optimisation steps of ``objective`` (``fl_covid.objective.build_objective``); returns the mean
    loss, ce and con (the contrastive term before its weight) and the train accuracy over them.

    Each step's chunks go through the model with their own BN; the projections, MS-Net's auxiliary logits and the
    cue head's predictions (with each chunk's cue statistics) are computed when the objective asks for them. ``lr_at(step)`` sets the learning rate per step. ``augment``
    (``Config.augmentation``) changes the uint8 crops further, with random numbers from ``generator``; so does
    ``mixstyle`` > 0 (``fl_covid.model.styles_mixed``: MixStyle on the stem's features with this probability).
    ``amp``: bf16 autocast (default: on CUDA only). On CUDA the model and batches are channels_last, the uint8
    crops travel pinned and asynchronously, and the host reads the GPU only every FINITE_CHECK_EVERY steps and at
    the end (a non-finite loss is reported then, naming the steps it happened in).
    """
    device = torch.device(device)
    use_cuda = device.type == "cuda"
    amp = use_cuda if amp is None else amp
    if objective.needs_auxiliary and getattr(model, "auxiliary", None) is None:
        raise ValueError("the objective has MS-Net's term but the model has no auxiliary branches")
    if objective.needs_cues and getattr(model, "cue_head", None) is None:
        raise ValueError("the objective has the cue-adversarial term but the model has no cue head")
    objective = objective.to(device)
    model.to(device).train()
    if use_cuda:
        model.to(memory_format=torch.channels_last)
    sums = torch.zeros(4, device=device)  # loss, ce, con, correct
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    seen, checked = 0, 0
    with styles_mixed(model, mixstyle, generator):
        for step in range(steps):
            if lr_at is not None:
                set_lr(optimizer, lr_at(step))
            chunks = next_batch()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits, projections, labels, aux_logits, cue_predictions, cue_targets = [], [], [], [], [], []
                for c in chunks:
                    crops = random_crops(c.images, image_size, generator)
                    if augment is not None:  # against dataset-specific cues (fl_covid.preprocess.Augmentation)
                        crops = augment(crops, generator)
                    crops = to_device(crops, device)
                    x = to_input(crops)
                    if use_cuda:
                        x = x.contiguous(memory_format=torch.channels_last)
                    if objective.needs_auxiliary:
                        features, aux_logit = model.forward_features_and_auxiliary(x, c.site)
                        aux_logits.append(aux_logit)
                    else:
                        features = model.forward_features(x, c.site)
                    logits.append(model.forward_head(features, c.site))
                    if objective.needs_projections:
                        projections.append(model.project(features, c.site))
                    if objective.needs_cues:
                        cue_targets.append(objective.cue_adversarial.targets(crops))
                        cue_predictions.append(model.predict_cues(objective.cue_adversarial.reverse(features), c.site))
                    labels.append(to_device(c.labels, device))
            # the losses in float32, outside autocast: similarities / temperature need more than bf16's 8 bits
            out = StepOutput(torch.cat(logits).float(), torch.cat(labels),
                             torch.cat(projections).float() if projections else None,
                             torch.cat(aux_logits).float() if aux_logits else None,
                             torch.cat(cue_predictions).float() if cue_predictions else None,
                             torch.cat(cue_targets) if cue_targets else None)
            loss, ce, con = objective(model, out)
            nonfinite |= ~torch.isfinite(loss.detach())
            if (step + 1) % FINITE_CHECK_EVERY == 0 or step + 1 == steps:
                if nonfinite.item():
                    raise FloatingPointError(f"training loss became NaN or Inf within steps {checked}..{step}: "
                                             "lower lr or check the data")
                checked = step + 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            sums += torch.stack([loss.detach(), ce.detach(), con.detach(), (out.logits.argmax(1) == out.labels).sum()])
            seen += len(out.labels)
            if progress is not None:
                progress(1)
    loss, ce, con, correct = sums.tolist()
    n = max(steps, 1)
    return {"loss": loss / n, "ce": ce / n, "con": con / n, "train_accuracy": correct / max(seen, 1)}


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, site: int, image_size: int, batch_size: int = 128,
    device: torch.device | str = "cpu", with_projections: bool = False, amp: bool | None = None,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """Eval mode over uint8 (N, 1, R, R): P(COVID) (N,) and, if asked, unit projections (N, D) on the CPU.

    ``amp``: bf16 autocast (default: on CUDA only); the uint8 batches are resized on the device."""
    device = torch.device(device)
    model.to(device).eval()
    probs, projs = [], []
    for start in range(0, len(images), batch_size):
        x = eval_input(to_device(images[start:start + batch_size], device), image_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" if amp is None else amp):
            features = model.forward_features(x, site)
            probs.append(torch.softmax(model.forward_head(features, site).float(), 1)[:, 1])
            if with_projections:
                projs.append(F.normalize(model.project(features, site).float(), dim=1))  # unit in float32
    p = torch.cat(probs).cpu().numpy() if probs else np.zeros(0)
    return p, (torch.cat(projs).cpu() if with_projections else None)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, image_size: int, site: int = 0, batch_size: int = 128,
                   device: torch.device | str = "cpu", crops: torch.Generator | None = None) -> None:
    """Re-estimate every BN layer's running mean/var under the model's current weights from uint8 images
    (N, 1, R, R), labels not needed: statistics are reset, then accumulated as a cumulative average (momentum
    None) over train-mode forward passes through trunk, classifier and projection head of the eval transform (the
    whole image resized), or with ``crops`` of the training transform (random crops and flips drawn from it, no
    further augmentation: what the running statistics of training see); affine parameters and every other weight
    are untouched. The model is left in eval mode with its original momenta."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if len(images) < 2:
        raise ValueError("re-estimating BN statistics needs at least 2 images")
    momenta = [m.momentum for m in layers]
    model.to(device).eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        # near-equal chunks: a last batch of one image would break BatchNorm1d in train mode
        for chunk in torch.tensor_split(images, math.ceil(len(images) / batch_size)):
            x = (eval_input(to_device(chunk, torch.device(device)), image_size) if crops is None
                 else to_input(to_device(random_crops(chunk, image_size, crops), torch.device(device))))
            features = model.forward_features(x, site)
            model.forward_head(features, site)
            if getattr(model, "projector", None) is not None:
                model.project(features, site)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()


def entropy_adapt_bn(model: nn.Module, images: torch.Tensor, image_size: int, steps: int = 10, lr: float = 1e-3,
                     batch_size: int = 64, seed: int = 0, device: torch.device | str = "cpu") -> list[float]:
    """Test-time adaptation by entropy minimisation (Tent, Wang et al., ICLR 2021) on a new site's unlabelled
    uint8 images (N, 1, R, R): BN statistics re-estimated on the images (``recalibrate_bn``), then ``steps`` Adam
    steps on the BN affine parameters only, each minimising the mean prediction entropy of a seeded random batch
    of ``batch_size`` images (BN on batch statistics, eval transform, site 0), then the statistics re-estimated
    under the adapted parameters. Every other weight is untouched; the model is left in eval mode. Returns the
    mean entropy (nats) of each step's batch."""
    if len(images) < 2:
        raise ValueError("entropy adaptation needs at least 2 images")
    if steps < 1 or lr <= 0:
        raise ValueError(f"entropy adaptation needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    dev = torch.device(device)
    recalibrate_bn(model, images, image_size, batch_size=batch_size, device=dev)
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    affine = [p for m in layers for p in (m.weight, m.bias)]
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in affine:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(affine, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    entropies = []
    try:
        for m in layers:
            m.train()
        for _ in range(steps):
            batch = images[torch.randperm(len(images), generator=generator)[:max(2, batch_size)]]
            logits = model.forward_head(model.forward_features(eval_input(to_device(batch, dev), image_size), 0), 0)
            entropy = -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            entropy.backward()
            optimizer.step()
            entropies.append(float(entropy.detach()))
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        model.eval()
    recalibrate_bn(model, images, image_size, batch_size=batch_size, device=dev)
    return entropies


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, site: int, image_size: int,
             device: torch.device | str = "cpu") -> tuple[dict[str, float], np.ndarray]:
    """Metrics (accuracy, f1, sensitivity, precision, specificity, auc, n) and the per-image probabilities."""
    probs, _ = predict(model, images, site, image_size, device=device)
    return binary_metrics(labels.numpy(), probs), probs
