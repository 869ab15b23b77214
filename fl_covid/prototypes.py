"""Per-class prototypes of the projected embedding and the bank of all sites' prototypes (SPEC section 4).

A site summarises the unit projections of its training images of each class by ``per_class`` prototypes: the
normalised mean of the class (``per_class`` = 1) or of each of its k-means clusters (sub-prototypes). A
prototype never summarises fewer than ``min_count`` images: a class with fewer images is withheld, and a class
gets fewer clusters when it has too few images for ``per_class`` of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans


@dataclass(frozen=True)
class PrototypeBank:
    """Prototypes of every site: ``vectors`` (P, D) unit rows, ``labels`` (P,) class index, ``sites`` (P,) site id,
    ``counts`` (P,) images behind each row. Rows are ordered by site, then class."""

    vectors: torch.Tensor
    labels: torch.Tensor
    sites: torch.Tensor
    counts: torch.Tensor

    @staticmethod
    def empty(dim: int) -> PrototypeBank:
        z = torch.zeros(0, dtype=torch.int64)
        return PrototypeBank(torch.zeros(0, dim), z, z.clone(), z.clone())

    @staticmethod
    def of_site(site_id: int, vectors: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> PrototypeBank:
        """One site's prototypes (vectors (P, D), labels (P,), counts (P,)) as a bank."""
        return PrototypeBank(vectors.float(), labels.long(), torch.full((len(labels),), site_id, dtype=torch.int64),
                             counts.long())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The bank as it is stored and sent: ``vectors``, ``labels``, ``sites`` and ``counts`` by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def from_tensors(tensors: Mapping[str, torch.Tensor]) -> PrototypeBank:
        """Inverse of ``tensors``: vectors as float32, the rest as int64."""
        return PrototypeBank(tensors["vectors"].float(), tensors["labels"].long(), tensors["sites"].long(),
                             tensors["counts"].long())

    def merge(self, newer: PrototypeBank) -> PrototypeBank:
        """This bank with every site present in ``newer`` replaced by its rows there (sites absent keep theirs)."""
        keep = ~torch.isin(self.sites, newer.sites)
        parts = [(self.vectors[keep], self.labels[keep], self.sites[keep], self.counts[keep]),
                 (newer.vectors, newer.labels, newer.sites, newer.counts)]
        vectors, labels, sites, counts = (torch.cat([p[i] for p in parts]) for i in range(4))
        order = sorted(range(len(sites)), key=lambda i: (int(sites[i]), int(labels[i])))
        return PrototypeBank(vectors[order], labels[order], sites[order], counts[order])

    def candidates_for(self, site_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The other sites' prototypes: ((P, D), (P,) labels)."""
        keep = self.sites != site_id
        return self.vectors[keep], self.labels[keep]


def cluster_sizes(n: int, per_class: int, min_count: int) -> int:
    """How many prototypes a class of ``n`` images gets: up to ``per_class``, each of at least ``min_count``."""
    return min(per_class, n // min_count)


@torch.no_grad()
def class_prototypes(projections: torch.Tensor, labels: torch.Tensor, num_classes: int = 2, per_class: int = 1,
                     min_count: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """projections: (N, D) unit rows; labels: (N,) -> (prototypes (P, D) unit rows, their labels (P,), counts (P,)).

    Each class's images are split into ``cluster_sizes`` k-means clusters (seeded), each summarised by the
    normalised mean of its projections; a cluster that ends up smaller than ``min_count`` is merged into its
    nearest neighbour, so that every row summarises at least ``min_count`` images."""
    vectors, out_labels, counts = [], [], []
    for c in range(num_classes):
        z = projections[labels == c].double()
        k = cluster_sizes(len(z), per_class, min_count)
        if k == 0:
            continue
        assign = np.zeros(len(z), dtype=np.int64) if k == 1 else \
            KMeans(k, n_init=3, random_state=seed % 2**32).fit_predict(z.numpy())  # sklearn takes 32-bit seeds
        assign = _merge_small(torch.from_numpy(assign), z, min_count)
        for j in assign.unique().tolist():
            members = z[assign == j]
            vectors.append(F.normalize(members.mean(0), dim=0).float())
            out_labels.append(c)
            counts.append(len(members))
    if not vectors:
        return torch.zeros(0, projections.shape[1]), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.stack(vectors), torch.tensor(out_labels), torch.tensor(counts)


def _merge_small(assign: torch.Tensor, z: torch.Tensor, min_count: int) -> torch.Tensor:
    """Cluster ids (N,) with every cluster of fewer than ``min_count`` members merged into the cluster whose mean is
    nearest, smallest first, until all clusters are large enough."""
    while True:
        ids, sizes = assign.unique(return_counts=True)
        if len(ids) == 1 or sizes.min() >= min_count:
            return assign
        small = int(ids[sizes.argmin()])
        means = {int(j): F.normalize(z[assign == j].mean(0), dim=0) for j in ids if int(j) != small}
        target = max(means, key=lambda j: float(means[j] @ F.normalize(z[assign == small].mean(0), dim=0)))
        assign = torch.where(assign == small, torch.tensor(target), assign)
