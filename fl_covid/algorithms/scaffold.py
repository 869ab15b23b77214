"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates that correct each site's drift in long rounds.

The server keeps a control variate c and each site its own c_i (in its local state: c_i never leaves the site),
both over the shared weights (BN stays local, as in FedBN). A site trains with plain SGD on its objective plus the
linear term <w, c - c_i>, whose gradient adds the correction c - c_i to every step's gradient (clipped with it by
``grad-clip``). After K steps at learning rate eta from the global weights x to y_i it sets (option II of the
paper) c_i+ = c_i - c + (x - y_i) / (K eta) and sends delta c_i = c_i+ - c_i beside y_i. The server averages the
weights as every method does (``fedavg-weights``) and sets c <- c + (sum of the accepted sites' delta c_i) / N over
all N sites. Every train message carries c.

What leaves a site besides its weights: delta c_i = (x - y_i) / (K eta) - c, computed from the weights the server
sent, the weights the site returns and c, all known to the server: it adds nothing the update does not show.
Both vectors travel as float32: SCAFFOLD doubles the bytes of a round (``compression`` none only).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fl_covid.algorithms.base import Algorithm, LossTerm, Payload
from fl_covid.config import Config
from fl_covid.objective import StepOutput

CONTROL = "control"  # the server's control variate c (server -> site)
DELTA = "control-delta"  # a site's change of its control variate, delta c_i (site -> server)
OWN = "control"  # the site's own control variate c_i (local state)


class ControlCorrection:
    """The loss term sum_k <w_k, d_k> over the named parameters, d = c - c_i detached: its gradient is d."""

    def __init__(self, directions: dict[str, torch.Tensor]) -> None:
        self.directions = directions

    def __call__(self, model: nn.Module, out: StepOutput) -> torch.Tensor:
        params = dict(model.named_parameters())
        terms = []
        for name in [n for n in self.directions if n in params]:
            p = params[name]
            if self.directions[name].device != p.device:
                self.directions[name] = self.directions[name].to(p.device)
            terms.append((p * self.directions[name]).sum())
        return torch.stack(terms).sum() if terms else out.logits.new_zeros(())


class Scaffold(Algorithm):
    """SCAFFOLD over the shared weights, with SGD at the sites (config key ``sgd-lr``)."""

    name = "scaffold"
    local_optimizer = "sgd"
    site_sends = (DELTA,)
    server_sends = (CONTROL,)

    def __init__(self, config: Config, size: int) -> None:
        super().__init__(config, size)
        self.control = np.zeros(size, np.float32)

    @staticmethod
    def violations(config: Config) -> list[str]:
        if config.compression != "none":
            return [(f"compression is {config.compression!r}: the control variates travel as float32, set "
                     "compression=none")]
        return []

    def _own(self, local: dict[str, torch.Tensor]) -> np.ndarray:
        own = local.get(OWN)
        if own is None:
            return np.zeros(self.size, np.float32)
        if tuple(own.shape) != (self.size,):
            raise ValueError(f"the site's control variate has shape {tuple(own.shape)}, expected ({self.size},)")
        return own.numpy().astype(np.float32)

    def site_terms(self, received: Payload, local: dict[str, torch.Tensor],
                   unflatten: Callable[[np.ndarray], dict[str, torch.Tensor]]) -> list[LossTerm]:
        return [ControlCorrection(unflatten(received[CONTROL] - self._own(local)))]

    def site_update(self, received: Payload, local: dict[str, torch.Tensor], start: np.ndarray, trained: np.ndarray,
                    steps: int, lr: float) -> tuple[Payload, dict[str, torch.Tensor]]:
        own = self._own(local)
        updated = (own - received[CONTROL] + (start - trained) / (steps * lr)).astype(np.float32)
        return {DELTA: updated - own}, {**local, OWN: torch.from_numpy(updated)}

    def server_payload(self) -> Payload:
        return {CONTROL: self.control}

    def server_update(self, replies: dict[int, Payload]) -> None:
        if replies:
            total = np.sum([p[DELTA] for _, p in sorted(replies.items())], axis=0)
            self.control = (self.control + total / len(self.config.sites)).astype(np.float32)

    def state(self) -> dict[str, torch.Tensor]:
        return {CONTROL: torch.from_numpy(self.control.copy())}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        if CONTROL in state:
            self.control = state[CONTROL].numpy().astype(np.float32)
