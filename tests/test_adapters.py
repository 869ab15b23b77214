"""The Table I comparators on the redesigned backbone: series / parallel residual adapters and MS-Net's auxiliary
branches. Where they sit and how big they are, that an adapted network starts as the backbone, per-site selection,
MS-Net's loss terms, one-site export, and real centralized and federated runs (smoke config, embedded CT images)
in which no adapter or auxiliary tensor leaves a site."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fl_covid import records as R
from fl_covid.centralized import main as central_main
from fl_covid.config import Config, load_config
from fl_covid.data import load_configured_site, random_crops, to_input
from fl_covid.engine import Chunk, evaluate, make_optimizer, train_steps
from fl_covid.errors import ConfigError
from fl_covid.federated import LocalState, shared_keys
from fl_covid.losses import MSNetLoss
from fl_covid.methods import METHODS, Method
from fl_covid.model import (
    PEPX,
    STAGE_BLOCKS,
    STAGE_CHANNELS,
    STEM_CHANNELS,
    AdaptedConv2d,
    AuxiliaryBranch,
    COVIDNet,
    SiteAdapter,
    bn_keys,
    build_model,
    create_model,
    load_partial,
    local_keys,
    one_site_state,
)
from fl_covid.objective import Objective
from fl_covid.site_model import load_site_model
from tests.conftest import SITE_A, SITE_B
from tests.inprocess import run_dir, run_federation

SIZE = 64
ADAPTER_MODES = ("series", "parallel")
CENTRAL = ("series-adapter", "parallel-adapter", "ms-net")
FEDERATED = ("fedbn-series-adapter", "fedbn-parallel-adapter", "fedbn-ms-net")


def small(adapter: str = "none", auxiliary: bool = False, num_sites: int = 2, seed: int = 0) -> COVIDNet:
    torch.manual_seed(seed)
    return create_model("redesigned", 0.125, num_sites, image_size=SIZE, adapter=adapter, auxiliary=auxiliary)


def extra_keys(model: nn.Module) -> set[str]:
    """The site-specific tensors that are not BN: adapters and auxiliary branches."""
    return local_keys(model) - bn_keys(model)


# --- where the adapters sit, and what they cost --------------------------------------------------------------------

@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_adapters_sit_on_the_stem_and_every_depthwise_conv(mode: str) -> None:
    model = small(mode)
    adapted = [m for m in model.modules() if isinstance(m, AdaptedConv2d)]
    depthwise = [block.body[2] for stage in model.stages for block in stage]
    assert len(adapted) == 1 + sum(STAGE_BLOCKS) == 17
    assert adapted[0] is model.stem[0] and adapted[1:] == depthwise
    assert all(isinstance(m, PEPX) for stage in model.stages for m in stage)
    stem_c = model.stem[0].out_channels
    for conv in adapted:
        assert conv.mode == mode and len(conv.adapter.convs) == 2
        for a in conv.adapter.convs:
            assert a.kernel_size == (1, 1) and a.groups == conv.groups and a.out_channels == conv.out_channels
            assert torch.count_nonzero(a.weight) == 0 and torch.count_nonzero(a.bias) == 0  # zero-initialised
            if mode == "series":
                assert a.in_channels == conv.out_channels and a.stride == (1, 1)
            else:
                assert a.in_channels == conv.in_channels and a.stride == conv.stride
    stem_adapter = model.stem[0].adapter.convs[0]
    assert (stem_adapter.in_channels, stem_adapter.stride) == ((stem_c, (1, 1)) if mode == "series" else (3, (2, 2)))
    for conv in depthwise:
        assert conv.groups == conv.in_channels == conv.out_channels  # a depthwise 1x1: per-channel scale and bias
    # nothing else is adapted: every other convolution is a plain Conv2d
    others = [m for m in model.modules() if isinstance(m, nn.Conv2d) and not isinstance(m, AdaptedConv2d)
              and not any(m is a for c in adapted for a in c.adapter.convs)]
    assert all(type(m) is nn.Conv2d for m in others)
    assert len(others) == 4 + 4 * sum(STAGE_BLOCKS)  # upper branches + the four 1x1 of every block


def _mids() -> list[int]:
    """Channels of every PEPX block's depthwise convolution at width 1.0, from the architecture's numbers."""
    ins = [STEM_CHANNELS, *STAGE_CHANNELS[:-1]]
    return [3 * (c_in if i == 0 else c_out) // 4
            for c_in, c_out, n in zip(ins, STAGE_CHANNELS, STAGE_BLOCKS) for i in range(n)]


def count(**kwargs) -> int:
    with torch.device("meta"):  # shapes only
        model = create_model("redesigned", 1.0, **kwargs)
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_at_full_width() -> None:
    backbone = count()
    assert backbone == 48_675_090
    mids = _mids()
    assert len(mids) == 16 and sum(mids) == 9840
    depthwise = sum(2 * m for m in mids)  # a depthwise 1x1 per block: weight and bias per channel
    expected = {  # overhead per site
        "series": STEM_CHANNELS * STEM_CHANNELS + STEM_CHANNELS + depthwise,  # 64 -> 64 after the stem conv
        "parallel": 3 * STEM_CHANNELS + STEM_CHANNELS + depthwise,  # 3 -> 64, stride 2, beside it
        "auxiliary": 4 * STAGE_CHANNELS[2] * 2 + 2,  # stage 3 pooled 2 x 2 -> linear -> 2 logits
    }
    assert expected == {"series": 23_840, "parallel": 19_936, "auxiliary": 8_194}
    for sites in (1, 2):
        base = count(num_sites=sites)
        got = {"series": count(num_sites=sites, adapter="series") - base,
               "parallel": count(num_sites=sites, adapter="parallel") - base,
               "auxiliary": count(num_sites=sites, auxiliary=True) - base}
        assert got == {k: sites * v for k, v in expected.items()}
    percent = {k: 100 * v / backbone for k, v in expected.items()}
    # small: well under a tenth of a percent of the backbone per site (series 0.049 %, parallel 0.041 %,
    # auxiliary branch 0.017 %)
    assert percent["series"] == pytest.approx(0.0490, abs=5e-4)
    assert percent["parallel"] == pytest.approx(0.0410, abs=5e-4)
    assert percent["auxiliary"] == pytest.approx(0.0168, abs=5e-4)


# --- at initialisation an adapted network is the backbone ----------------------------------------------------------

@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_adapted_network_starts_as_the_backbone(mode: str) -> None:
    backbone, adapted = small(seed=0), small(mode, seed=1)
    # the same seed gives the same shared weights with or without adapters (adapters draw no random numbers) ...
    same_seed = small(mode, seed=0)
    state = backbone.state_dict()
    assert all(torch.equal(same_seed.state_dict()[k], v) for k, v in state.items())
    # ... and any backbone's weights loaded into an adapted network give the backbone's function
    load_partial(adapted, state, extra_keys(adapted))
    x = torch.randn(3, 3, SIZE, SIZE)
    for train in (False, True):
        backbone.train(train), adapted.train(train)
        for site in (0, 1):
            with torch.no_grad():
                torch.testing.assert_close(adapted(x, site), backbone(x, site), rtol=0, atol=1e-6)
                f = adapted.forward_features(x, site)
                torch.testing.assert_close(adapted.project(f, site), backbone.project(f, site), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_zero_initialised_adapters_still_learn(mode: str) -> None:
    model = small(mode).train()
    F.cross_entropy(model(torch.randn(4, 3, SIZE, SIZE), 1), torch.tensor([0, 1, 0, 1])).backward()
    for conv in (m for m in model.modules() if isinstance(m, AdaptedConv2d)):
        assert conv.adapter.convs[1].weight.grad.abs().sum() > 0  # the site in use
        assert conv.adapter.convs[0].weight.grad is None  # the other site's copy is not touched


# --- per-site selection --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_adapters_are_chosen_by_site(mode: str) -> None:
    model = small(mode).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        before = [model(x, s) for s in (0, 1)]
        for a in (m for m in model.modules() if isinstance(m, SiteAdapter)):
            a.convs[1].weight.normal_(0, 0.1)
        torch.testing.assert_close(model(x, 0), before[0], rtol=0, atol=0)
        assert not torch.allclose(model(x, 1), before[1])
        assert all(a.site == 1 for a in model.modules() if isinstance(a, SiteAdapter))


def test_auxiliary_branches_are_chosen_by_site() -> None:
    model = small(auxiliary=True).train()
    assert isinstance(model.auxiliary, AuxiliaryBranch) and len(model.auxiliary.heads) == 2
    x = torch.randn(4, 3, SIZE, SIZE)
    features, aux = model.forward_features_and_auxiliary(x, 1)
    assert features.shape == (4, model.embed_dim) and aux.shape == (4, 2)
    torch.testing.assert_close(features, model.forward_features(x, 1))
    aux.sum().backward()
    head0, head1 = (h[-1].weight for h in model.auxiliary.heads)
    assert head0.grad is None and head1.grad.abs().sum() > 0
    with torch.no_grad():  # another site: another branch on the same features
        assert not torch.allclose(model.eval().forward_features_and_auxiliary(x, 0)[1],
                                  model.forward_features_and_auxiliary(x, 1)[1])
    with pytest.raises(ValueError, match="no auxiliary branches"):
        small().forward_features_and_auxiliary(x, 0)


@pytest.mark.parametrize("adapter,auxiliary", [("series", False), ("parallel", False), ("none", True),
                                               ("parallel", True)])
def test_one_site_export_keeps_that_sites_own_modules(adapter: str, auxiliary: bool) -> None:
    pooled = small(adapter, auxiliary).eval()
    with torch.no_grad():  # give every per-site copy distinct values
        for p in pooled.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    x = torch.randn(2, 3, SIZE, SIZE)
    for site in (0, 1):
        one = small(adapter, auxiliary, num_sites=1, seed=5)
        load_partial(one, one_site_state(pooled, site), set())  # complete: nothing missing, nothing extra
        one.eval()
        with torch.no_grad():
            torch.testing.assert_close(one(x), pooled(x, site), rtol=0, atol=0)
            if auxiliary:
                torch.testing.assert_close(one.forward_features_and_auxiliary(x)[1],
                                           pooled.forward_features_and_auxiliary(x, site)[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="site index 2"):
        one_site_state(pooled, 2)


def test_local_keys_go_by_type_and_cover_every_site_specific_tensor() -> None:
    for adapter, auxiliary in (("none", False), ("series", True), ("parallel", False)):
        model = small(adapter, auxiliary)
        keys = local_keys(model)
        by_type = set()
        for prefix, m in model.named_modules():
            if isinstance(m, (SiteAdapter, AuxiliaryBranch)):
                by_type |= {f"{prefix}.{k}" for k in m.state_dict()}
        assert keys == bn_keys(model) | by_type
        assert (adapter == "none" and not auxiliary) == (keys == bn_keys(model))
        # the shared convolutions keep the backbone's names and are not local
        assert "stem.0.weight" not in keys and "stages.0.0.body.2.weight" not in keys


# --- methods and config ---------------------------------------------------------------------------------------------

def test_method_records_and_build_model() -> None:
    config = load_config("configs/smoke.yaml")
    for name, adapter, auxiliary in (("series-adapter", "series", False), ("parallel-adapter", "parallel", False),
                                     ("ms-net", "none", True), ("fedbn-series-adapter", "series", False),
                                     ("fedbn-parallel-adapter", "parallel", False), ("fedbn-ms-net", "none", True)):
        spec = METHODS[name]
        assert (spec.adapter, spec.auxiliary, spec.shares_bn, spec.prototypes) == (adapter, auxiliary, False, False)
        assert spec.federated == name.startswith("fedbn-")
        assert spec.federated or (spec.pooled and spec.per_site_bn)
        model = build_model(config.replace(method=name), 2)
        assert model.num_sites == 2 and model.embed_dim == 4 * 8 * round(2048 * config.width / 8)
        assert any(isinstance(m, AdaptedConv2d) for m in model.modules()) == (adapter != "none")
        assert (model.auxiliary is not None) == auxiliary
    assert extra_keys(build_model(config.replace(method="fedbn"))) == set()
    with pytest.raises(ValueError, match="BN kept local"):
        Method("x", True, "", shares_bn=True, adapter="parallel")
    with pytest.raises(ValueError, match="pooled with per_site_bn"):
        Method("x", False, "", pooled=True, auxiliary=True)
    with pytest.raises(ValueError, match="adapter must be"):
        Method("x", True, "", adapter="bottleneck")


def test_msnet_config_keys_are_validated() -> None:
    config = load_config("configs/smoke.yaml")
    assert (config.msnet_temperature, config.msnet_weight) == (2.0, 0.5)
    assert config.replace(**{"msnet-weight": 0}).msnet_weight == 0
    with pytest.raises(ConfigError, match="msnet-temperature"):
        config.replace(**{"msnet-temperature": 0})
    with pytest.raises(ConfigError, match="msnet-weight"):
        config.replace(**{"msnet-weight": -0.1})


# --- MS-Net's loss -------------------------------------------------------------------------------------------------

def _grads(model: COVIDNet, x: torch.Tensor, y: torch.Tensor, site: int, weight: float | None
           ) -> dict[str, torch.Tensor]:
    """Gradients of CE (+ MS-Net's terms with ``weight``, none when None) for one batch of ``site``."""
    model.zero_grad(set_to_none=True)
    features, aux = model.forward_features_and_auxiliary(x, site)
    logits = model.forward_head(features, site)
    loss = F.cross_entropy(logits, y)
    if weight is not None:
        loss = loss + MSNetLoss(2.0, weight)(logits, aux, y)
    loss.backward()
    return {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()}


def test_msnet_terms_change_the_gradients_and_distillation_is_off_at_weight_zero() -> None:
    model = small(auxiliary=True).train()
    x, y = torch.randn(6, 3, SIZE, SIZE), torch.tensor([0, 1, 0, 1, 1, 0])
    plain, no_kd, kd = (_grads(model, x, y, 1, w) for w in (None, 0.0, 0.5))
    head = [k for k in plain if k.startswith("classifier.")]
    trunk = [k for k in plain if k.startswith(("stem.", "stages.", "upper."))]
    aux1 = [k for k in plain if k.startswith("auxiliary.heads.1.")]
    aux0 = [k for k in plain if k.startswith("auxiliary.heads.0.")]
    # the universal head: distillation changes its gradient; at msnet-weight 0 it is the plain CE gradient
    assert all(torch.equal(no_kd[k], plain[k]) for k in head)
    assert any(not torch.allclose(kd[k], plain[k]) for k in head)
    # the auxiliary branch's CE reaches the shared trunk and trains the site's branch only
    assert any(not torch.allclose(no_kd[k], plain[k]) for k in trunk)
    assert all(plain[k].abs().sum() == 0 for k in aux1) and all(no_kd[k].abs().sum() > 0 for k in aux1)
    assert all(kd[k].abs().sum() == 0 for k in aux0)
    # the branch is the teacher: distillation does not move it
    assert all(torch.allclose(kd[k], no_kd[k], rtol=0, atol=1e-7) for k in aux1)


def _chunks(seed: int) -> list[Chunk]:
    g = torch.Generator().manual_seed(seed)
    return [Chunk(s, torch.randint(0, 256, (4, 1, 72, 72), dtype=torch.uint8, generator=g),
                  torch.tensor([0, 1, 1, 0])) for s in (0, 1)]


@pytest.mark.parametrize("weight", (0.0, 0.5))
def test_train_steps_adds_the_msnet_terms_and_refuses_them_without_auxiliary_branches(weight: float) -> None:
    chunks = _chunks(1)
    model = small(auxiliary=True).train()
    reference = small(auxiliary=True).train()
    # the step's loss as train_steps computes it, from the same crops, before its optimizer step
    g = torch.Generator().manual_seed(3)
    logits, aux, labels = [], [], []
    with torch.no_grad():
        for c in chunks:
            f, a = reference.forward_features_and_auxiliary(to_input(random_crops(c.images, SIZE, g)), c.site)
            logits.append(reference.forward_head(f, c.site)), aux.append(a), labels.append(c.labels)
        logit, label = torch.cat(logits), torch.cat(labels)
        expected = MSNetLoss(2.0, weight)(logit, torch.cat(aux), label)
    objective = Objective(msnet=MSNetLoss(2.0, weight))
    stats = train_steps(model, make_optimizer(model, 1e-3), lambda: chunks, 1, objective, image_size=SIZE,
                        generator=torch.Generator().manual_seed(3), grad_clip=Config.grad_clip)
    assert stats["ce"] == pytest.approx(float(F.cross_entropy(logit, label)), rel=1e-5)
    assert stats["loss"] - stats["ce"] == pytest.approx(float(expected), rel=1e-4)
    plain = small().train()
    with pytest.raises(ValueError, match="no auxiliary branches"):
        train_steps(plain, make_optimizer(plain, 1e-3), lambda: chunks, 1, objective, image_size=SIZE,
                    generator=torch.Generator().manual_seed(3), grad_clip=Config.grad_clip)


# --- real runs -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", CENTRAL)
def test_centralized_run_exports_a_complete_model_per_site(method: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    code = central_main(["--config", "configs/smoke.yaml", "--method", method, "--quiet",
                         "--set", "epochs=1", "--set", f"output-dir={tmp_path}"])
    assert code == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    final = json.loads((run / "final_metrics.json").read_text())
    assert set(final["sites"]) == {SITE_A, SITE_B}
    config = load_config("configs/smoke.yaml", {"method": method, "output-dir": str(tmp_path)})
    models, extras = {}, {}
    for k, name in enumerate(config.sites):
        loaded = load_site_model(run / f"site-{name}" / "model")
        assert loaded.config.method == method and loaded.model.num_sites == 1
        models[name] = loaded.model
        extras[name] = {key: v for key, v in loaded.model.state_dict().items() if key in extra_keys(loaded.model)}
        assert extras[name], "the site model has no adapters / auxiliary branch"
        # the exported one-site model is the pooled model at that site: it reproduces the run's test metrics
        site, split = load_configured_site(loaded.config, k)
        metrics, _ = evaluate(loaded.model, site.images[split.test], site.labels[split.test], 0, config.image_size)
        assert metrics["auc"] == pytest.approx(final["sites"][name]["auc"], abs=1e-9)
        assert metrics["accuracy"] == pytest.approx(final["sites"][name]["accuracy"], abs=1e-9)
    a, b = (models[s].state_dict() for s in (SITE_A, SITE_B))
    shared = set(a) - local_keys(models[SITE_A])
    assert all(torch.equal(a[k], b[k]) for k in shared)  # one pooled network ...
    assert any(not torch.equal(extras[SITE_A][k], extras[SITE_B][k]) for k in extras[SITE_A])  # ... own parts
    if METHODS[method].adapter != "none":  # trained away from their zero start
        assert all(v.abs().sum() > 0 for k, v in extras[SITE_A].items() if k.endswith("weight"))


def holds(flat: np.ndarray, values: np.ndarray) -> bool:
    """Whether ``values`` (1-D) appears as a contiguous run inside ``flat``."""
    starts = np.flatnonzero(flat[: len(flat) - len(values) + 1] == values[0])
    return any(np.array_equal(flat[i:i + len(values)], values) for i in starts)


@pytest.mark.parametrize("method", FEDERATED)
def test_federated_adapters_and_branches_never_leave_a_site(method: str, tmp_path: Path) -> None:
    grid = run_federation(tmp_path, method=method, **{"num-server-rounds": 1})
    config = load_config("configs/smoke.yaml", {"method": method})
    model = build_model(config)
    state = model.state_dict()
    local, extra = local_keys(model), extra_keys(model)
    keys = shared_keys(model, config)
    assert extra and not local & set(keys)
    assert set(keys) == {k for k, v in state.items() if v.is_floating_point()} - local
    size = sum(state[k].numel() for k in keys)
    run = run_dir(tmp_path)
    trains = [d for d in grid.deliveries if d.kind == "train"]
    assert len(trains) == 2
    kept = {}
    for d in trains:
        name = (SITE_A, SITE_B)[d.partition]
        flat = d.reply.content[R.WEIGHTS][R.FLAT].numpy()
        assert flat.shape == (size,)  # exactly the non-local float tensors: no room for anything else
        saved = LocalState.load(run / f"site-{name}" / "state")
        assert saved is not None and saved.round == 1 and set(saved.bn) == local
        kept[name] = {k: v for k, v in saved.bn.items() if k in extra}
        values = [v.numpy().ravel() for v in kept[name].values() if v.numel() > 1 and v.abs().sum() > 0]
        assert values and not any(holds(flat, v) for v in values)
    for msg in grid.sent:
        if R.WEIGHTS in msg.content:
            assert msg.content[R.WEIGHTS][R.FLAT].numpy().shape == (size,)
    assert any(not torch.equal(kept[SITE_A][k], kept[SITE_B][k]) for k in extra)
    final_weights = R.unflatten(grid.delivery(0, 2, "evaluate").message.content[R.WEIGHTS][R.FLAT].numpy(),
                                R.layout_of({k: state[k] for k in keys}))
    for name in (SITE_A, SITE_B):
        loaded = load_site_model(run / f"site-{name}" / "model")
        assert loaded.config.method == method
        own = loaded.model.state_dict()
        assert extra <= set(own)
        assert all(torch.equal(own[k], kept[name][k]) for k in extra)  # its own adapters / branch came back
        assert all(torch.equal(own[k], final_weights[k]) for k in keys)  # with the final global weights
