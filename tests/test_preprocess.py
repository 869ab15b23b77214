"""Cue-removing preprocessing: body and lung crop, intensity standardisation and equalisation, cue and style augmentation (spectrum, grey-level
warp, borders), on synthetic slices with a known body and marks, and on real images from the embedded data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fl_covid.config import Config
from fl_covid.data import decode_image
from fl_covid.errors import ConfigError
from fl_covid.preprocess import (
    body_crop,
    body_mask,
    cue_augment,
    equalize,
    grey_warp,
    lung_crop,
    lung_mask,
    otsu_threshold,
    random_border,
    random_convolution,
    spectrum_jitter,
    standardize,
    style_augment,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
H, W = 180, 260
ELLIPSE = (90, 130, 60, 100)  # centre row, centre column, semi-axes (rows, columns)


def _slice(seed: int = 0, mark: bool = True, link: bool = False) -> np.ndarray:
    """A CT-like slice: a textured tissue ellipse with two dark lungs on black air; optionally a bright text-like
    block in the top-left corner, and a 1-px line linking it to the body."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    cy, cx, ry, rx = ELLIPSE
    body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    img = np.where(body, rng.normal(170, 12, (H, W)), rng.normal(6, 2, (H, W)))
    for lx in (cx - 45, cx + 45):
        lung = ((yy - cy) / (0.7 * ry)) ** 2 + ((xx - lx) / 35) ** 2 <= 1
        img = np.where(lung, rng.normal(45, 10, (H, W)), img)
    if mark:
        img[5:20, 5:40] = 255
    if link:
        img[12, 40:cx + 1] = 255
        img[12:cy, cx] = 255
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _ellipse_box() -> tuple[int, int]:
    _, _, ry, rx = ELLIPSE
    return 2 * ry + 1, 2 * rx + 1


def test_otsu_splits_a_bimodal_histogram():
    img = np.concatenate([np.full(500, 30), np.full(300, 200)]).astype(np.uint8).reshape(40, 20)
    assert 30 <= otsu_threshold(img) < 200


@pytest.mark.parametrize("link", [False, True])
def test_body_crop_drops_the_corner_mark_and_keeps_the_body(link: bool):
    img = _slice(link=link)
    mask = body_mask(img)
    assert not mask[5:20, 5:40].any()  # the mark is not body, even when a thin line joins it to the body
    cy, cx, _, _ = ELLIPSE
    assert mask[cy, cx - 45] and mask[cy, cx + 45]  # lungs are inside the filled body
    out = body_crop(img)
    hb, wb = _ellipse_box()
    margin = round(0.02 * W)
    assert out.dtype == np.uint8 and out.shape[0] == out.shape[1]
    assert wb <= out.shape[1] <= wb + 2 * margin + 2  # the longer side of the body box, not the image's 260
    assert (out == 255).sum() <= link * W  # the corner block is gone (at most a piece of the linking line is left)
    tissue = (img > 120) & (img < 250)
    assert abs(int(((out > 120) & (out < 250)).sum()) - int(tissue.sum())) < 0.01 * tissue.sum()  # body intact
    # aspect kept: the body box (hb x wb) sits inside the square; above and below it is padding at the air level
    pad = (out.shape[0] - (hb + 2 * margin)) // 2
    assert pad > 10 and out[:pad - 2].max() <= 15 and out[-(pad - 2):].max() <= 15


def test_body_crop_falls_back_to_the_whole_image_and_fill_is_used():
    img = np.full((60, 100), 5, np.uint8)
    img[28:32, 48:52] = 200  # a 16-px "body": implausibly small
    out = body_crop(img, fill=77)
    assert out.shape == (100, 100)
    assert np.array_equal(out[20:80], img) and (out[:20] == 77).all() and (out[80:] == 77).all()
    const = np.full((30, 30), 9, np.uint8)
    assert np.array_equal(body_crop(const), const)
    with pytest.raises(ValueError, match="grey uint8"):
        body_crop(img.astype(np.float32))


def _lungs(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two lungs of ``_slice`` (rows, columns of the image's grid): (H, W) bool each."""
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    cy, cx, ry, _ = ELLIPSE
    return tuple(((yy - cy) / (0.7 * ry)) ** 2 + ((xx - lx) / 35) ** 2 <= 1 for lx in (cx - 45, cx + 45))


def test_lung_mask_finds_both_lungs_with_their_infiltrates_and_not_the_air():
    img = _slice()
    left, right = _lungs(img)
    cy, cx, _, _ = ELLIPSE
    img[cy - 10:cy + 10, cx - 72:cx - 58] = 170  # a dense infiltrate inside the left lung ...
    img[cy + 12:cy + 18, cx - 79:cx - 70] = 170  # ... and a smaller one biting into its edge
    mask = lung_mask(img)
    lungs = left | right
    assert (mask & lungs).sum() >= 0.99 * lungs.sum()
    assert mask[cy - 10:cy + 10, cx - 72:cx - 58].all() and mask[cy + 12:cy + 18, cx - 76:cx - 70].mean() >= 0.8
    assert (mask & ~lungs).sum() <= 0.1 * lungs.sum()  # hardly any tissue, no air, no mark
    assert not mask[:, :20].any() and not mask[5:20, 5:40].any()


def test_lung_mask_of_a_slice_cropped_to_the_chest_keeps_lungs_that_touch_the_frame():
    img = _slice(mark=False)
    cy, cx, ry, _ = ELLIPSE
    chest = img[cy - ry + 5:cy + ry - 5, cx - 70:cx + 70]  # the lungs reach the left and right edges
    left, right = (lung[cy - ry + 5:cy + ry - 5, cx - 70:cx + 70] for lung in _lungs(img))
    mask = lung_mask(chest)
    assert (mask & left).sum() >= 0.97 * left.sum() and (mask & right).sum() >= 0.97 * right.sum()
    assert (mask & ~(left | right)).sum() <= 0.1 * (left | right).sum()


def test_lung_crop_keeps_the_lungs_alone_and_falls_back_to_the_whole_image():
    img = _slice()
    out = lung_crop(img)
    left, right = _lungs(img)
    cols = np.flatnonzero((left | right).any(axis=0))
    assert out.dtype == np.uint8 and out.shape[0] == out.shape[1]
    assert cols[-1] - cols[0] + 1 <= out.shape[1] <= cols[-1] - cols[0] + 2 * round(0.02 * W) + 12
    assert out.max() < 120  # neither tissue nor the mark: lung grey levels and black
    lung_pixels = out[out > 0]
    assert abs(lung_pixels.mean() - img[left | right].mean()) < 3  # the lungs' own grey levels are kept
    const = np.full((30, 40), 9, np.uint8)
    assert np.array_equal(lung_crop(const)[5:35], const) and (lung_crop(const)[:5] == 0).all()
    with pytest.raises(ValueError, match="grey uint8"):
        lung_crop(img.astype(np.float32))


def test_lung_crop_in_decoding_and_config(tmp_path: Path):
    path = tmp_path / "slice.png"
    Image.fromarray(_slice()).save(path)
    out = decode_image(path, 32, Config(lung_crop=True).preprocessing)
    plain = decode_image(path, 32)
    assert out.shape == plain.shape == (32, 32) and out.max() < plain.max()  # the bright mark and tissue are gone
    with pytest.raises(ConfigError, match="lung-crop"):
        Config(lung_crop=True, body_crop=True)


def test_standardize_undoes_linear_intensity_changes():
    img = _slice(mark=False)
    f = img.astype(np.float64)
    variants = [img, np.rint(0.6 * f + 50).astype(np.uint8), np.clip(np.rint(1.3 * f - 8), 0, 255).astype(np.uint8)]
    outs = [standardize(v) for v in variants]
    assert all(o.dtype == np.uint8 and o.shape == img.shape for o in outs)
    for o in outs[1:]:
        assert np.abs(o.astype(int) - outs[0].astype(int)).mean() < 2.0
    assert np.abs(variants[1].astype(int) - img.astype(int)).mean() > 20  # the inputs really differ
    body = body_mask(img)
    lo, hi = np.percentile(outs[0][body], (1, 99))
    assert lo <= 2 and hi >= 253  # the body spans the full range
    const = np.full((20, 20), 40, np.uint8)
    assert np.array_equal(standardize(const), const)
    with pytest.raises(ValueError, match="low < high"):
        standardize(img, 50, 10)


def test_equalize_undoes_any_increasing_intensity_change_and_flattens_the_histogram():
    img = _slice(mark=False)
    f = img.astype(np.float64) / 255.0
    variants = [img, np.rint(255 * f ** 2.2).astype(np.uint8), np.rint(0.5 * 255 * f + 60).astype(np.uint8)]
    outs = [equalize(v) for v in variants]
    assert all(o.dtype == np.uint8 and o.shape == img.shape for o in outs)
    for o in outs[1:]:  # gamma and a linear squeeze: the same output up to merged grey levels
        assert np.abs(o.astype(int) - outs[0].astype(int)).mean() < 3.0
    assert np.abs(variants[1].astype(int) - img.astype(int)).mean() > 20  # the inputs really differ
    body = outs[0][body_mask(img)]
    assert abs(np.median(body) - 128) <= 8 and abs(np.percentile(body, 25) - 64) <= 12  # flat histogram
    assert np.array_equal(equalize(np.full((20, 20), 40, np.uint8)), np.full((20, 20), 128, np.uint8))
    with pytest.raises(ValueError, match="grey uint8"):
        equalize(img.astype(np.int16))


def test_equalize_in_decoding_and_config(tmp_path: Path):
    path = tmp_path / "slice.png"
    Image.fromarray(np.rint(0.4 * _slice(mark=False) + 30).astype(np.uint8)).save(path)
    plain = decode_image(path, 32)
    out = decode_image(path, 32, Config(equalize=True).preprocessing)
    assert out.shape == plain.shape == (32, 32) and out.dtype == np.uint8
    assert out.max() - out.min() > 1.5 * (plain.max() - plain.min())  # the squeezed range is spread out again
    with pytest.raises(ConfigError, match="equalize"):
        Config(equalize=True, standardize=True)


def _batch(n: int = 12, size: int = 64) -> torch.Tensor:
    imgs = [np.asarray(Image.fromarray(_slice(seed=i, mark=False)).resize((size, size))) for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).unsqueeze(1)


@pytest.mark.parametrize("jpeg", [False, True])
def test_cue_augment_is_deterministic_and_changes_pixels(jpeg: bool):
    x = _batch()
    a = cue_augment(x, torch.Generator().manual_seed(3), 1.0, jpeg=jpeg)
    b = cue_augment(x, torch.Generator().manual_seed(3), 1.0, jpeg=jpeg)
    c = cue_augment(x, torch.Generator().manual_seed(4), 1.0, jpeg=jpeg)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = (a != x).flatten(1).float().mean(1)  # (B,) fraction of pixels changed per image
    assert (changed > 0.2).sum() >= x.shape[0] // 2  # each operation hits about half of the images
    assert torch.equal(x, _batch())  # the input is not modified


def test_cue_augment_jpeg_adds_to_the_same_draws_and_strength_zero_is_identity():
    x = _batch()
    plain = cue_augment(x, torch.Generator().manual_seed(5), 1.0)
    with_jpeg = cue_augment(x, torch.Generator().manual_seed(5), 1.0, jpeg=True)
    same = [torch.equal(plain[i], with_jpeg[i]) for i in range(len(x))]
    assert any(same) and not all(same)  # only the images drawn for re-compression differ
    g = torch.Generator().manual_seed(6)
    assert torch.equal(cue_augment(x, g, 0.0, jpeg=True), x)
    with pytest.raises(ValueError, match="strength"):
        cue_augment(x, g, 1.5)
    with pytest.raises(ValueError, match="uint8"):
        cue_augment(x.float(), g)
    with pytest.raises(ValueError, match="uint8"):
        cue_augment(x.expand(-1, 3, -1, -1), g)


def test_cue_augment_weak_strength_changes_less():
    x = _batch(16)
    weak = cue_augment(x, torch.Generator().manual_seed(7), 0.2)
    strong = cue_augment(x, torch.Generator().manual_seed(7), 1.0)
    diff = [(y.int() - x.int()).abs().float().mean() for y in (weak, strong)]
    assert 0 < diff[0] < diff[1]


def test_spectrum_jitter_rescales_low_frequency_amplitudes_keeps_the_phase_and_the_image_real():
    x = 0.3 + 0.4 * _batch(4).float() / 255.0  # mid-grey: nothing reaches the clamp
    noise = 2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 1
    y = spectrum_jitter(x, noise, band=0.1, change=0.2)
    assert ((y > 0) & (y < 1)).all()
    ratio = torch.fft.fft2(y) / torch.fft.fft2(x)  # real (phase kept) and the image real: y is exactly the jitter
    freq = torch.fft.fftfreq(x.shape[-1]).abs()
    low = (freq[:, None] <= 0.1) & (freq[None, :] <= 0.1)
    assert ratio.imag.abs().max() < 1e-3
    assert (ratio.real[..., ~low] - 1).abs().max() < 1e-3  # high frequencies untouched
    band = ratio.real[..., low]
    assert band.min() >= 0.8 - 1e-3 and band.max() <= 1.2 + 1e-3 and (band - 1).abs().mean() > 0.03
    assert torch.equal(spectrum_jitter(x, torch.zeros_like(x), 0.1, 0.3), spectrum_jitter(x, noise, 0.1, 0.0))


def test_grey_warp_is_monotone_through_its_knots_and_borders_are_set():
    x = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(2, 1, 64, 64).contiguous()
    inner = torch.tensor([[0.2, 0.5, 0.9], [0.25, 0.5, 0.75]])
    y = grey_warp(x, inner)
    assert (y[..., 1:] >= y[..., :-1]).all() and y.min() == 0 and y.max() == 1
    torch.testing.assert_close(y[1], x[1])  # knots at k / K: the identity
    torch.testing.assert_close(grey_warp(torch.full((2, 1, 2, 2), 0.25), inner)[:, 0, 0, 0], torch.tensor([0.2, 0.25]))
    z = random_border(x, torch.tensor([[3, 0, 0, 5], [0, 0, 0, 0]]), torch.tensor([0.7, 0.1]))
    assert (z[0, 0, :3] == 0.7).all() and (z[0, 0, :, -5:] == 0.7).all() and torch.equal(z[0, 0, 3:, :-5], x[0, 0, 3:, :-5])
    assert torch.equal(z[1], x[1])


def test_style_augment_is_deterministic_changes_pixels_and_draws_a_fixed_amount():
    x = _batch()
    a = style_augment(x, torch.Generator().manual_seed(3), 1.0)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, style_augment(x, torch.Generator().manual_seed(3), 1.0))
    assert not torch.equal(a, style_augment(x, torch.Generator().manual_seed(4), 1.0))
    assert (a != x).flatten(1).any(1).float().mean() > 0.6  # each of 3 operations hits about half the images
    g0, g1 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(style_augment(x, g0, 0.0), x)
    style_augment(x, g1, 0.7)
    assert torch.equal(torch.rand(3, generator=g0), torch.rand(3, generator=g1))  # the same draws at any strength
    weak, strong = (style_augment(x, torch.Generator().manual_seed(7), s) for s in (0.2, 1.0))
    assert 0 < (weak.int() - x.int()).abs().float().mean() < (strong.int() - x.int()).abs().float().mean()
    with pytest.raises(ValueError, match="strength"):
        style_augment(x, g0, 1.5)
    with pytest.raises(ValueError, match="band"):
        style_augment(x, g0, 1.0, band=0.0)


def test_augmentation_from_the_config_composes_cue_then_style():
    x = _batch()
    config = Config(cue_augment=0.5, style_augment=0.8, spectrum_band=0.2)
    g = torch.Generator().manual_seed(9)
    expected = style_augment(cue_augment(x, g, 0.5), g, 0.8, 0.2)
    assert torch.equal(config.augmentation(x, torch.Generator().manual_seed(9)), expected)
    g = torch.Generator().manual_seed(9)
    assert torch.equal(Config().augmentation(x, g), x) and torch.equal(
        torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(9)))


def test_real_images_from_the_embedded_data():
    images = []
    for site in ("site_a_sarscov2", "site_b_covidct"):
        root = REPO_ROOT / "data" / site
        with open(root / "manifest.csv", newline="", encoding="utf-8") as f:
            row = next(r for r in csv.DictReader(f) if r["label"] == "NonCOVID")
        img = np.asarray(Image.open(root / row["path"]).convert("L"))
        lungs = lung_mask(img)
        assert 0.2 * img.size <= lungs.sum() <= 0.8 * img.size  # the lungs, neither nothing nor the whole slice
        crop = body_crop(img)
        assert crop.dtype == np.uint8 and crop.shape[0] == crop.shape[1] <= max(img.shape)
        # the crop keeps the whole body: as much body as in the full image (no resizing in between)
        assert body_mask(crop).sum() >= 0.9 * body_mask(img).sum()
        out = standardize(crop)
        lo, hi = np.percentile(out[body_mask(out)], (1, 99))
        assert lo <= 5 and hi >= 250
        images.append(np.asarray(Image.fromarray(out).resize((64, 64))))
    x = torch.from_numpy(np.stack(images)).unsqueeze(1)
    a = cue_augment(x, torch.Generator().manual_seed(0), 1.0, jpeg=True)
    assert torch.equal(a, cue_augment(x, torch.Generator().manual_seed(0), 1.0, jpeg=True))


def test_random_convolution_changes_texture_keeps_mean_and_is_seeded():
    x = _batch()
    out = random_convolution(x, torch.Generator().manual_seed(3), 1.0)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, random_convolution(x, torch.Generator().manual_seed(3), 1.0))
    diff = (out.float() - x.float()).abs().mean(dim=(1, 2, 3))
    assert (diff > 1.0).float().mean() >= 0.75  # nearly every image changes (a mixing weight near 1 may not)
    assert (out.float().mean(dim=(1, 2, 3)) - x.float().mean(dim=(1, 2, 3))).abs().max() < 12  # mean kept
    assert torch.equal(random_convolution(x, torch.Generator().manual_seed(3), 0.0), x)
    some = random_convolution(x, torch.Generator().manual_seed(3), 0.5)
    changed = (some != x).flatten(1).any(dim=1)
    assert 0 < int(changed.sum()) < len(x)
    with pytest.raises(ValueError, match="uint8"):
        random_convolution(x.float(), torch.Generator(), 1.0)
    with pytest.raises(ValueError, match="probability"):
        random_convolution(x, torch.Generator(), 1.5)
    with pytest.raises(ConfigError, match="random-convolution"):
        Config(random_convolution=2.0)
    assert Config(random_convolution=0.5).augmentation.randconv == 0.5
