"""What a federated method adds to the FedBN round, in one place: its site part, its payload both ways, its server
state and its rules.

A method whose record names an algorithm (``Method.algorithm``) gets one ``Algorithm`` object at each site and one
at the server (``fl_covid.algorithms.algorithm_for``). At a site it chooses the local optimiser, adds loss terms to
the step's objective and, after training, says what the site sends besides its weights and keeps for itself (in
its local state, which never leaves the site). At the server it says what every train message carries besides the
weights, updates its state from the sites' payloads, and hands that state to the checkpoint. Payloads are float32
vectors over the shared weights' transfer layout (``fl_covid.records.Layout``), checked on both sides.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fl_covid.config import Config
from fl_covid.objective import StepOutput

Payload = dict[str, np.ndarray]  # name -> float32 (N,) over the shared layout
LossTerm = Callable[[nn.Module, StepOutput], torch.Tensor]


class Algorithm:
    """The plain FedBN round: Adam at the sites, nothing sent but the weights, no server state."""

    name = "none"
    local_optimizer = "adam"  # "adam" (lr config key lr) or "sgd" (lr config key sgd-lr)
    site_sends: tuple[str, ...] = ()  # payload names of a site's training reply
    server_sends: tuple[str, ...] = ()  # payload names of every train message

    def __init__(self, config: Config, size: int) -> None:
        """``size``: values in the shared weights' layout."""
        self.config, self.size = config, size

    @property
    def base_lr(self) -> float:
        """The local learning rate the cosine schedule over the rounds starts from: ``lr`` for Adam, ``sgd-lr``
        for SGD."""
        return self.config.sgd_lr if self.local_optimizer == "sgd" else self.config.lr

    @staticmethod
    def violations(config: Config) -> list[str]:
        """Why ``config`` cannot run this algorithm (empty: it can)."""
        return []

    # -- at a site --------------------------------------------------------------------------------------------------

    def site_terms(self, received: Payload, local: dict[str, torch.Tensor],
                   unflatten: Callable[[np.ndarray], dict[str, torch.Tensor]]) -> list[LossTerm]:
        """Loss terms this round adds to the objective, from what the server sent and the site's own state;
        ``unflatten``: a flat (N,) vector -> shared tensor name -> tensor."""
        return []

    def site_update(self, received: Payload, local: dict[str, torch.Tensor], start: np.ndarray, trained: np.ndarray,
                    steps: int, lr: float) -> tuple[Payload, dict[str, torch.Tensor]]:
        """After ``steps`` local steps at learning rate ``lr`` from ``start`` to ``trained`` (flat shared weights,
        (N,)): (what the site sends with its weights, what it keeps)."""
        return {}, dict(local)

    # -- at the server ----------------------------------------------------------------------------------------------

    def server_payload(self) -> Payload:
        """What every train message carries besides the weights."""
        return {}

    def server_update(self, replies: dict[int, Payload]) -> None:
        """Update the server's state from the accepted sites' payloads (site id -> payload)."""

    def state(self) -> dict[str, torch.Tensor]:
        """The server's state, saved with every checkpoint."""
        return {}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint's ``state``."""
