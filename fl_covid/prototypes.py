"""Per-class prototypes of the projected embedding and the bank of all sites' prototypes (SPEC section 4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrototypeBank:
    """Prototypes of every site: ``vectors`` (K*C, D) unit rows (zeros where a class is absent),
    ``labels`` (K*C,) class index, ``sites`` (K*C,) site id, ``counts`` (K*C,) images behind each row."""

    vectors: torch.Tensor
    labels: torch.Tensor
    sites: torch.Tensor
    counts: torch.Tensor

    @staticmethod
    def empty(dim: int = 128) -> "PrototypeBank":
        z = torch.zeros(0, dtype=torch.int64)
        return PrototypeBank(torch.zeros(0, dim), z, z.clone(), z.clone())

    @staticmethod
    def from_sites(per_site: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> "PrototypeBank":
        """``{site_id: (vectors (C, D), counts (C,))}`` -> bank, rows ordered by site then class."""
        if not per_site:
            return PrototypeBank.empty()
        ids = sorted(per_site)
        vectors = torch.cat([per_site[k][0] for k in ids])
        counts = torch.cat([per_site[k][1] for k in ids]).to(torch.int64)
        c = per_site[ids[0]][0].shape[0]
        labels = torch.arange(c).repeat(len(ids))
        sites = torch.tensor(ids).repeat_interleave(c)
        return PrototypeBank(vectors.float(), labels, sites, counts)

    def candidates_for(self, site_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The other sites' prototypes with at least one image: ((P, D), (P,) labels)."""
        keep = (self.sites != site_id) & (self.counts > 0)
        return self.vectors[keep], self.labels[keep]


@torch.no_grad()
def class_prototypes(projections: torch.Tensor, labels: torch.Tensor, num_classes: int = 2
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """projections: (N, D) unit rows; labels: (N,) -> (normalised class means (C, D), counts (C,))."""
    onehot = F.one_hot(labels, num_classes).to(projections.dtype)  # (N, C)
    counts = onehot.sum(0)
    means = onehot.T @ projections / counts.clamp(min=1)[:, None]
    return F.normalize(means, dim=1), counts.to(torch.int64)
