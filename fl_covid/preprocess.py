"""Preprocessing that removes dataset cues: crop to the body, standardise intensity, augment against the cues.

The two public sites differ in framing (figures cut from papers vs tight scanner crops), borders and padding,
intensity windowing, resolution and JPEG history, and inside each site these differ between COVID and NonCOVID
(``python -m fl_covid.experiments.audit``). These functions take those cues away or randomise them:

- ``body_crop``: grey uint8 (H, W) -> the body's bounding box, padded to a square (aspect kept);
- ``lung_crop``: grey uint8 (H, W) -> the lungs alone (``lung_mask``; everything else black), cropped to their
  bounding box and padded to a square: framing, borders, text and the tissue around the lungs are gone, the lungs'
  own grey levels (their density, the signal of an infiltrate) are kept;
- ``standardize``: grey uint8 (H, W) -> the body's 1st..99th intensity percentiles stretched to 0..255;
- ``equalize``: grey uint8 (H, W) -> every grey level replaced by its mid-rank among the body's pixels (histogram
  equalisation): every image's body then has the same, flat grey-level histogram;
- ``cue_augment``: uint8 batch (B, 1, S, S) -> the same batch with random scale, gamma / contrast, blur and
  (optionally) JPEG re-compression, drawn from a ``torch.Generator``;
- ``style_augment``: uint8 batch (B, 1, S, S) -> the same batch with its low-frequency amplitude spectrum
  randomly rescaled (a band of half-width ``band`` x S around DC: global intensity, vignetting, large-scale
  contrast), a random monotone grey-level warp (the histogram's shape, its percentiles) and random borders;
- ``random_convolution``: uint8 batch (B, 1, S, S) -> the same batch passed through a random convolution (RandConv,
  Xu et al. ICLR 2021): local texture, sharpness and contrast polarity randomised, shapes kept.

The first four are NumPy functions for decoding time (one image, before the square resize; ``Preprocessing`` says
which of them, and which DICOM window, make a file a cached image); the last three run on cached batches like
``fl_covid.data.random_crops``, in training only (config keys ``cue-augment``, ``style-augment``,
``spectrum-band``, ``random-convolution``), each image with its own random numbers: no spectrum or statistic of
an image is used beyond it, so nothing leaves a site.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from fl_covid.dicom import WINDOW_LEVEL, WINDOW_WIDTH

MIN_BODY_AREA = 0.1  # a body mask covering less of the image than this is not trusted: keep the whole image
BODY_PART = 0.25  # components at least this fraction of the largest belong to the body too
OUTSIDE_AIR_BORDER = 0.35  # a dark region along more than this fraction of the image's frame is air outside the body
CORNER = 0.03  # ... as is one reaching into a corner square of this fraction of the shorter side
MIN_LUNG = 0.01  # a lung is a dark region of at least this fraction of the image ...
LUNG_PART = 0.15  # ... and of the largest one
LUNG_CLOSING = 0.04  # closing radius, fraction of the shorter side: vessels, nodules, infiltrates join the lung
MIN_LUNG_AREA = 0.05  # a lung mask covering less of the image than this is not trusted: keep the whole image
MAX_BLUR_SIGMA = 1.5  # pixels of the batch, at strength 1
MAX_SCALE = 0.2  # zoom factor in [1 - 0.2, 1 + 0.2] at strength 1
MAX_LOG_GAMMA = 0.4
MAX_LOG_CONTRAST = 0.3
MAX_BRIGHTNESS = 0.08  # fraction of the grey range
JPEG_QUALITY = (30, 95)  # quality range at strength 1; at strength s the lowest is 95 - s * 65
APPLY_PROBABILITY = 0.5  # each operation touches an image with this probability, so no artefact marks a class
MAX_AMPLITUDE_CHANGE = 0.5  # low-frequency amplitudes scaled by a factor in [1 - 0.5 s, 1 + 0.5 s]
WARP_KNOTS = 4  # the grey-level warp: piecewise linear through WARP_KNOTS + 1 knots
MAX_BORDER = 0.15  # each side's border up to this fraction of the image, at strength 1
RANDCONV_KERNELS = (3, 5, 7)  # random_convolution's kernel sizes, one drawn per image
SPECTRUM_BAND = 0.1  # style_augment's band in cycles per pixel, the default of the config's spectrum-band


def _check_grey(image: np.ndarray, name: str) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"{name} needs a grey uint8 (H, W) image, got {img.dtype} of shape {img.shape}")
    return img


def _check_batch(images: torch.Tensor, name: str) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise ValueError(f"{name} needs a uint8 (B, 1, S, S) batch, got {images.dtype} {tuple(images.shape)}")


def _body_values(img: np.ndarray) -> np.ndarray:
    """The grey levels of the pixels inside ``body_mask``, or of the whole image when the body covers less than
    MIN_BODY_AREA of it: (n,) uint8."""
    mask = body_mask(img)
    return img[mask] if mask.sum() >= MIN_BODY_AREA * img.size else img.ravel()


def otsu_threshold(image: np.ndarray) -> int:
    """Otsu's grey level for a uint8 image: the t maximising the between-class variance of {<= t} and {> t}."""
    hist = np.bincount(np.asarray(image, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)  # weight of the class <= t
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    return int(np.argmax(np.nan_to_num(between, nan=0.0, posinf=0.0)))


def body_mask(image: np.ndarray) -> np.ndarray:
    """The body in a grey uint8 (H, W) slice: (H, W) bool.

    Pixels above Otsu's threshold, opened with a square of about 1% of the shorter side (breaks thin links to text,
    arrows and the scanner table), the largest connected component together with every other component at least
    BODY_PART of its size (a slice cut by the image edge falls apart into chest-wall pieces and the mediastinum),
    holes (the lungs) filled. Empty when nothing is above the threshold (a constant image)."""
    img = _check_grey(image, "body_mask")
    fg = img > otsu_threshold(img)
    r = max(1, round(0.01 * min(img.shape)))
    fg = ndimage.binary_opening(fg, structure=np.ones((2 * r + 1, 2 * r + 1), dtype=bool))
    labels, n = ndimage.label(fg)
    if n == 0:
        return fg
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= BODY_PART * sizes.max()
    return ndimage.binary_fill_holes(keep[labels])


def lung_mask(image: np.ndarray) -> np.ndarray:
    """The lungs in a grey uint8 (H, W) slice (lung window): (H, W) bool, empty when none is found.

    Pixels at or below Otsu's threshold, opened with a square of about 1% of the shorter side; of their connected
    components, those along more than OUTSIDE_AIR_BORDER of the image's frame or reaching a corner are the air
    around the body (a slice cropped to the chest keeps its lungs, which touch the frame at its sides only); the
    others of at least MIN_LUNG of the image and LUNG_PART of the largest are lungs. These are closed with a disc of
    LUNG_CLOSING x the shorter side and their holes filled, so that vessels and dense infiltrates inside a lung
    belong to it. Known failures: mediastinal-window slices (lungs and fat both dark), and an air gap under the
    scanner table that reaches neither a corner nor OUTSIDE_AIR_BORDER of the frame (taken for a lung)."""
    img = _check_grey(image, "lung_mask")
    h, w = img.shape
    dark = img <= otsu_threshold(img)
    r = max(1, round(0.01 * min(h, w)))
    dark = ndimage.binary_opening(dark, structure=np.ones((2 * r + 1, 2 * r + 1), dtype=bool))
    labels, n = ndimage.label(dark)
    frame = np.zeros((h, w), dtype=bool)
    frame[[0, -1], :] = frame[:, [0, -1]] = True
    c = max(1, round(CORNER * min(h, w)))
    corners = np.zeros((h, w), dtype=bool)
    for rows in (slice(0, c), slice(h - c, h)):
        for cols in (slice(0, c), slice(w - c, w)):
            corners[rows, cols] = True
    sizes = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
    outside = ((np.bincount(labels[frame], minlength=n + 1) > OUTSIDE_AIR_BORDER * frame.sum())
               | (np.bincount(labels[corners], minlength=n + 1) > 0))
    sizes[0] = 0
    sizes[outside] = 0
    if sizes.max() == 0:
        return np.zeros((h, w), dtype=bool)
    lungs = ((sizes >= MIN_LUNG * h * w) & (sizes >= LUNG_PART * sizes.max()))[labels]
    radius = max(1, round(LUNG_CLOSING * min(h, w)))
    disc = np.hypot(*np.mgrid[-radius:radius + 1, -radius:radius + 1]) <= radius
    closed = ndimage.binary_closing(np.pad(lungs, radius), structure=disc)[radius:-radius, radius:-radius]
    return ndimage.binary_fill_holes(closed)


def lung_crop(image: np.ndarray, margin: float = 0.02, min_area: float = MIN_LUNG_AREA) -> np.ndarray:
    """The lungs of a grey uint8 (H, W) slice alone: (H, W) -> (L, L) uint8, L <= max(H, W).

    Pixels outside ``lung_mask`` become 0; the result is the mask's bounding box plus ``margin`` x the longer side
    (clipped to the image), padded with 0 to a square. When the mask covers less than ``min_area`` of the image
    (no lungs found) the whole image is kept, padded to a square."""
    img = _check_grey(image, "lung_crop")
    h, w = img.shape
    mask = lung_mask(img)
    if mask.sum() < min_area * h * w:
        return _pad_square(img, 0)
    return _pad_square(np.where(mask, img, 0).astype(np.uint8)[_box(mask, margin)], 0)


def _box(mask: np.ndarray, margin: float) -> tuple[slice, slice]:
    """The bounding box of a non-empty (H, W) mask plus ``margin`` x the longer side on every side, clipped to the
    image: (rows, columns) slices."""
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    m = round(margin * max(h, w))
    return slice(max(0, rows[0] - m), min(h, rows[-1] + 1 + m)), slice(max(0, cols[0] - m), min(w, cols[-1] + 1 + m))


def _pad_square(image: np.ndarray, fill: int) -> np.ndarray:
    h, w = image.shape
    side = max(h, w)
    out = np.full((side, side), fill, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = image
    return out


def body_crop(image: np.ndarray, margin: float = 0.02, min_area: float = MIN_BODY_AREA,
              fill: int | None = None) -> np.ndarray:
    """Crop a grey uint8 (H, W) slice to its body and pad it to a square: (H, W) -> (L, L) uint8, L <= max(H, W).

    The box is the bounding box of ``body_mask`` plus ``margin`` x the longer side on every side (clipped to the
    image); when the body covers less than ``min_area`` of the image the whole image is kept. The result is padded
    to a square (crop centred) rather than stretched, so the loader's square resize keeps the aspect ratio and the
    image's shape stops telling the source apart. Padding uses ``fill``, by default the image's 1st grey-level
    percentile: the air level of a CT slice (black around the body, or the lungs when the body fills the frame),
    so the padding looks like air on every site instead of copying a white figure margin or a grey frame back in.
    """
    img = _check_grey(image, "body_crop")
    h, w = img.shape
    mask = body_mask(img)
    box = _box(mask, margin) if mask.sum() >= min_area * h * w else (slice(0, h), slice(0, w))
    if fill is None:
        fill = int(np.percentile(img, 1))
    return _pad_square(img[box], fill)


def standardize(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Robust per-image intensity standardisation: grey uint8 (H, W) -> uint8 (H, W).

    The ``low`` and ``high`` percentiles of the pixels inside ``body_mask`` (the whole image when the body is under
    MIN_BODY_AREA of it) map linearly to 0 and 255, the rest is clipped. Any increasing linear change of the input's
    grey levels (windowing, gain, offset) gives nearly the same output. A constant image is returned unchanged."""
    img = _check_grey(image, "standardize")
    if not 0 <= low < high <= 100:
        raise ValueError(f"standardize needs 0 <= low < high <= 100, got low={low}, high={high}")
    values = _body_values(img)
    lo, hi = np.percentile(values, (low, high))
    if hi - lo < 1:
        return img.copy()
    out = (img.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def equalize(image: np.ndarray) -> np.ndarray:
    """Histogram equalisation on the body: grey uint8 (H, W) -> uint8 (H, W).

    Each grey level g maps to 255 x its mid-rank among the pixels inside ``body_mask`` (the whole image when the
    body is under MIN_BODY_AREA of it): 255 x (P(v < g) + P(v = g) / 2). Any increasing change of the input's grey
    levels (windowing, gamma, gain) gives the same output, and every body's grey-level percentiles are the same,
    so the audit's percentile and contrast statistics no longer tell images apart. Levels absent from the body map
    by the same formula (between their neighbours); a constant image becomes mid-grey (128)."""
    img = _check_grey(image, "equalize")
    values = _body_values(img)
    hist = np.bincount(values, minlength=256).astype(np.float64)
    below = np.cumsum(hist) - hist  # pixels darker than each level
    lut = np.rint(255.0 * (below + hist / 2) / hist.sum()).astype(np.uint8)
    return lut[img]


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image: x (B, 1, S, S) float, sigma (B,) px (0: unchanged)."""
    b, _, s, _ = x.shape
    radius = min(max(1, math.ceil(3 * float(sigma.max()))), s - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-t[None] ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))  # (B, 2R+1)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    y = x.view(1, b, s, s)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel.view(b, 1, 1, -1), groups=b)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel.view(b, 1, -1, 1), groups=b)
    return y.view(b, 1, s, s)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("L"))


def cue_augment(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0,
                jpeg: bool = False) -> torch.Tensor:
    """Randomise the cues of a uint8 batch (B, 1, S, S) -> uint8 (B, 1, S, S), on the batch's device.

    Per image and each with probability APPLY_PROBABILITY, in this order: zoom by a factor in
    [1 - 0.2 s, 1 + 0.2 s] about the centre (zoom-out pads with 0, black air); gamma exp(+-0.4 s), contrast
    exp(+-0.3 s) about the image mean and a brightness shift of up to 0.08 s of the range; Gaussian blur with
    sigma in [0, 1.5 s] px; with ``jpeg``, JPEG re-compression at a quality in [95 - 65 s, 95] (Pillow, per image,
    on the CPU). ``s`` = ``strength`` in [0, 1]; 0 returns an unchanged copy.

    All random numbers come from ``generator`` (a CPU generator) in a fixed amount per call, whether or not
    ``jpeg`` is set, so a seeded generator gives the same batch on any device up to floating-point rounding.
    """
    _check_batch(images, "cue_augment")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"cue_augment strength must be in [0, 1], got {strength}")
    b, _, s, _ = images.shape
    u = torch.rand(b, 10, generator=generator, device=generator.device)
    if strength == 0 or b == 0:
        return images.clone()
    apply = (u[:, :4] < APPLY_PROBABILITY).to(images.device)  # zoom, intensity, blur, jpeg
    signed = (2 * u[:, 4:8] - 1).to(images.device)  # zoom, gamma, contrast, brightness in [-1, 1]
    x = images.float() / 255.0

    zoom = torch.where(apply[:, 0], 1 + MAX_SCALE * strength * signed[:, 0], torch.ones(b, device=x.device))
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    grid = F.affine_grid(theta, [b, 1, s, s], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    on = apply[:, 1].view(b, 1, 1, 1)
    gamma = torch.exp(MAX_LOG_GAMMA * strength * signed[:, 1]).view(b, 1, 1, 1)
    contrast = torch.exp(MAX_LOG_CONTRAST * strength * signed[:, 2]).view(b, 1, 1, 1)
    shift = (MAX_BRIGHTNESS * strength * signed[:, 3]).view(b, 1, 1, 1)
    y = x.clamp(0, 1) ** gamma
    mean = y.mean(dim=(2, 3), keepdim=True)
    y = ((y - mean) * contrast + mean + shift).clamp(0, 1)
    x = torch.where(on, y, x)

    sigma = MAX_BLUR_SIGMA * strength * u[:, 8].to(x.device) * apply[:, 2]
    if bool((sigma > 0.05).any()):
        x = torch.where((sigma > 0.05).view(b, 1, 1, 1), _gaussian_blur(x, sigma), x)

    out = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    if jpeg:
        low, high = JPEG_QUALITY
        quality = (high - strength * (high - low) * u[:, 9]).round().to(torch.int64).tolist()
        todo = [i for i in range(b) if bool(apply[i, 3])]
        if todo:
            cpu = out.cpu().numpy()
            for i in todo:
                cpu[i, 0] = _jpeg(cpu[i, 0], quality[i])
            out = torch.from_numpy(cpu).to(images.device)
    return out


def _hermitian(field: torch.Tensor) -> torch.Tensor:
    """A real field over an unshifted FFT grid (..., S, S) averaged with its mirror at (-u, -v) mod S, so that
    scaling a real image's spectrum by it keeps the image real."""
    mirror = torch.roll(torch.flip(field, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
    return (field + mirror) / 2


def spectrum_jitter(x: torch.Tensor, noise: torch.Tensor, band: float, change: float) -> torch.Tensor:
    """Images x (B, 1, S, S) in [0, 1] with the amplitude of every frequency with |u|, |v| <= ``band`` (cycles
    per pixel, DC included) multiplied by 1 + change * n, n from ``noise`` (B, 1, S, S) in [-1, 1] mirrored so the
    image stays real; the phase is kept. Returns (B, 1, S, S) clamped to [0, 1]."""
    freq = torch.fft.fftfreq(x.shape[-1], device=x.device).abs()
    low = (freq[:, None] <= band) & (freq[None, :] <= band)
    factor = 1 + change * _hermitian(noise) * low
    return torch.fft.ifft2(torch.fft.fft2(x) * factor).real.clamp(0, 1)


def grey_warp(x: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Images x (B, 1, S, S) in [0, 1] through a monotone piecewise-linear map with knots at k / K (K = inner's
    width + 1) sent to 0, ``inner`` (B, K - 1) (increasing, in (0, 1)), 1."""
    b, k = x.shape[0], inner.shape[1] + 1
    out = torch.cat([torch.zeros(b, 1, device=x.device), inner, torch.ones(b, 1, device=x.device)], dim=1)
    segment = torch.clamp((x * k).long(), max=k - 1)
    lo = out.gather(1, segment.view(b, -1)).view_as(x)
    hi = out.gather(1, (segment + 1).view(b, -1)).view_as(x)
    return lo + (x * k - segment) * (hi - lo)


def random_border(x: torch.Tensor, widths: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Images x (B, 1, S, S) with ``widths`` (B, 4) pixels at the top, bottom, left and right set to ``level``
    (B,)."""
    s = x.shape[-1]
    idx = torch.arange(s, device=x.device)
    rows = (idx[None, :] >= widths[:, 0:1]) & (idx[None, :] < s - widths[:, 1:2])  # (B, S)
    cols = (idx[None, :] >= widths[:, 2:3]) & (idx[None, :] < s - widths[:, 3:4])
    inside = rows[:, :, None] & cols[:, None, :]
    return torch.where(inside[:, None], x, level.view(-1, 1, 1, 1))


def style_augment(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0,
                  band: float = SPECTRUM_BAND) -> torch.Tensor:
    """Randomise an image's style of a uint8 batch (B, 1, S, S) -> uint8 (B, 1, S, S), on the batch's device.

    Per image and each with probability APPLY_PROBABILITY: (1) ``spectrum_jitter``: its amplitude spectrum within
    |u|, |v| <= ``band`` multiplied by a random factor in [1 - 0.5 s, 1 + 0.5 s] per frequency, the phase (the
    anatomy) kept (FedDG and HarmoFL as released perturb only DC); (2) ``grey_warp``: a random monotone grey-level
    map through WARP_KNOTS + 1 knots, each inner knot moved by up to half a segment times s (percentiles and
    histogram shape change, the order of grey levels stays); (3) ``random_border``: each side's border, up to
    0.15 s of the image, set to a random grey level (border brightness, padding). ``s`` = ``strength`` in [0, 1];
    0 returns an unchanged copy. All random numbers come from ``generator`` (a CPU generator) in a fixed amount per
    call, so a seeded generator gives the same batch on any device up to floating-point rounding.
    """
    _check_batch(images, "style_augment")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"style_augment strength must be in [0, 1], got {strength}")
    if not 0.0 < band <= 0.5:
        raise ValueError(f"spectrum band must be in (0, 0.5] cycles per pixel, got {band}")
    b, _, s, _ = images.shape
    u = torch.rand(b, 3 + (WARP_KNOTS - 1) + 5, generator=generator, device=generator.device)
    field = torch.rand(b, 1, s, s, generator=generator, device=generator.device)
    if strength == 0 or b == 0:
        return images.clone()
    u, field = u.to(images.device), field.to(images.device)
    apply = (u[:, :3] < APPLY_PROBABILITY).view(b, 3, 1, 1, 1)  # spectrum, warp, border
    x = images.float() / 255.0
    x = torch.where(apply[:, 0], spectrum_jitter(x, 2 * field - 1, band, MAX_AMPLITUDE_CHANGE * strength), x)
    knots = torch.linspace(0, 1, WARP_KNOTS + 1, device=x.device)[1:-1]
    inner = knots + (2 * u[:, 3:2 + WARP_KNOTS] - 1) * 0.5 * strength / WARP_KNOTS
    x = torch.where(apply[:, 1], grey_warp(x, inner), x)
    r = 2 + WARP_KNOTS
    widths = (MAX_BORDER * strength * s * u[:, r:r + 4]).floor().long()
    x = torch.where(apply[:, 2], random_border(x, widths, u[:, r + 4]), x)
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def random_convolution(images: torch.Tensor, generator: torch.Generator, probability: float = 1.0) -> torch.Tensor:
    """RandConv on a uint8 batch (B, 1, S, S) -> uint8 (B, 1, S, S), on the batch's device.

    Each image, with ``probability``: convolved (reflect padding) with its own random kernel of a size drawn from
    RANDCONV_KERNELS and weights N(0, 1 / k^2) (Xu et al., ICLR 2021), the result given the image's own mean and
    standard deviation, then mixed with the image by a random weight in [0, 1] and clipped to the grey range:
    texture, sharpness and the sign of local contrast change, the anatomy's shapes stay. All random numbers come
    from ``generator`` (a CPU generator) in a fixed amount per call; 0 returns an unchanged copy."""
    _check_batch(images, "random_convolution")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"random_convolution probability must be in [0, 1], got {probability}")
    b, _, s, _ = images.shape
    k_max = max(RANDCONV_KERNELS)
    u = torch.rand(b, 3, generator=generator, device=generator.device)  # apply, kernel size, mixing weight
    weights = torch.randn(b, 1, k_max, k_max, generator=generator, device=generator.device)
    if probability == 0 or b == 0:
        return images.clone()
    x = images.float() / 255.0
    choice = (u[:, 1] * len(RANDCONV_KERNELS)).long().clamp_max(len(RANDCONV_KERNELS) - 1)
    sizes = torch.tensor(RANDCONV_KERNELS)[choice]
    offset = (k_max - sizes) // 2  # a k x k kernel is the centre of a k_max x k_max one, zero around it
    idx = torch.arange(k_max)
    inside = ((idx >= offset[:, None]) & (idx < (offset + sizes)[:, None])).float()  # (B, k_max)
    kernel = (weights * inside[:, None, :, None] * inside[:, None, None, :] / sizes.view(b, 1, 1, 1).float())
    pad = k_max // 2
    y = F.conv2d(F.pad(x.view(1, b, s, s), (pad, pad, pad, pad), mode="reflect"), kernel.to(x.device), groups=b)
    y = y.view(b, 1, s, s)
    mean, std = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True)
    y = (y - y.mean(dim=(2, 3), keepdim=True)) / y.std(dim=(2, 3), keepdim=True).clamp_min(1e-6) * std + mean
    alpha = u[:, 2].view(b, 1, 1, 1).to(x.device)
    mixed = (alpha * x + (1 - alpha) * y).clamp(0, 1)
    x = torch.where((u[:, 0] < probability).view(b, 1, 1, 1).to(x.device), mixed, x)
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes a cached image, the same in training, evaluation and prediction (recorded in every run's
    config): the DICOM ``window`` (width, level) in HU (``fl_covid.dicom``); ``body_crop``: crop to the body, padded
    square (``body_crop``); ``lung_crop``: the lungs alone (``lung_crop``), not with ``body_crop``; ``standardize``: robust per-image intensity standardisation (``standardize``);
    ``equalize``: histogram equalisation on the body (``equalize``), after the crop; not with ``standardize``."""

    window: tuple[float, float] = (WINDOW_WIDTH, WINDOW_LEVEL)
    body_crop: bool = False
    standardize: bool = False
    equalize: bool = False
    lung_crop: bool = False

    def __post_init__(self) -> None:
        if self.body_crop and self.lung_crop:
            raise ValueError("body_crop and lung_crop exclude each other (the lungs' crop lies inside the body's)")
        if self.standardize and self.equalize:
            raise ValueError("standardize and equalize exclude each other (equalisation already undoes any "
                             "increasing intensity change)")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Grey uint8 (H, W) -> uint8 (L, L) cropped and/or uint8 (H, W) intensity-normalised, as set."""
        if self.body_crop:
            image = body_crop(image)
        if self.lung_crop:
            image = lung_crop(image)
        if self.standardize:
            image = standardize(image)
        if self.equalize:
            image = equalize(image)
        return image

    @property
    def changes_pixels(self) -> bool:
        """Whether decoding applies any of the above (the DICOM window aside)."""
        return self.body_crop or self.lung_crop or self.standardize or self.equalize


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation of the crops beyond random cropping: ``cue_augment`` at strength ``cue``, then
    ``style_augment`` at strength ``style`` with spectrum band ``band``, then ``random_convolution`` with
    probability ``randconv`` (config keys cue-augment, style-augment, spectrum-band, random-convolution); the
    identity when all three are 0 (and then no random number is drawn)."""

    cue: float
    style: float
    band: float
    randconv: float

    def __call__(self, crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 crops (B, 1, S, S) -> uint8 (B, 1, S, S)."""
        if self.cue > 0:
            crops = cue_augment(crops, generator, self.cue)
        if self.style > 0:
            crops = style_augment(crops, generator, self.style, self.band)
        if self.randconv > 0:
            crops = random_convolution(crops, generator, self.randconv)
        return crops
