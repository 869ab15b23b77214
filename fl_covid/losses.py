"""Supervised NT-Xent contrastive loss (paper eq. 2; SPEC section 3) with optional extra candidates.

For every ordered pair (a, p) of anchors with the same label, the loss is
``-log(exp(s_ap / tau) / (exp(s_ap / tau) + sum_n exp(s_an / tau)))`` over the negatives n of a (different
label), with s the cosine similarity; the mean is taken over all positive pairs. Extra candidates (the other
sites' class prototypes in the federated protocol) act as positives and negatives of every anchor but are never
anchors themselves. Same definition as pytorch-metric-learning's ``NTXentLoss`` when there are no extras.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NTXentLoss(nn.Module):
    """NT-Xent over L2-normalised embeddings with class labels; 0 when there is no positive or no negative pair."""

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(
        self,
        z: torch.Tensor,
        labels: torch.Tensor,
        candidates: torch.Tensor | None = None,
        candidate_labels: torch.Tensor | None = None,
        candidate_weight: float = 1.0,
    ) -> torch.Tensor:
        """z: (B, D) anchors, labels: (B,); candidates: (P, D) extra embeddings (detached), candidate_labels: (P,).

        ``candidate_weight`` w: each candidate counts as w copies of itself, as a positive pair and in every
        anchor's negatives (exactly w copies for an integer w), which sets the share of cross-site pairs."""
        if z.ndim != 2 or labels.shape != z.shape[:1]:
            raise ValueError(f"expected z (B, D) and labels (B,), got {tuple(z.shape)} and {tuple(labels.shape)}")
        z = F.normalize(z, dim=1)
        if not candidate_weight > 0:
            raise ValueError(f"candidate_weight must be > 0, got {candidate_weight}")
        others, other_labels = z, labels
        b = z.shape[0]
        weight = torch.ones(b, device=z.device, dtype=z.dtype)
        if candidates is not None and candidates.numel() > 0:
            if candidate_labels is None or candidates.shape != (candidate_labels.shape[0], z.shape[1]):
                raise ValueError("candidates must be (P, D) with candidate_labels (P,) and D matching z")
            others = torch.cat([z, F.normalize(candidates.to(z), dim=1).detach()])
            other_labels = torch.cat([labels, candidate_labels.to(labels)])
            weight = torch.cat([weight, torch.full((len(candidates),), float(candidate_weight), device=z.device,
                                                   dtype=z.dtype)])
        sim = z @ others.T / self.temperature  # (B, B + P)
        same = labels[:, None] == other_labels[None, :]
        not_self = torch.ones_like(same)
        not_self[:, :b] = ~torch.eye(b, dtype=torch.bool, device=z.device)
        pos, neg = same & not_self, ~same
        row_max = sim.detach().max(dim=1, keepdim=True).values
        exp = torch.exp(sim - row_max)
        neg_sum = (exp * neg * weight).sum(dim=1, keepdim=True)  # (B, 1)
        per_pair = -(sim - row_max) + torch.log(exp + neg_sum)  # (B, B + P), -log of the softmax ratio
        # Weighted mean over the positive pairs, 0 without a positive or a negative pair; no boolean indexing and
        # no Python branch on tensor values, so a GPU step never waits for the host here.
        pair_weight = pos * weight
        mean = (per_pair.masked_fill(~pos, 0.0) * pair_weight).sum() / pair_weight.sum().clamp(min=1e-12)
        return torch.where(pos.any() & neg.any(), mean, z.sum() * 0.0)
