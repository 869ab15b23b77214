"""Grad-CAM: exact on an analytic model, finds a planted signal after training, works on a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from fl_covid.centralized import run_central
from fl_covid.config import load_config
from fl_covid.data import load_configured_site
from fl_covid.experiments.gradcam import choose_images, grad_cam, main
from fl_covid.model import create_model

SITE_B = "site_b_covidct"


def test_matches_the_closed_form_of_a_linear_head_on_pooled_maps() -> None:
    """logit_k = sum_c W_kc mean_hw A_c gives dlogit/dA_c = W_kc / (h w), so the map is ReLU(sum_c W_kc A_c)."""
    torch.manual_seed(0)
    layer, head = nn.Identity(), nn.Linear(4, 2, bias=False)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return head(layer(x).mean((2, 3)))

    x = torch.randn(3, 4, 9, 7)
    for target in (0, 1):
        expected = torch.relu(torch.einsum("c,bchw->bhw", head.weight[target].detach(), x))
        expected = expected / expected.amax((1, 2), keepdim=True)
        cam = grad_cam(forward, layer, x, target)
        assert cam.shape == (3, 9, 7)
        assert torch.allclose(cam, expected, atol=1e-6)
    predicted = forward(x).argmax(1)
    cam = grad_cam(forward, layer, x, None)
    for i, k in enumerate(predicted.tolist()):
        assert torch.allclose(cam[i], grad_cam(forward, layer, x[i:i + 1], k)[0], atol=1e-6)
    assert not layer._forward_hooks  # the hook is removed again


def planted(n: int, gen: torch.Generator, size: int = 32, side: int = 6
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images (n, 1, size, size); label 1 adds a bright side x side square at a random place (row, col)."""
    x = torch.randn(n, 1, size, size, generator=gen) * 0.3
    y = torch.randint(0, 2, (n,), generator=gen)
    pos = torch.randint(0, size - side + 1, (n, 2), generator=gen)
    for i in torch.nonzero(y).flatten().tolist():
        r, c = pos[i].tolist()
        x[i, 0, r:r + side, c:c + side] += 2.0
    return x, y, pos


def test_highlights_a_planted_square_after_a_few_training_steps() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        x, y, _ = planted(32, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y, pos = planted(64, gen)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.95  # the model did learn the square
    cam = grad_cam(model, model[3], x, 1)
    assert cam.shape == (64, 32, 32) and cam.min() >= 0 and cam.max() <= 1
    hits, ratios = [], []
    for i in torch.nonzero(y).flatten().tolist():
        r, c = pos[i].tolist()
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[r:r + 6, c:c + 6] = True
        peak = divmod(int(cam[i].argmax()), 32)
        hits.append(r - 1 <= peak[0] <= r + 6 and c - 1 <= peak[1] <= c + 6)
        ratios.append(float(cam[i][inside].mean() / cam[i][~inside].mean().clamp_min(1e-6)))
    assert sum(hits) / len(hits) >= 0.9
    assert sorted(ratios)[len(ratios) // 2] > 10  # median: the square is much brighter than the rest


def test_covidnet_last_stage_map_has_the_input_shape() -> None:
    torch.manual_seed(0)
    model = create_model("redesigned", 0.125, 1, image_size=64).eval()
    cam = grad_cam(model, model.last_stage, torch.randn(2, 3, 64, 64))
    assert cam.shape == (2, 64, 64)
    assert cam.min() >= 0 and cam.max() <= 1
    assert not model.last_stage._forward_hooks


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real centralized run on 24 embedded Site B images at 64 px (last stage 2 x 2)."""
    out = tmp_path_factory.mktemp("gradcam-runs")
    config = load_config("configs/smoke.yaml", {"sites": SITE_B, "image-size": 64, "output-dir": str(out)})
    return run_central(config, "joint", show_progress=False)


def test_cli_writes_a_grid_of_test_fold_images(tiny_run: Path, tmp_path: Path) -> None:
    config = load_config(None, json.loads((tiny_run / "config.json").read_text()))
    site, split = load_configured_site(config, 0)
    chosen = choose_images(site, split, 4, config.seed)
    assert set(chosen) <= set(split.test.tolist())
    assert site.labels[chosen].tolist() == [1, 1, 0, 0]
    out = tmp_path / "cams.png"
    assert main(["--run", str(tiny_run), "--site", SITE_B, "--n", "4", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.width > 1.5 * im.height  # four columns, two rows
    assert main(["--run", str(tiny_run), "--site", "site_a_sarscov2", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["--run", str(tiny_run), "--site", SITE_B, "--paths", "COVID/none.png", "--out",
                 str(tmp_path / "y.png")]) == 2
