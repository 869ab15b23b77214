"""The loss terms a step can add to CE, one module each: the supervised NT-Xent contrastive loss (paper eq. 2;
SPEC section 3) with optional extra candidates, MS-Net's auxiliary CE and distillation, FedProx's proximal term,
the cue-adversarial regression through a gradient reversal.

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

from fl_covid.cues import batch_cues


class NTXentLoss(nn.Module):
    """NT-Xent over L2-normalised embeddings with class labels; 0 when there is no positive or no negative pair."""

    def __init__(self, temperature: float) -> None:
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


class MSNetLoss(nn.Module):
    """MS-Net's auxiliary terms for classification (Liu et al., IEEE TMI 2020): CE of the site-specific auxiliary
    branches plus ``weight`` times the distillation T^2 * KL(softmax(aux / T) || softmax(logits / T)) (batch mean)
    of the universal head from each image's site branch; the teacher side (the branch) is detached."""

    def __init__(self, temperature: float, weight: float) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"msnet temperature must be > 0, got {temperature}")
        if weight < 0:
            raise ValueError(f"msnet weight must be >= 0, got {weight}")
        self.temperature, self.weight = temperature, weight

    def forward(self, logits: torch.Tensor, aux_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits: (B, C) of the universal head, aux_logits: (B, C) of each image's site branch, labels: (B,)."""
        aux_ce = F.cross_entropy(aux_logits, labels)
        if self.weight == 0:
            return aux_ce
        t = self.temperature
        teacher = F.softmax(aux_logits.detach() / t, dim=1)
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), teacher, reduction="batchmean")
        return aux_ce + self.weight * t ** 2 * kd


class ProximalTerm(nn.Module):
    """FedProx's proximal term (Li et al., MLSys 2020): mu / 2 * sum over the named parameters of
    ||w - w_ref||^2, with ``reference`` the weights the round started from (name -> tensor, detached)."""

    def __init__(self, mu: float, reference: dict[str, torch.Tensor]) -> None:
        super().__init__()
        if mu < 0:
            raise ValueError(f"proximal-mu must be >= 0, got {mu}")
        self.mu = mu
        self.reference = {k: v.detach() for k, v in reference.items()}

    def forward(self, model: nn.Module) -> torch.Tensor:
        """The term for ``model``'s current parameters (those named in the reference); a 0-d tensor. The reference
        moves to the parameters' device once."""
        params = dict(model.named_parameters())
        pairs = []
        for k in [k for k in self.reference if k in params]:
            if self.reference[k].device != params[k].device:
                self.reference[k] = self.reference[k].to(params[k].device)
            pairs.append((params[k], self.reference[k]))
        if not pairs:
            return torch.zeros((), device=next(model.parameters()).device)
        return 0.5 * self.mu * sum(((p - r) ** 2).sum() for p, r in pairs)


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -scale (Ganin & Lempitsky, ICML 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


class CueAdversarialLoss(nn.Module):
    """Cue-adversarial term: the mean squared error of a site-local head's prediction of each image's cue
    statistics (``fl_covid.cues.batch_cues``, standardised over the site's chunk of the step) from its embedding.

    The head reads the embedding through a gradient reversal (``reverse``): the head learns to predict the cues
    with the full gradient of this term, the network below the embedding gets ``-weight`` times it, so it learns
    to leave out what tells border brightness, grey-level percentiles and contrast apart."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        if not weight > 0:
            raise ValueError(f"cue-adversarial weight must be > 0, got {weight}")
        self.weight = weight

    def reverse(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, E) unchanged, with the gradient reaching them reversed and scaled by ``weight``."""
        return _ReverseGradient.apply(features, self.weight)

    @staticmethod
    def targets(crops: torch.Tensor) -> torch.Tensor:
        """uint8 crops (b, 1, S, S) of one site -> standardised cue statistics (b, K) float32: each statistic minus
        its mean over the chunk, over its std (a statistic constant in the chunk is 0)."""
        cues = batch_cues(crops)
        return (cues - cues.mean(0)) / cues.std(0, correction=0).clamp_min(1e-6)

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """predictions, targets: (B, K) -> 0-d mean squared error."""
        return F.mse_loss(predictions, targets)
