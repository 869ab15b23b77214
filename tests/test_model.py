"""Redesigned COVID-Net: size, shapes, cost, wiring, per-site BN and the BN/shared state split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.flop_counter import FlopCounterMode

from fl_covid.data import random_crops
from fl_covid.engine import recalibrate_bn
from fl_covid.model import PEPX, STAGE_BLOCKS, bn_keys, create_model, load_partial, local_keys


@pytest.fixture(scope="module")
def full_model() -> nn.Module:
    """The paper's model: width 1.0, both heads, eval mode."""
    torch.manual_seed(0)
    return create_model("redesigned", 1.0).eval()


@pytest.fixture(scope="module")
def full_outputs(full_model: nn.Module) -> dict[str, torch.Tensor | int]:
    """One counted pass of two 224 px images through the trunk and both heads."""
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        features = full_model.forward_features(x)
        logits = full_model.forward_head(features)
        z = full_model.project(features)
    return {"features": features, "logits": logits, "z": z, "flops": counter.get_total_flops()}


def small_model(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_model("redesigned", kwargs.pop("width", 0.125), **kwargs)


def test_parameter_count_matches_paper(full_model: nn.Module) -> None:
    n = sum(p.numel() for p in full_model.parameters())
    assert abs(n - 48.7e6) / 48.7e6 < 0.01, n


def test_shapes_at_full_width(full_outputs: dict) -> None:
    features, logits, z = full_outputs["features"], full_outputs["logits"], full_outputs["z"]
    assert features.shape == (2, 8192)
    assert logits.shape == (2, 2)
    assert z.shape == (2, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    # Logits, not probabilities: no softmax inside the head, so rows do not sum to 1.
    assert not torch.allclose(logits.sum(dim=1), torch.ones(2), atol=1e-3)
    assert not torch.allclose(logits, logits.softmax(dim=1))


def test_forward_is_features_then_head() -> None:
    model = small_model().eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))


def test_macs_match_paper(full_outputs: dict) -> None:
    # FlopCounterMode counts 2 FLOPs per multiply-accumulate; the pass above held 2 images.
    macs = full_outputs["flops"] / 2 / 2
    assert abs(macs - 6.15e9) / 6.15e9 < 0.05, macs


def test_original_covidnet_has_no_bn_and_flattens_7x7() -> None:
    torch.manual_seed(0)
    model = create_model("covidnet", 0.125, image_size=224).eval()
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    assert bn_keys(model) == set()
    last = {}
    model.stages[-1][-1].register_forward_hook(lambda m, i, o: last.setdefault("out", o))
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 224, 224))
        logits = model.forward_head(features)
    channels = last["out"].shape[1]
    assert last["out"].shape[2:] == (7, 7)
    assert features.shape == (2, channels * 7 * 7) == (2, model.embed_dim)
    assert logits.shape == (2, 2)
    with pytest.raises(ValueError, match="projection head"):
        model.project(features)


def test_pepx_is_five_convolutions_without_bn_or_activation() -> None:
    torch.manual_seed(0)
    block = PEPX(32, 64)
    layers = list(block.body)
    assert len(layers) == 5 and all(type(m) is nn.Conv2d for m in layers)
    assert [m.kernel_size for m in layers] == [(1, 1), (1, 1), (3, 3), (1, 1), (1, 1)]
    assert [(m.in_channels, m.out_channels) for m in layers] == [(32, 16), (16, 24), (24, 24), (24, 16), (16, 64)]
    assert layers[2].groups == 24  # depthwise
    assert not any(isinstance(m, (_BatchNorm, nn.ReLU)) for m in block.modules())
    # No activation: the block is affine, f(a + b) - f(b) == f(a) - f(0).
    a, b = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)
    zero = torch.zeros_like(a)
    with torch.no_grad():
        torch.testing.assert_close(block(a + b) - block(b), block(a) - block(zero), atol=1e-5, rtol=1e-4)


def test_bn_only_in_stem_upper_branch_and_heads() -> None:
    model = small_model()
    for stage in model.stages:
        assert not any(isinstance(m, _BatchNorm) for m in stage.modules())
    assert any(isinstance(m, _BatchNorm) for m in model.stem.modules())
    assert all(any(isinstance(m, _BatchNorm) for m in up.modules()) for up in model.upper)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.classifier.modules()) == 2
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.projector.modules()) == 1


def test_dense_wiring_follows_spec() -> None:
    """Each block sees the stage's upper tensor plus all earlier blocks; each stage starts from the pooled sum
    of the previous one; each upper conv reads the previous stage's sum; the embedding pools the last sum."""
    model = small_model().eval()
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, inputs: bool):
        def hook(module, args, out):
            seen[name] = args[0] if inputs else out
        return hook

    model.stem.register_forward_hook(keep("stem", False))
    for i, (upper, blocks) in enumerate(zip(model.upper, model.stages)):
        upper.register_forward_hook(keep(f"upper{i}.in", True))
        upper.register_forward_hook(keep(f"upper{i}.out", False))
        for j, block in enumerate(blocks):
            block.register_forward_hook(keep(f"b{i}.{j}.in", True))
            block.register_forward_hook(keep(f"b{i}.{j}.out", False))
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 64, 64))

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    prev_sum = F.max_pool2d(seen["stem"], 2)
    for i, n in enumerate(STAGE_BLOCKS):
        close(seen[f"upper{i}.in"], prev_sum)
        top = seen[f"upper{i}.out"] if i == 0 else F.max_pool2d(seen[f"upper{i}.out"], 2)
        close(seen[f"b{i}.0.in"], prev_sum if i == 0 else F.max_pool2d(prev_sum, 2))
        total = top + seen[f"b{i}.0.out"]
        for j in range(1, n):
            close(seen[f"b{i}.{j}.in"], total)
            total = total + seen[f"b{i}.{j}.out"]
        prev_sum = total
    close(features, torch.flatten(F.adaptive_avg_pool2d(prev_sum, 2), 1))


def test_every_stage3_block_reaches_the_output() -> None:
    """The reference code dropped pepx3_3 from stage 4's input; here every stage-3 block must matter."""
    model = small_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model.forward_features(x)
        for block in model.stages[2]:
            bias = block.body[-1].bias
            bias.add_(1.0)
            after = model.forward_features(x)
            bias.sub_(1.0)
            assert not torch.allclose(before, after)


def test_site_bn_keeps_separate_statistics() -> None:
    model = small_model(num_sites=2)
    stem_bns = model.stem[1].bns
    before = [bn.running_mean.clone() for bn in stem_bns]
    model.train()
    model(torch.randn(4, 3, 64, 64) + 3.0, site=0)
    assert not torch.equal(stem_bns[0].running_mean, before[0])
    torch.testing.assert_close(stem_bns[1].running_mean, before[1], rtol=0, atol=0)
    # Each site's BN owns its own parameters and buffers in the state dict.
    keys = bn_keys(model)
    assert {k for k in keys if ".bns.0." in k} and {k.replace(".bns.0.", ".bns.1.") for k in keys
                                                   if ".bns.0." in k} <= keys
    # Site 1 now normalises with its own (untouched) statistics: different eval outputs for the same input.
    model.eval()
    x = torch.randn(2, 3, 64, 64) + 3.0
    with torch.no_grad():
        assert not torch.allclose(model(x, site=0), model(x, site=1))
    with pytest.raises(ValueError, match="site index 2"):
        model(x, site=2)


class _Renamed(nn.Module):
    """BN hidden under a conv-like name, and a Linear named 'bn': selection must go by type."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.BatchNorm2d(4)
        self.bn = nn.Linear(4, 4)
        self.norm_layer = nn.Sequential(nn.BatchNorm1d(4))


def test_bn_keys_select_by_type_not_name() -> None:
    keys = bn_keys(_Renamed())
    expected = {f"{prefix}.{name}" for prefix in ("conv", "norm_layer.0")
                for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert keys == expected
    assert not any(k.startswith("bn.") for k in keys)


def split_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(shared, local) tensors of ``model``'s state dict, local ones by ``local_keys``."""
    local = local_keys(model)
    state = model.state_dict()
    return {k: v for k, v in state.items() if k not in local}, {k: v for k, v in state.items() if k in local}


def test_split_state_partitions_state_dict() -> None:
    model = small_model(num_sites=2)
    shared, local = split_state(model)
    state = model.state_dict()
    assert set(shared) | set(local) == set(state)
    assert not set(shared) & set(local)
    assert set(local) == bn_keys(model)
    assert any(k.startswith("classifier.") for k in shared) and any(k.startswith("projector.") for k in shared)
    assert not any("running_mean" in k or "bns" in k for k in shared)


def test_load_partial_loads_shared_and_checks_keys() -> None:
    source, target = small_model(), create_model("redesigned", 0.125)
    shared, local = split_state(source)
    bn_before = {k: v.clone() for k, v in target.state_dict().items() if k in local}
    load_partial(target, shared, set(local))
    state = target.state_dict()
    for k, v in shared.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    for k, v in bn_before.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)

    missing_one = dict(shared)
    missing_one.pop(next(iter(k for k in shared if k.startswith("classifier."))))
    with pytest.raises(ValueError, match="partial load mismatch"):
        load_partial(target, missing_one, set(local))
    with pytest.raises(ValueError, match="partial load mismatch"):
        load_partial(target, {**shared, "not.a.key": torch.zeros(1)}, set(local))
    with pytest.raises(ValueError, match="partial load mismatch"):
        load_partial(target, shared, set())


def test_bn_re_estimation_through_the_training_transform_sees_the_training_crops() -> None:
    """crops=generator: the statistics of exactly the crops (and flips) that generator draws, as if those crops
    had been passed through the evaluation transform at their own size (a resize to the same size is the
    identity); without it, the whole images resized: other statistics."""
    images = torch.randint(0, 256, (12, 1, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    models = [create_model("redesigned", 0.125, 1, image_size=32) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    recalibrate_bn(models[0], images, 32, crops=torch.Generator().manual_seed(5))
    recalibrate_bn(models[1], random_crops(images, 32, torch.Generator().manual_seed(5)), 32)
    recalibrate_bn(models[2], images, 32)
    stats = [{k: v for k, v in m.state_dict().items() if "running" in k} for m in models]
    for k in stats[0]:
        torch.testing.assert_close(stats[0][k], stats[1][k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(stats[0][k], stats[2][k]) for k in stats[0])
