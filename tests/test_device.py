"""The engine's GPU path checked on the CPU: device selection, bf16 autocast dtypes, the input pipeline split
(uint8 crops moved, normalised on the device) and the deferred non-finite loss check. Speed on a GPU is not
measured here (see bench/)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_covid import engine
from fl_covid.config import Config
from fl_covid.data import MEAN, STD, augment, random_crops, to_input
from fl_covid.engine import Chunk, make_optimizer, predict, select_device, train_steps
from fl_covid.losses import NTXentLoss
from fl_covid.model import create_model
from fl_covid.objective import Objective

SIZE, CACHE, BATCH = 32, 36, 6


def _batches(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (BATCH, 1, CACHE, CACHE), dtype=torch.uint8, generator=g), \
        torch.tensor([0, 1] * (BATCH // 2))


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("redesigned", 0.125, 1, image_size=SIZE)


def test_select_device() -> None:
    assert select_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu") == torch.device("cpu")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=r"config key 'device' is 'cuda:\d+' .*CUDA_VISIBLE_DEVICES"):
        select_device(f"cuda:{visible}")


def test_to_input_matches_broadcast_normalisation_and_augment_is_crops_then_input() -> None:
    images, _ = _batches()
    x = images.float() / 255.0
    torch.testing.assert_close(to_input(images), (x.expand(-1, 3, -1, -1) - MEAN) / STD, rtol=0, atol=0)
    crops = random_crops(images, SIZE, torch.Generator().manual_seed(3))
    assert crops.dtype == torch.uint8 and crops.shape == (BATCH, 1, SIZE, SIZE)
    assert torch.equal(to_input(crops), augment(images, SIZE, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_bf16_autocast_keeps_float32_weights_and_float_results(alpha: float) -> None:
    """The CUDA mixed-precision recipe (bf16 autocast, float32 losses and master weights), forced on the CPU."""
    images, labels = _batches()
    results = {}
    for amp in (False, True):
        model = _model()
        objective = Objective(NTXentLoss(0.05) if alpha > 0 else None, alpha,
                              (torch.nn.functional.normalize(torch.randn(2, 128), dim=1), torch.tensor([0, 1])))
        stats = train_steps(model, make_optimizer(model, 1e-3), lambda: [Chunk(0, images, labels)], 3, objective,
                            image_size=SIZE, generator=torch.Generator().manual_seed(1), amp=amp,
                            grad_clip=Config.grad_clip)
        assert all(isinstance(v, float) and np.isfinite(v) for v in stats.values())
        assert all(p.dtype == torch.float32 for p in model.parameters())
        probs, z = predict(model, images, 0, SIZE, with_projections=True, amp=amp)
        assert probs.dtype == np.float32 and z is not None and z.dtype == torch.float32
        assert np.all((probs >= 0) & (probs <= 1))
        torch.testing.assert_close(z.norm(dim=1), torch.ones(BATCH), rtol=0, atol=1e-3)
        results[amp] = stats["loss"], probs
    # bf16 keeps 8 significant bits: same training, small differences
    assert results[True][0] == pytest.approx(results[False][0], rel=0.1)
    assert np.abs(results[True][1] - results[False][1]).max() < 0.1


def test_nonfinite_loss_is_caught_at_the_next_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss is read on the host every FINITE_CHECK_EVERY steps and at the end, not after every step."""
    images, labels = _batches()
    calls = []

    def next_batch() -> list[Chunk]:
        calls.append(1)
        return [Chunk(0, images, labels)]

    model = _model()
    with torch.no_grad():
        model.classifier[-1].bias.fill_(float("nan"))
    monkeypatch.setattr(engine, "FINITE_CHECK_EVERY", 4)
    with pytest.raises(FloatingPointError, match=r"within steps 0\.\.3"):
        train_steps(model, make_optimizer(model, 1e-3), next_batch, 10, Objective(), image_size=SIZE,
                    generator=torch.Generator().manual_seed(1), grad_clip=Config.grad_clip)
    assert len(calls) == 4
    calls.clear()
    model = _model()
    with torch.no_grad():
        model.classifier[-1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"within steps 0\.\.2"):  # fewer steps than the interval
        train_steps(model, make_optimizer(model, 1e-3), next_batch, 3, Objective(), image_size=SIZE,
                    generator=torch.Generator().manual_seed(1), grad_clip=Config.grad_clip)
    assert len(calls) == 3
