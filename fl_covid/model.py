"""Redesigned COVID-Net (Wang, Liu, Dou, JBHI 2020) and the original COVID-Net, with per-site BatchNorm, and the
site-specific parts of the paper's Table I comparators: residual adapters (series, Rebuffi et al. NeurIPS 2017;
parallel, Rebuffi et al. CVPR 2018) and MS-Net's auxiliary branches (Liu et al. IEEE TMI 2020).

Shapes at width 1.0 and a 224 x 224 input: stem (B, 64, 56, 56); stages (B, 256|512|1024|2048, 56|28|14|7);
embedding (B, 8192) = 2048 channels average-pooled to 2 x 2; logits (B, 2); projection (B, 128), unit norm;
auxiliary logits (B, 2) from the stage-3 output (B, 1024, 14, 14).

Every site-specific module (``SiteBatchNorm``, ``SiteAdapter``, ``AuxiliaryBranch``) holds one copy per site in a
ModuleList and uses the copy ``select_site`` chose; ``local_keys`` finds their tensors by type.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fl_covid.config import Config
from fl_covid.cues import CUE_TARGETS
from fl_covid.methods import ADAPTERS
from fl_covid.seeding import derive

STAGE_CHANNELS = (256, 512, 1024, 2048)
STAGE_BLOCKS = (3, 4, 6, 3)
STEM_CHANNELS = 64
ARCHS = ("redesigned", "covidnet")
AUX_STAGE = 2  # MS-Net's auxiliary branches read the output of stage 3 (index 2)


class PerSite(nn.Module):
    """A module with one copy per site in the ModuleList named ``SITES``; ``site`` picks the copy to use."""

    SITES = ""
    site: int

    def copies(self) -> nn.ModuleList:
        return getattr(self, self.SITES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.copies()[self.site](x)


class SiteBatchNorm(PerSite):
    """Domain-specific BN: one BatchNorm (parameters and running statistics) per site, chosen per forward."""

    SITES = "bns"

    def __init__(self, bn_type: type[_BatchNorm], num_features: int, num_sites: int) -> None:
        super().__init__()
        self.bns = nn.ModuleList(bn_type(num_features) for _ in range(num_sites))
        self.site = 0


class SiteAdapter(PerSite):
    """Residual adapter: one site-specific 1x1 convolution per site (same stride and groups as the convolution it
    adapts, so a depthwise convolution gets a depthwise 1x1, i.e. a per-channel scale and bias).

    Weights and bias start at zero, so an adapted network starts as the plain backbone; the adapter's gradient
    is not zero (its input, the shared convolution's input or output, is not), so it learns from the first step.
    Created without drawing from the random generator: a backbone with adapters gets the same shared weights as
    the plain backbone from the same seed.
    """

    SITES = "convs"

    def __init__(self, in_channels: int, out_channels: int, num_sites: int, stride: int = 1, groups: int = 1
                 ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.utils.skip_init(nn.Conv2d, in_channels, out_channels, 1, stride=stride, groups=groups,
                               device=torch.get_default_device())
            for _ in range(num_sites))
        for conv in self.convs:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.site = 0


class AdaptedConv2d(nn.Conv2d):
    """A shared convolution with a site-specific residual adapter ``a``: ``series`` y = c + a(c) with c = conv(x)
    (Rebuffi et al. 2017, without the adapter's BN: the adapted convolutions have none in this backbone);
    ``parallel`` y = conv(x) + a(x) (Rebuffi et al. 2018). The shared weight and bias keep the plain
    convolution's names, so shared state dicts are those of the backbone."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, mode: str, num_sites: int,
                 stride: int = 1, padding: int = 0, groups: int = 1) -> None:
        if mode not in ("series", "parallel"):
            raise ValueError(f"adapter mode must be 'series' or 'parallel', got {mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups)
        self.mode = mode
        self.adapter = (SiteAdapter(out_channels, out_channels, num_sites, groups=groups) if mode == "series" else
                        SiteAdapter(in_channels, out_channels, num_sites, stride=stride, groups=groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = super().forward(x)
        return c + self.adapter(c if self.mode == "series" else x)


def conv2d(in_channels: int, out_channels: int, kernel_size: int, *, adapter: str = "none", num_sites: int = 1,
           stride: int = 1, padding: int = 0, groups: int = 1) -> nn.Conv2d:
    """A plain convolution (``adapter`` "none") or one with a site-specific residual adapter."""
    if adapter == "none":
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups)
    return AdaptedConv2d(in_channels, out_channels, kernel_size, mode=adapter, num_sites=num_sites, stride=stride,
                         padding=padding, groups=groups)


class AuxiliaryBranch(PerSite):
    """MS-Net's domain-specific auxiliary branches, adapted to classification: per site, the stage-3 output
    (B, C, h, w) average-pooled to 2 x 2 (as the embedding) -> flatten -> linear -> logits (B, num_classes).

    Each site's branch is trained with CE on that site's images; the universal head learns from it by
    distillation (fl_covid.engine.train_steps). Not used at evaluation."""

    SITES = "heads"

    def __init__(self, channels: int, num_sites: int, num_classes: int = 2) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(1), nn.Linear(4 * channels, num_classes))
            for _ in range(num_sites))
        self.site = 0


class CueHead(PerSite):
    """Per site, a small regressor of an image's cue statistics (``fl_covid.cues.batch_cues``) from its embedding:
    (B, embed_dim) -> (B, num_cues). Trained through a gradient reversal (``fl_covid.losses.CueAdversarialLoss``)
    so that the embedding stops carrying the cues; site-specific (never leaves a site), not used at evaluation."""

    SITES = "heads"

    def __init__(self, embed_dim: int, num_cues: int, num_sites: int, hidden: int = 64) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_cues))
            for _ in range(num_sites))
        self.site = 0


class PEPX(nn.Module):
    """Projection-expansion-projection-extension block: five convolutions, no BN, no activation inside.

    ``adapter`` "series" / "parallel" adds a site-specific residual adapter to the depthwise 3x3 convolution."""

    def __init__(self, n_in: int, n_out: int, adapter: str = "none", num_sites: int = 1) -> None:
        super().__init__()
        mid = 3 * n_in // 4
        self.body = nn.Sequential(
            nn.Conv2d(n_in, n_in // 2, 1),
            nn.Conv2d(n_in // 2, mid, 1),
            conv2d(mid, mid, 3, padding=1, groups=mid, adapter=adapter, num_sites=num_sites),
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

    ``adapter`` "series" / "parallel": a site-specific residual adapter (``SiteAdapter``) on exactly these
    convolutions: the stem's 7x7 convolution (a full 1x1: 64 -> 64 after it, or 3 -> 64 with stride 2 beside it)
    and the depthwise 3x3 convolution of every PEPX block (16 blocks; a depthwise 1x1 of its channels). The
    upper-branch and the PEPX 1x1 convolutions and the heads are not adapted. Zero-initialised: at construction
    the network computes the plain backbone's function. ``auxiliary``: MS-Net's per-site auxiliary branches on
    the stage-3 output (``AuxiliaryBranch``, read by ``forward_features_and_auxiliary``). ``num_cues`` > 0: a
    per-site ``CueHead`` on the embedding (read by ``predict_cues``).
    """

    def __init__(
        self,
        redesigned: bool = True,
        width: float = 1.0,
        num_sites: int = 1,
        num_classes: int = 2,
        proj_dim: int = 128,
        image_size: int = 224,
        adapter: str = "none",
        auxiliary: bool = False,
        num_cues: int = 0,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if num_sites < 1:
            raise ValueError(f"num_sites must be >= 1, got {num_sites}")
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
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
        self.stem = nn.Sequential(conv2d(3, stem_c, 7, stride=2, padding=3, adapter=adapter, num_sites=num_sites),
                                  bn(stem_c), nn.ReLU(inplace=True))
        ins = [stem_c, *stage_c[:-1]]
        self.upper = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 1), bn(c_out), nn.ReLU(inplace=True))
            for c_in, c_out in zip(ins, stage_c)
        )
        self.stages = nn.ModuleList(
            nn.ModuleList(PEPX(c_in if i == 0 else c_out, c_out, adapter, num_sites) for i in range(n))
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
        # built last, so that the backbone's weights are the same with and without it for the same seed
        self.auxiliary = AuxiliaryBranch(stage_c[AUX_STAGE], num_sites, num_classes) if auxiliary else None
        self.cue_head = CueHead(self.embed_dim, num_cues, num_sites) if num_cues > 0 else None

    def select_site(self, site: int) -> None:
        """Route every per-site module (BN, adapter, auxiliary branch) to ``site`` for the following passes."""
        if not 0 <= site < self.num_sites:
            raise ValueError(f"site index {site} out of range for a model with {self.num_sites} site(s)")
        for m in self.modules():
            if isinstance(m, PerSite):
                m.site = site

    def forward_features(self, x: torch.Tensor, site: int = 0) -> torch.Tensor:
        """x: (B, 3, S, S) normalised images -> embedding (B, embed_dim)."""
        return self._trunk(x, site, False)[0]

    def forward_features_and_auxiliary(self, x: torch.Tensor, site: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, S, S) -> (embedding (B, embed_dim), logits of ``site``'s auxiliary branch (B, num_classes))."""
        if self.auxiliary is None:
            raise ValueError("this model has no auxiliary branches; build it for a method with auxiliary=True")
        return self._trunk(x, site, True)  # type: ignore[return-value]  # aux is set when asked for

    def _trunk(self, x: torch.Tensor, site: int, auxiliary: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.select_site(site)
        aux = None
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
            if auxiliary and i == AUX_STAGE:
                aux = self.auxiliary(x)
        x = self.last_stage(x)
        if self.redesigned:
            return torch.flatten(F.adaptive_avg_pool2d(x, 2), 1), aux
        return torch.flatten(x, 1), aux

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

    def predict_cues(self, features: torch.Tensor, site: int = 0) -> torch.Tensor:
        """features: (B, embed_dim) -> ``site``'s prediction of the images' cue statistics (B, num_cues)."""
        if self.cue_head is None:
            raise ValueError("this model has no cue head; build it with num_cues > 0 (config key cue-adversarial)")
        self.select_site(site)
        return self.cue_head(features)

    def forward(self, x: torch.Tensor, site: int = 0) -> torch.Tensor:
        """x: (B, 3, S, S) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x, site), site)


def create_model(
    arch: str, width: float = 1.0, num_sites: int = 1, num_classes: int = 2, image_size: int = 224,
    adapter: str = "none", auxiliary: bool = False, num_cues: int = 0,
) -> COVIDNet:
    """Build ``arch`` in {"redesigned", "covidnet"}; ``image_size`` matters only for the original's flatten."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return COVIDNet(arch == "redesigned", width, num_sites, num_classes, image_size=image_size, adapter=adapter,
                    auxiliary=auxiliary, num_cues=num_cues)


MIXSTYLE_ALPHA = 0.1  # MixStyle's Beta(alpha, alpha) mixing weights (Zhou et al., ICLR 2021)


def mix_styles(x: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """MixStyle on features (B, C, H, W) -> (B, C, H, W): with ``probability`` (one draw per call), every image's
    per-channel mean and standard deviation are replaced by a mix of its own and those of another image of the batch
    (a random permutation), with a weight ~ Beta(0.1, 0.1) per image; the statistics are detached, as in the paper.
    Otherwise, or with fewer than 2 images, ``x`` unchanged. The random numbers come from ``generator`` (a CPU
    generator) in a fixed amount per call."""
    b = x.shape[0]
    u = float(torch.rand(1, generator=generator))
    perm = torch.randperm(b, generator=generator)
    seed = int(torch.randint(2 ** 31, (1,), generator=generator))
    if u >= probability or b < 2:
        return x
    lam = torch.from_numpy(np.random.default_rng(seed).beta(MIXSTYLE_ALPHA, MIXSTYLE_ALPHA, b)).to(x)
    lam = lam.view(b, 1, 1, 1)
    mu = x.mean(dim=(2, 3), keepdim=True).detach()
    sigma = (x.var(dim=(2, 3), keepdim=True) + 1e-6).sqrt().detach()
    return (x - mu) / sigma * (lam * sigma + (1 - lam) * sigma[perm]) + lam * mu + (1 - lam) * mu[perm]


@contextmanager
def styles_mixed(model: COVIDNet, probability: float, generator: torch.Generator) -> Iterator[None]:
    """Within the block, the stem's output goes through ``mix_styles`` (``probability`` > 0; else nothing changes):
    training only, so evaluation, BN re-estimation and prototypes never see it."""
    if probability <= 0:
        yield
        return
    hook = model.stem.register_forward_hook(lambda _module, _inputs, out: mix_styles(out, generator, probability))
    try:
        yield
    finally:
        hook.remove()


def build_model(config: Config, num_sites: int = 1) -> COVIDNet:
    """The network of ``config``: architecture, width, image size and its method's site-specific parts
    (adapters, auxiliary branches) and the cue head of ``cue-adversarial`` > 0, with ``num_sites`` copies of every
    per-site module."""
    spec = config.spec
    return create_model(config.arch, config.width, num_sites, image_size=config.image_size, adapter=spec.adapter,
                        auxiliary=spec.auxiliary, num_cues=len(CUE_TARGETS) if config.cue_adversarial > 0 else 0)


def bn_keys(model: nn.Module) -> set[str]:
    """Names of every BatchNorm parameter and buffer in ``model``, found by module type, never by name."""
    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                keys.add(f"{prefix}.{name}" if prefix else name)
    return keys


def local_keys(model: nn.Module) -> set[str]:
    """Names of every site-specific tensor, found by module type: BN parameters and statistics (``bn_keys``) and
    every parameter and buffer of the residual adapters, auxiliary branches and cue heads. None of them leaves a site under
    FedBN; FedAvg shares the BN ones only."""
    keys = bn_keys(model)
    for prefix, module in model.named_modules():
        if isinstance(module, (SiteAdapter, AuxiliaryBranch, CueHead)):
            keys.update(f"{prefix}.{name}" if prefix else name for name in module.state_dict())
    return keys


def _site_copies(model: COVIDNet) -> dict[str, tuple[str, int]]:
    """Every tensor of a per-site module's copy -> (its name in a one-site model, the copy's site index):
    ``...bns.<j>.x`` -> (``...bns.0.x``, j), likewise ``convs`` and ``heads``."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, PerSite):
            base = f"{prefix}.{module.SITES}" if prefix else module.SITES
            for j, copy in enumerate(module.copies()):
                for name in copy.state_dict():
                    out[f"{base}.{j}.{name}"] = (f"{base}.0.{name}", j)
    return out


def one_site_state(model: COVIDNet, site: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of a one-site model (``build_model(config, 1)``) holding ``model``'s weights with the
    per-site modules (BN, adapters, auxiliary branches) of site index ``site``: ``...bns.<site>.x`` becomes
    ``...bns.0.x`` (likewise ``convs`` and ``heads``), the other sites' copies are left out."""
    if not 0 <= site < model.num_sites:
        raise ValueError(f"site index {site} out of range for a model with {model.num_sites} site(s)")
    copies = _site_copies(model)
    out = {}
    for name, t in model.state_dict().items():
        target, j = copies.get(name, (name, site))
        if j == site:
            out[target] = t.detach().cpu().clone()
    return out


def initial_model(config: Config, num_sites: int = 1) -> COVIDNet:
    """The network of ``config`` with the initial weights of its seed, the same in every driver: a one-site model
    drawn from the random stream ``init`` (``fl_covid.seeding``), which the server and every federated site build;
    with ``num_sites`` > 1 (a pooled centralized model), every site's copy of the per-site modules (BN, adapters,
    auxiliary branches) starts as that model's, as the same site's does in a federation. The global random
    generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive(config.seed, "init"))
        one_site = build_model(config)
        if num_sites == 1:
            return one_site
        model = build_model(config, num_sites)
    state = one_site.state_dict()
    copies = _site_copies(model)
    model.load_state_dict({name: state[copies.get(name, (name, 0))[0]] for name in model.state_dict()})
    return model


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
