"""The objective of one training step: CE plus the loss terms of the method, built from the method and config.

``build_objective`` is the one place that turns a method's record (``fl_covid.methods.Method``) and the config into
loss terms (``fl_covid.losses``); the federated site, the centralized trainer and the bench call it, and
``fl_covid.engine.train_steps`` runs the forward passes the objective asks for and calls it. A method with a new
term adds its module to ``fl_covid.losses`` and one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fl_covid.config import Config
from fl_covid.losses import CueAdversarialLoss, MSNetLoss, NTXentLoss, ProximalTerm


@dataclass(frozen=True)
class StepOutput:
    """What one step's forward passes produced over all its chunks: ``logits`` (B, C) float32, ``labels`` (B,),
    ``projections`` (B, D) float32 when the objective is contrastive, ``aux_logits`` (B, C) float32 of each
    image's site branch when it has MS-Net's term, ``cue_predictions`` and ``cue_targets`` (B, K) float32 when it
    has the cue-adversarial term."""

    logits: torch.Tensor
    labels: torch.Tensor
    projections: torch.Tensor | None = None
    aux_logits: torch.Tensor | None = None
    cue_predictions: torch.Tensor | None = None
    cue_targets: torch.Tensor | None = None


@dataclass(frozen=True)
class Objective:
    """L = CE + alpha * NT-Xent (over the step's projections plus ``candidates``: (P, D) vectors and (P,) labels,
    detached, each counting ``candidate_weight`` times) + MS-Net's term + FedProx's term + the cue-adversarial
    term; absent terms add nothing.
    """

    contrastive: NTXentLoss | None = None
    alpha: float = 1.0
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None
    candidate_weight: float = 1.0
    msnet: MSNetLoss | None = None
    proximal: ProximalTerm | None = None
    cue_adversarial: CueAdversarialLoss | None = None
    extra: tuple[Callable[[nn.Module, StepOutput], torch.Tensor], ...] = ()  # a method's own terms

    @property
    def needs_projections(self) -> bool:
        return self.contrastive is not None

    @property
    def needs_auxiliary(self) -> bool:
        return self.msnet is not None

    @property
    def needs_cues(self) -> bool:
        return self.cue_adversarial is not None

    def to(self, device: torch.device) -> Objective:
        """The same objective with its candidates on ``device``."""
        if self.candidates is None:
            return self
        return replace(self, candidates=(self.candidates[0].to(device), self.candidates[1].to(device)))

    def __call__(self, model: nn.Module, out: StepOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, CE, the contrastive term before its weight alpha; 0 without one), each a 0-d tensor."""
        ce = F.cross_entropy(out.logits, out.labels)
        con = (self.contrastive(out.projections, out.labels, *(self.candidates or (None, None)),
                                self.candidate_weight)
               if self.contrastive is not None else torch.zeros((), device=out.logits.device))
        loss = ce + (self.alpha if self.contrastive is not None else 0.0) * con
        if self.msnet is not None:
            loss = loss + self.msnet(out.logits, out.aux_logits, out.labels)
        if self.proximal is not None:
            loss = loss + self.proximal(model)
        if self.cue_adversarial is not None:
            loss = loss + self.cue_adversarial(out.cue_predictions, out.cue_targets)
        for term in self.extra:
            loss = loss + term(model, out)
        return loss, ce, con


def build_objective(config: Config, candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
                    reference: dict[str, torch.Tensor] | None = None,
                    extra: Sequence[Callable[[nn.Module, StepOutput], torch.Tensor]] = ()) -> Objective:
    """The objective of ``config.method``: NT-Xent for contrastive methods (``alpha`` > 0; ``candidates``: the
    other sites' prototypes, used when there are any), MS-Net's term for methods with auxiliary branches, FedProx's
    term for proximal methods (``proximal-mu`` > 0; ``reference``: the shared weights the round started from), the
    cue-adversarial term of any method (``cue-adversarial`` > 0) and the terms of the method's algorithm
    (``extra``, ``fl_covid.algorithms``)."""
    spec = config.spec
    if spec.proximal and config.proximal_mu > 0 and reference is None:
        raise ValueError(f"method {config.method}: the proximal term needs the weights the round started from")
    contrastive = spec.contrastive and config.alpha > 0
    return Objective(
        contrastive=NTXentLoss(config.temperature) if contrastive else None,
        alpha=config.alpha,
        candidates=candidates if contrastive and candidates is not None and len(candidates[0]) else None,
        candidate_weight=config.prototype_weight,
        msnet=MSNetLoss(config.msnet_temperature, config.msnet_weight) if spec.auxiliary else None,
        proximal=ProximalTerm(config.proximal_mu, reference) if spec.proximal and config.proximal_mu > 0 else None,
        cue_adversarial=CueAdversarialLoss(config.cue_adversarial) if config.cue_adversarial > 0 else None,
        extra=tuple(extra),
    )
