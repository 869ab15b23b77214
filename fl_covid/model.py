"""Redesigned COVID-Net (Wang, Liu, Dou, JBHI 2020) and the original COVID-Net, with per-site BatchNorm.

Shapes at width 1.0 and a 224 x 224 input: stem (B, 64, 56, 56); stages (B, 256|512|1024|2048, 56|28|14|7);
embedding (B, 8192) = 2048 channels average-pooled to 2 x 2; logits (B, 2); projection (B, 128), unit norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

STAGE_CHANNELS = (256, 512, 1024, 2048)
STAGE_BLOCKS = (3, 4, 6, 3)
STEM_CHANNELS = 64
ARCHS = ("redesigned", "covidnet")


class SiteBatchNorm(nn.Module):
    """Domain-specific BN: one BatchNorm (parameters and running statistics) per site, chosen per forward."""

    def __init__(self, bn_type: type[_BatchNorm], num_features: int, num_sites: int) -> None:
        super().__init__()
        self.bns = nn.ModuleList(bn_type(num_features) for _ in range(num_sites))
        self.site = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bns[self.site](x)


class PEPX(nn.Module):
    """Projection-expansion-projection-extension block: five convolutions, no BN, no activation inside."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        mid = 3 * n_in // 4
        self.body = nn.Sequential(
            nn.Conv2d(n_in, n_in // 2, 1),
            nn.Conv2d(n_in // 2, mid, 1),
            nn.Conv2d(mid, mid, 3, padding=1, groups=mid),
            nn.Conv2d(mid, n_in // 2, 1),
            nn.Conv2d(n_in // 2, n_out, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class COVIDNet(nn.Module):
    """COVID-Net trunk with dense PEPX wiring, plus a classifier head and (redesigned only) a projection head.

    ``redesigned=True`` is the paper's network: BN in the stem, the upper branch and the heads, a 2 x 2 pooled
    embedding and a projection head. ``redesigned=False`` is the original COVID-Net: no BN, flatten at 7 x 7
    (so its input must be 224 px / width-independent 7 x 7 at the last stage), classifier head only.
    """

    def __init__(
        self,
        redesigned: bool = True,
        width: float = 1.0,
        num_sites: int = 1,
        num_classes: int = 2,
        proj_dim: int = 128,
        image_size: int = 224,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if num_sites < 1:
            raise ValueError(f"num_sites must be >= 1, got {num_sites}")
        self.redesigned = redesigned
        self.num_sites = num_sites
        self.proj_dim = proj_dim

        def ch(c: int) -> int:
            return max(8, int(round(c * width / 8)) * 8)

        def bn(c: int, one_d: bool = False) -> nn.Module:
            if not redesigned:
                return nn.Identity()
            return SiteBatchNorm(nn.BatchNorm1d if one_d else nn.BatchNorm2d, c, num_sites)

        stem_c, stage_c = ch(STEM_CHANNELS), [ch(c) for c in STAGE_CHANNELS]
        self.stem = nn.Sequential(nn.Conv2d(3, stem_c, 7, stride=2, padding=3), bn(stem_c), nn.ReLU(inplace=True))
        ins = [stem_c, *stage_c[:-1]]
        self.upper = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 1), bn(c_out), nn.ReLU(inplace=True))
            for c_in, c_out in zip(ins, stage_c)
        )
        self.stages = nn.ModuleList(
            nn.ModuleList(PEPX(c_in if i == 0 else c_out, c_out) for i in range(n))
            for c_in, c_out, n in zip(ins, stage_c, STAGE_BLOCKS)
        )
        self.embed_dim = stage_c[-1] * (4 if redesigned else (image_size // 32) ** 2)
        hid1, hid2 = ch(1024), ch(256)
        self.classifier = nn.Sequential(
            nn.Linear(self.embed_dim, hid1), bn(hid1, True), nn.ReLU(inplace=True),
            nn.Linear(hid1, hid2), bn(hid2, True), nn.ReLU(inplace=True),
            nn.Linear(hid2, num_classes),
        )
        self.projector = (
            nn.Sequential(nn.Linear(self.embed_dim, hid1), bn(hid1, True), nn.ReLU(inplace=True),
                          nn.Linear(hid1, proj_dim))
            if redesigned else None
        )
        self.last_stage = nn.Identity()  # hook point: the last stage's output (B, C, h, w), e.g. for Grad-CAM

    def select_site(self, site: int) -> None:
        """Route every per-site BN to ``site`` for the following forward passes."""
        if not 0 <= site < self.num_sites:
            raise ValueError(f"site index {site} out of range for a model with {self.num_sites} site(s)")
        for m in self.modules():
            if isinstance(m, SiteBatchNorm):
                m.site = site

    def forward_features(self, x: torch.Tensor, site: int = 0) -> torch.Tensor:
        """x: (B, 3, S, S) normalised images -> embedding (B, embed_dim)."""
        self.select_site(site)
        x = F.max_pool2d(self.stem(x), 2)
        for i, (upper, blocks) in enumerate(zip(self.upper, self.stages)):
            # Upper branch: a 1x1 conv of the previous stage's sum (reference COVID-Net), added to every block input.
            top = upper(x)
            if i > 0:
                x, top = F.max_pool2d(x, 2), F.max_pool2d(top, 2)
            total, inp = top, x
            for block in blocks:
                total = total + block(inp)
                inp = total
            x = total
        x = self.last_stage(x)
        if self.redesigned:
            return torch.flatten(F.adaptive_avg_pool2d(x, 2), 1)
        return torch.flatten(x, 1)

    def forward_head(self, features: torch.Tensor, site: int = 0) -> torch.Tensor:
        """features: (B, embed_dim) -> logits (B, num_classes)."""
        self.select_site(site)
        return self.classifier(features)

    def project(self, features: torch.Tensor, site: int = 0) -> torch.Tensor:
        """features: (B, embed_dim) -> L2-normalised projection (B, proj_dim)."""
        if self.projector is None:
            raise ValueError("the original COVID-Net has no projection head; use arch='redesigned'")
        self.select_site(site)
        return F.normalize(self.projector(features), dim=1)

    def forward(self, x: torch.Tensor, site: int = 0) -> torch.Tensor:
        """x: (B, 3, S, S) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x, site), site)


def create_model(
    arch: str, width: float = 1.0, num_sites: int = 1, num_classes: int = 2, image_size: int = 224
) -> COVIDNet:
    """Build ``arch`` in {"redesigned", "covidnet"}; ``image_size`` matters only for the original's flatten."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return COVIDNet(arch == "redesigned", width, num_sites, num_classes, image_size=image_size)


def bn_keys(model: nn.Module) -> set[str]:
    """Names of every BatchNorm parameter and buffer in ``model``, found by module type, never by name."""
    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                keys.add(f"{prefix}.{name}" if prefix else name)
    return keys


def one_site_state(model: COVIDNet, site: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of a one-site model (``create_model(..., num_sites=1)``) holding ``model``'s weights with
    the BN of site index ``site`` (``...bns.<site>.x`` becomes ``...bns.0.x``)."""
    out = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        if "bns" in parts:
            i = parts.index("bns")
            if int(parts[i + 1]) != site:
                continue
            parts[i + 1] = "0"
        out[".".join(parts)] = t.detach().cpu().clone()
    return out


def split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split the state dict into (shared, bn): BN params and statistics stay local under FedBN."""
    bn = bn_keys(model)
    state = model.state_dict()
    shared = {k: v for k, v in state.items() if k not in bn}
    local = {k: v for k, v in state.items() if k in bn}
    return shared, local


def load_partial(model: nn.Module, tensors: dict[str, torch.Tensor], expect_missing: set[str]) -> None:
    """Load ``tensors`` non-strictly and check that exactly ``expect_missing`` was left out."""
    res = model.load_state_dict(tensors, strict=False)
    # BatchNorm fills in a missing num_batches_tracked itself, so torch never reports it as missing.
    expect_missing = {k for k in expect_missing if not k.endswith(".num_batches_tracked")}
    if set(res.missing_keys) != expect_missing or res.unexpected_keys:
        extra = sorted(set(res.missing_keys) ^ expect_missing)[:5]
        raise ValueError(
            f"partial load mismatch: unexpected keys {res.unexpected_keys[:5]}, missing/extra vs expected {extra}"
        )
