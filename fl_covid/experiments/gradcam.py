"""Grad-CAM saliency (Selvaraju et al., ICCV 2017) for a trained run, as in the paper's Fig. 4.

``fl-covid-gradcam --run RUN --site NAME --n 8 --out cams.png`` loads the run's final shared weights with the
site's own BN, takes ``n`` test-fold images of that site (half COVID, half NonCOVID) or the given ``--paths``,
and saves a grid: each image above its Grad-CAM of the COVID logit at the last stage's output.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl_covid.cli import run_command
from fl_covid.data import CLASSES, MEAN, STD, Site, Split, eval_input, load_configured_site
from fl_covid.errors import DataError
from fl_covid.experiments.trained import TrainedRun
from fl_covid.reporting import save_figure

log = logging.getLogger(__name__)


def grad_cam(forward: Callable[[torch.Tensor], torch.Tensor], layer: nn.Module, x: torch.Tensor,
             target: int | None = 1) -> torch.Tensor:
    """Grad-CAM of logit ``target`` (None: each image's predicted class) at ``layer``'s output.

    ``forward``: (B, C_in, H, W) -> logits (B, K), running through ``layer``, whose output is (B, C, h, w).
    Returns (B, H, W) maps in [0, 1]: ReLU(sum_c mean_hw(dy/dA_c) * A_c), bilinearly upsampled to the input
    size and divided by each map's maximum (an all-zero map stays zero). Hooks are removed before returning.
    """
    kept: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        kept["activation"] = output
        output.register_hook(lambda grad: kept.__setitem__("gradient", grad))

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = forward(x.detach().clone().requires_grad_(True))
            cls = logits.argmax(1) if target is None else torch.full((len(logits),), target, device=logits.device)
            logits.gather(1, cls[:, None]).sum().backward()
    finally:
        handle.remove()
    if "activation" not in kept:
        raise ValueError("the target layer was not called by the forward pass")
    a, g = kept["activation"].detach().float(), kept["gradient"].detach().float()
    if a.ndim != 4:
        raise ValueError(f"the target layer's output must be (B, C, h, w), got {tuple(a.shape)}")
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-12)


def choose_images(site: Site, split: Split, n: int, seed: int, paths: list[str] | None = None) -> list[int]:
    """Indices of ``paths`` in the site, else ``n`` seeded test-fold images, COVID first, half per class."""
    if paths:
        where = {p: i for i, p in enumerate(site.paths)}
        missing = [p for p in paths if p not in where]
        if missing:
            raise DataError(f"site '{site.name}' has no image {missing[0]!r} (use manifest paths such as "
                            f"{site.paths[0]!r})")
        return [where[p] for p in paths]
    rng = np.random.default_rng(seed)
    labels = site.labels.numpy()
    out = []
    for label, k in ((1, (n + 1) // 2), (0, n // 2)):
        pool = split.test[labels[split.test] == label]
        out += sorted(rng.permutation(pool)[:k].tolist())
    return out


def plot_grid(path: Path, images: torch.Tensor, cams: torch.Tensor, titles: list[str], heading: str) -> None:
    """Images (B, 3, S, S) normalised and their maps (B, S, S): image on top, map over it below."""
    grey = (images[:, 0] * STD[0, 0] + MEAN[0, 0]).clamp(0, 1).cpu().numpy()
    b = len(grey)
    fig, axes = plt.subplots(2, b, figsize=(2.0 * b, 4.4), squeeze=False)
    for j in range(b):
        axes[0, j].imshow(grey[j], cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(titles[j], fontsize=8)
        axes[1, j].imshow(grey[j], cmap="gray", vmin=0, vmax=1)
        axes[1, j].imshow(cams[j].cpu().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        for ax in axes[:, j]:
            ax.axis("off")
    fig.suptitle(heading, fontsize=9)
    save_figure(fig, path)


def run_gradcam(run_dir: str | Path, site_name: str, out: str | Path, n: int = 8, data: str | None = None,
                paths: list[str] | None = None, target: int | None = 1) -> Path:
    """Grad-CAM grid of a run's model with ``site_name``'s own BN on that site's images; returns ``out``."""
    run = TrainedRun.load(run_dir)
    cfg = run.config
    if site_name not in cfg.sites:
        raise ValueError(f"site {site_name!r} did not train in run {run.dir} (sites: {list(cfg.sites)}); "
                         "Grad-CAM uses a site's own BN")
    site, split = load_configured_site(cfg, cfg.sites.index(site_name), data)
    idx = choose_images(site, split, n, cfg.seed, paths)
    model = run.model(run.site_bn(site_name), site=site_name)
    x = eval_input(site.images[idx], cfg.image_size)
    cams = grad_cam(model, model.last_stage, x, target)
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)[:, 1]
    labels = site.labels[idx].tolist()
    titles = [f"{CLASSES[y]}  p(COVID)={p:.2f}" for y, p in zip(labels, probs.tolist())]
    what = "COVID logit" if target == 1 else ("predicted class" if target is None else f"class {target}")
    out = Path(out)
    plot_grid(out, x, cams, titles, f"Grad-CAM ({what}, last stage) | {cfg.method} | {site_name} | {run.dir.name}")
    log.info("Grad-CAM of %d images of %s -> %s", len(idx), site_name, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-covid-gradcam", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory of a trained model")
    parser.add_argument("--site", required=True, help="a training site of the run (its BN is used)")
    parser.add_argument("--n", type=int, default=8, help="number of test-fold images (half per class)")
    parser.add_argument("--paths", nargs="+", help="explicit images (manifest paths) instead of --n")
    parser.add_argument("--data", help="site folder (default: the run's data root / site)")
    parser.add_argument("--target", choices=("covid", "predicted"), default="covid",
                        help="explain the COVID logit (default) or each image's predicted class")
    parser.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")

    def work() -> int:
        print(run_gradcam(args.run, args.site, args.out, args.n, args.data, args.paths,
                          1 if args.target == "covid" else None))
        return 0

    return run_command(work, (ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
