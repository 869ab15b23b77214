"""Every training method as one frozen record: what it shares, what it keeps per site, which loss terms it adds.

The method name is looked up once (``Config.spec``); every other module asks the record, never the name. A new
method is one record here (plus, where it needs new behaviour, the one function that the record's flag switches).
"""

from __future__ import annotations

from dataclasses import dataclass

SERVER_OPTIMIZERS = ("fedavg", "fedadam", "fedyogi", "fedavgm")


@dataclass(frozen=True)
class Method:
    """What a method does. Federated methods run as a Flower federation, centralized ones in one process.

    ``shares_bn``: BN tensors travel and are averaged like any weight (FedAvg); otherwise each site keeps its BN.
    ``pooled``: centralized, one model over the pooled sites (else one model per site).
    ``per_site_bn``: centralized and pooled, one BN per site (domain-specific BN, SepNorm).
    ``prototypes``: sites exchange per-class prototypes of the projection (the cross-site contrastive term).
    ``contrastive``: NT-Xent over the step's projections (plus the other sites' prototypes when exchanged).
    ``proximal``: FedProx's proximal term on the shared weights (weight ``proximal-mu``).
    ``server_optimizer``: how the server turns the sites' weights into the next global weights (Flower's FedAvg,
    FedAdam, FedYogi or FedAvgM, each averaging with the weights of ``fedavg-weights``).
    """

    name: str
    federated: bool
    summary: str
    shares_bn: bool = False
    pooled: bool = False
    per_site_bn: bool = False
    prototypes: bool = False
    contrastive: bool = False
    proximal: bool = False
    server_optimizer: str = "fedavg"

    def __post_init__(self) -> None:
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"method {self.name}: server_optimizer must be one of {SERVER_OPTIMIZERS}")
        if self.prototypes and not self.contrastive:
            raise ValueError(f"method {self.name}: prototypes are only used by the contrastive term")
        if self.federated and (self.pooled or self.per_site_bn):
            raise ValueError(f"method {self.name}: pooled / per_site_bn describe centralized methods")


_ALL = (
    Method("fedavg", True, "FedAvg: every weight averaged, BN included", shares_bn=True),
    Method("fedbn", True, "FedBN: BN parameters and statistics stay at each site, the rest is averaged"),
    Method("fedbn-proto", True, "FedBN + cross-site prototype contrastive learning (ours)", prototypes=True,
           contrastive=True),
    Method("fedprox", True, "FedProx (proximal term, proximal-mu) with FedBN's local BN", proximal=True),
    Method("fedadam", True, "FedAdam server optimizer with FedBN's local BN", server_optimizer="fedadam"),
    Method("fedyogi", True, "FedYogi server optimizer with FedBN's local BN", server_optimizer="fedyogi"),
    Method("fedavgm", True, "FedAvgM (server momentum) with FedBN's local BN", server_optimizer="fedavgm"),
    Method("single", False, "Single: one model per site, trained on that site alone"),
    Method("joint", False, "Joint: one model on the pooled sites, shared BN", pooled=True),
    Method("sepnorm", False, "SepNorm: one model on the pooled sites, one BN per site", pooled=True,
           per_site_bn=True),
    Method("contrastive", False, "Contrastive joint learning (the paper's method): SepNorm + NT-Xent over "
           "16 + 16 images per step", pooled=True, per_site_bn=True, contrastive=True),
)
METHODS: dict[str, Method] = {m.name: m for m in _ALL}
FEDERATED_METHODS = tuple(m.name for m in _ALL if m.federated)
CENTRAL_METHODS = tuple(m.name for m in _ALL if not m.federated)


def get_method(name: str) -> Method:
    """The record of ``name``; KeyError naming the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
