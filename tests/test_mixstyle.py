"""MixStyle against dataset cues: the feature-statistics mix and the hook that applies it in training only."""

from __future__ import annotations

import pytest
import torch

from fl_covid.config import ConfigError, load_config
from fl_covid.engine import Chunk, make_optimizer, predict, train_steps
from fl_covid.model import create_model, mix_styles, styles_mixed
from fl_covid.objective import Objective

SIZE = 64


def test_mix_styles_mixes_per_image_statistics_and_keeps_content() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 6, 6, generator=g) * torch.arange(1, 9.0).view(8, 1, 1, 1) + torch.arange(8.0).view(8, 1, 1, 1)
    out = mix_styles(x, torch.Generator().manual_seed(1), 1.0)
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert torch.equal(out, mix_styles(x, torch.Generator().manual_seed(1), 1.0))  # seeded
    mu, out_mu = x.mean(dim=(2, 3)), out.mean(dim=(2, 3))
    assert (out_mu >= mu.min() - 1e-4).all() and (out_mu <= mu.max() + 1e-4).all()  # mixes of the batch's means
    def norm(t: torch.Tensor) -> torch.Tensor:  # the content: each image's standardised pattern
        return (t - t.mean(dim=(2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(norm(out), norm(x), atol=1e-3, rtol=1e-3)
    assert mix_styles(x, torch.Generator().manual_seed(1), 0.0) is x
    same = torch.randn(1, 4, 6, 6, generator=g).repeat(5, 1, 1, 1)  # one style: nothing to mix
    torch.testing.assert_close(mix_styles(same, torch.Generator().manual_seed(2), 1.0), same, atol=1e-4, rtol=1e-4)


def _chunks() -> list[Chunk]:
    g = torch.Generator().manual_seed(4)
    return [Chunk(0, torch.randint(0, 256, (6, 1, 72, 72), dtype=torch.uint8, generator=g),
                  torch.tensor([0, 1, 1, 0, 1, 0]))]


def _trained(mixstyle: float) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("redesigned", 0.125, 1, image_size=SIZE)
    train_steps(model, make_optimizer(model, 1e-3), _chunks, 2, Objective(), image_size=SIZE, grad_clip=5.0,
                generator=torch.Generator().manual_seed(3), mixstyle=mixstyle)
    assert not model.stem._forward_hooks  # the mix is gone after training
    return model.state_dict()


def test_train_steps_mix_only_while_training() -> None:
    plain, mixed = _trained(0.0), _trained(1.0)
    assert plain.keys() == mixed.keys()
    assert any(not torch.equal(plain[k], mixed[k]) for k in plain)
    model = create_model("redesigned", 0.125, 1, image_size=SIZE)
    images = _chunks()[0].images
    before = predict(model, images, 0, SIZE)[0]
    with pytest.raises(RuntimeError, match="stop"), styles_mixed(model, 1.0, torch.Generator()):
        assert model.stem._forward_hooks
        raise RuntimeError("stop")
    assert not model.stem._forward_hooks  # removed on an error too
    assert (predict(model, images, 0, SIZE)[0] == before).all()


def test_mixstyle_key_is_checked() -> None:
    with pytest.raises(ConfigError, match="mixstyle"):
        load_config("configs/smoke.yaml", {"mixstyle": 1.5})
    assert load_config("configs/smoke.yaml", {"mixstyle": 0.5}).mixstyle == 0.5
