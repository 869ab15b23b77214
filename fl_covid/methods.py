"""Every training method as one frozen record: what it shares, what it keeps per site, which loss terms it adds.

The method name is looked up once (``Config.spec``); every other module asks the record, never the name. A new
method is one record here (plus, where it needs new behaviour, the one function that the record's flag switches).
"""

from __future__ import annotations

from dataclasses import dataclass

SERVER_OPTIMIZERS = ("fedavg", "fedadam", "fedyogi", "fedavgm")
ADAPTERS = ("none", "series", "parallel")


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
    ``adapter``: site-specific residual adapters on the stem and depthwise convolutions, "series" (Rebuffi et al.
    2017) or "parallel" (Rebuffi et al. 2018); "none" for the plain backbone.
    ``auxiliary``: MS-Net's site-specific auxiliary branches, trained with CE, distilled into the universal head
    (weight ``msnet-weight``, temperature ``msnet-temperature``).
    ``algorithm``: what the method adds to the round besides its loss terms: its local optimiser, payload both ways
    and server state (``fl_covid.algorithms``; "none": the plain FedBN round).
    Adapters and auxiliary branches are kept per site like per-site BN: one copy per site in a pooled model,
    never shared in a federation.
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
    adapter: str = "none"
    auxiliary: bool = False
    algorithm: str = "none"

    @property
    def site_specific_layers(self) -> bool:
        """Whether the network has site-specific layers besides BN (adapters, auxiliary branches)."""
        return self.adapter != "none" or self.auxiliary

    def __post_init__(self) -> None:
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"method {self.name}: server_optimizer must be one of {SERVER_OPTIMIZERS}")
        if self.prototypes and not self.contrastive:
            raise ValueError(f"method {self.name}: prototypes are only used by the contrastive term")
        if self.federated and (self.pooled or self.per_site_bn):
            raise ValueError(f"method {self.name}: pooled / per_site_bn describe centralized methods")
        if self.algorithm != "none" and not self.federated:
            raise ValueError(f"method {self.name}: an algorithm of the federated round needs a federated method")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"method {self.name}: adapter must be one of {ADAPTERS}")
        if self.site_specific_layers and not self.federated and not (self.pooled and self.per_site_bn):
            raise ValueError(f"method {self.name}: adapters / auxiliary branches are per site: a centralized method "
                             "with them must be pooled with per_site_bn")
        if self.site_specific_layers and self.shares_bn:
            # a site restores its local tensors only when it keeps its BN (fl_covid.federated.SiteRunner._load)
            raise ValueError(f"method {self.name}: adapters / auxiliary branches need the site's BN kept local")


_ALL = (
    Method("fedavg", True, "FedAvg: every weight averaged, BN included", shares_bn=True),
    Method("fedbn", True, "FedBN: BN parameters and statistics stay at each site, the rest is averaged"),
    Method("fedbn-proto", True, "FedBN + cross-site prototype contrastive learning (ours)", prototypes=True,
           contrastive=True),
    Method("fedprox", True, "FedProx (proximal term, proximal-mu) with FedBN's local BN", proximal=True),
    Method("fedadam", True, "FedAdam server optimizer with FedBN's local BN", server_optimizer="fedadam"),
    Method("fedyogi", True, "FedYogi server optimizer with FedBN's local BN", server_optimizer="fedyogi"),
    Method("fedavgm", True, "FedAvgM (server momentum) with FedBN's local BN", server_optimizer="fedavgm"),
    Method("scaffold", True, "SCAFFOLD (control variates against client drift, local SGD at sgd-lr) with FedBN's "
           "local BN", algorithm="scaffold"),
    Method("fedbn-proto-scaffold", True, "FedBN + cross-site prototypes (ours) with SCAFFOLD's drift correction "
           "(local SGD at sgd-lr)", prototypes=True, contrastive=True, algorithm="scaffold"),
    Method("single", False, "Single: one model per site, trained on that site alone"),
    Method("joint", False, "Joint: one model on the pooled sites, shared BN", pooled=True),
    Method("sepnorm", False, "SepNorm: one model on the pooled sites, one BN per site", pooled=True,
           per_site_bn=True),
    Method("contrastive", False, "Contrastive joint learning (the paper's method): SepNorm + NT-Xent over "
           "16 + 16 images per step", pooled=True, per_site_bn=True, contrastive=True),
    Method("series-adapter", False, "Series Adapter (Rebuffi et al. 2017): SepNorm + a site-specific 1x1 "
           "convolution after the stem and every depthwise convolution, in residual form", pooled=True,
           per_site_bn=True, adapter="series"),
    Method("parallel-adapter", False, "Parallel Adapter (Rebuffi et al. 2018): SepNorm + a site-specific 1x1 "
           "convolution beside the stem and every depthwise convolution", pooled=True, per_site_bn=True,
           adapter="parallel"),
    Method("ms-net", False, "MS-Net (Liu et al. 2020) for classification: SepNorm + one auxiliary branch per "
           "site on the stage-3 output (CE on its site's images), distilled into the universal head",
           pooled=True, per_site_bn=True, auxiliary=True),
    # The federated comparators exchange no prototypes: they are Table I's methods as published (joint learning
    # without a cross-site term), so that the gap to fedbn-proto measures the contrastive term's contribution.
    Method("fedbn-series-adapter", True, "FedBN + Series Adapter: BN and the series adapters stay at each site, "
           "the rest is averaged; no prototype exchange (the published comparator has no cross-site term)",
           adapter="series"),
    Method("fedbn-parallel-adapter", True, "FedBN + Parallel Adapter: BN and the parallel adapters stay at each "
           "site, the rest is averaged; no prototype exchange (the published comparator has no cross-site term)",
           adapter="parallel"),
    Method("fedbn-ms-net", True, "FedBN + MS-Net: BN and the site's auxiliary branch stay at the site, the "
           "universal network and head are averaged and distilled from the site's branch during local training; "
           "no prototype exchange (MS-Net transfers knowledge by distillation, not by a cross-site term)",
           auxiliary=True),
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
