"""Cheap per-image statistics a network could use instead of the lungs: intensity histogram, border and padding,
annotation marks, sharpness and JPEG grid strength of a grey image.

The shortcut audit (``fl_covid.experiments.audit``) measures how well they predict the label inside and across
sites; the shift check (``fl_covid.shift``) compares a new hospital's images with a site's training images on them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

FRAME = 0.05  # border frame width, as a fraction of each side
FLAT_STD = 2.0  # a row or column with a grey-level std below this is padding
DARK, BRIGHT = 10, 245  # near-black / near-white grey levels
MARK_RANGE = 128  # a 3x3 neighbourhood spanning this many grey levels is a sharp mark (text, arrow, line)
JPEG_BLOCK = 8

PIXEL_FEATURES = (
    "aspect", "mean", "std", "p01", "p05", "p50", "p95", "p99", "black", "white", "levels",
    "border_mean", "border_std", "centre_mean", "centre_std", "border_minus_centre", "border_dark",
    "border_bright", "letterbox_rows", "letterbox_cols", "border_marks", "marks", "sharpness", "blockiness",
)
PIXEL_DESCRIPTIONS = {
    "aspect": "width / height of the image file",
    "mean": "mean grey level", "std": "grey-level standard deviation",
    "p01": "1st percentile", "p05": "5th percentile", "p50": "median", "p95": "95th percentile",
    "p99": "99th percentile",
    "black": "fraction of pixels = 0", "white": "fraction of pixels = 255",
    "levels": "distinct grey levels used / 256",
    "border_mean": "mean of the 5% frame", "border_std": "std of the 5% frame",
    "centre_mean": "mean of the central half", "centre_std": "std of the central half",
    "border_minus_centre": "border_mean - centre_mean",
    "border_dark": f"fraction of frame pixels <= {DARK}", "border_bright": f"fraction of frame pixels >= {BRIGHT}",
    "letterbox_rows": f"flat rows (std < {FLAT_STD}) at top and bottom / height",
    "letterbox_cols": "flat columns at left and right / width",
    "border_marks": f"fraction of frame pixels whose 3x3 range >= {MARK_RANGE} (text, marks)",
    "marks": "the same over the whole image",
    "sharpness": "mean |Laplacian| / (std + 1): low for upscaled or blurred images",
    "blockiness": "8x8 JPEG grid strength at the source's scale (~1: none)",
}


def _amplitude(profile: np.ndarray, f: float) -> float:
    """|DFT| of a (N,) profile at ``f`` cycles per sample (any real frequency, not only the FFT bins)."""
    return float(abs(np.exp(-2j * np.pi * f * np.arange(profile.size)) @ profile))


def blockiness(image: np.ndarray, period: float = JPEG_BLOCK) -> float:
    """JPEG grid strength of a grey (H, W) image whose blocks are ``period`` px wide (8 x decoded / source scale).

    The mean absolute second difference per column (and per row) peaks every ``period`` px when the image holds
    JPEG block edges (second differences, unlike first ones, are small on smooth content, so a small step between
    blocks stands out); the result is the Fourier amplitude of that profile at 1 / period divided by the mean
    amplitude at six nearby off-grid frequencies, averaged over both axes: about 1 without a grid, well above 1
    with one. NaN when the period is under 3 px (the grid is lost in downscaling) or a side holds < 4 periods.
    """
    if period < 3:
        return math.nan
    a = np.asarray(image, dtype=np.float32)
    ratios = []
    for axis in (1, 0):
        profile = np.abs(np.diff(a, n=2, axis=axis)).mean(axis=1 - axis)  # (W-2,) for axis 1, (H-2,) for axis 0
        if profile.size < 4 * period:
            continue
        profile = profile - profile.mean()
        f0 = 1.0 / period
        ref = np.mean([_amplitude(profile, f0 * (1 + d)) for d in (-0.25, -0.17, -0.09, 0.09, 0.17, 0.25)])
        ratios.append(_amplitude(profile, f0) / (ref + 1e-6))
    return float(np.mean(ratios)) if ratios else math.nan


def _flat_run(flat: np.ndarray) -> int:
    """Length of the run of True at the start of ``flat`` plus the run at its end (whole length if all True)."""
    if flat.all():
        return int(flat.size)
    return int(np.argmin(flat) + np.argmin(flat[::-1]))


def image_features(image: np.ndarray, block_period: float = JPEG_BLOCK) -> dict[str, float]:
    """The pixel statistics of PIXEL_FEATURES (see DESCRIPTIONS) of one grey uint8 (H, W) image.

    ``block_period``: the JPEG block size in this image's pixels (8 when decoded at the source's size)."""
    img = np.asarray(image)
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"image_features needs a grey uint8 (H, W) array, got {img.dtype} {img.shape}")
    h, w = img.shape
    a = img.astype(np.float32)
    bh, bw = max(1, round(FRAME * h)), max(1, round(FRAME * w))
    frame = np.ones((h, w), dtype=bool)
    frame[bh:h - bh, bw:w - bw] = False
    border = a[frame]
    centre = a[h // 4:h - h // 4, w // 4:w - w // 4]
    pct = np.percentile(a, (1, 5, 50, 95, 99))
    local_range = ndimage.maximum_filter(a, 3) - ndimage.minimum_filter(a, 3)
    marks = local_range >= MARK_RANGE
    std = float(a.std())
    return {
        "aspect": w / h,
        "mean": float(a.mean()), "std": std,
        "p01": float(pct[0]), "p05": float(pct[1]), "p50": float(pct[2]), "p95": float(pct[3]),
        "p99": float(pct[4]),
        "black": float((img == 0).mean()), "white": float((img == 255).mean()),
        "levels": len(np.unique(img)) / 256.0,
        "border_mean": float(border.mean()), "border_std": float(border.std()),
        "centre_mean": float(centre.mean()), "centre_std": float(centre.std()),
        "border_minus_centre": float(border.mean() - centre.mean()),
        "border_dark": float((border <= DARK).mean()), "border_bright": float((border >= BRIGHT).mean()),
        "letterbox_rows": _flat_run(a.std(axis=1) < FLAT_STD) / h,
        "letterbox_cols": _flat_run(a.std(axis=0) < FLAT_STD) / w,
        "border_marks": float(marks[frame].mean()), "marks": float(marks.mean()),
        "sharpness": float(np.abs(ndimage.laplace(a)).mean() / (std + 1.0)),
        "blockiness": blockiness(img, block_period),
    }


def image_statistics(images: torch.Tensor, features: tuple[str, ...] = PIXEL_FEATURES) -> np.ndarray:
    """``features`` (of PIXEL_FEATURES) of every cached image: uint8 (N, 1, R, R) -> float64 (N, len(features)).

    JPEG blocks are taken to be 8 px at this size (a cached image no longer knows its source's scale)."""
    if images.ndim != 4 or images.shape[1] != 1 or images.dtype != torch.uint8:
        raise ValueError(f"image_statistics needs uint8 (N, 1, R, R) images, got {images.dtype} {tuple(images.shape)}")
    out = np.empty((len(images), len(features)), dtype=np.float64)
    for i, image in enumerate(images.numpy()):
        stats = image_features(image[0])
        out[i] = [stats[f] for f in features]
    return out


CUE_TARGETS = ("mean", "std", "p05", "p50", "p95", "border_mean", "centre_mean", "border_minus_centre", "black",
               "white")


def batch_cues(crops: torch.Tensor) -> torch.Tensor:
    """The CUE_TARGETS statistics of a batch of training crops, as the network sees them: uint8 (B, 1, S, S) ->
    float32 (B, len(CUE_TARGETS)), grey levels in [0, 1] (fractions for black / white).

    The torch counterpart of ``image_features`` for the cues the audit found most predictive (intensity histogram,
    border against centre, padding), cheap enough for every training step; frame and centre as there."""
    if crops.ndim != 4 or crops.shape[1] != 1 or crops.dtype != torch.uint8:
        raise ValueError(f"batch_cues needs uint8 (B, 1, S, S) crops, got {crops.dtype} {tuple(crops.shape)}")
    _, _, h, w = crops.shape
    x = crops[:, 0].float() / 255.0  # (B, S, S)
    flat = x.flatten(1)
    bh, bw = max(1, round(FRAME * h)), max(1, round(FRAME * w))
    frame = torch.ones(h, w, dtype=torch.bool, device=crops.device)
    frame[bh:h - bh, bw:w - bw] = False
    border = x[:, frame].mean(1)
    centre = x[:, h // 4:h - h // 4, w // 4:w - w // 4].flatten(1).mean(1)
    pct = torch.quantile(flat, torch.tensor([0.05, 0.5, 0.95], device=crops.device), dim=1)  # (3, B)
    return torch.stack([flat.mean(1), flat.std(1, correction=0), pct[0], pct[1], pct[2], border, centre, border - centre,
                        (crops[:, 0] == 0).flatten(1).float().mean(1),
                        (crops[:, 0] == 255).flatten(1).float().mean(1)], dim=1)
