"""Can a one-class detector built from one site's images alone flag the other site's images one by one?

For a site model of ``fl-covid-central --method single`` (fold 0), fits one Gaussian (Ledoit-Wolf shrinkage, on
standardised values) to each of three descriptions of the site's training images and scores the site's test fold
and up to 400 + 400 images of the other site by three detectors (``scores``: the Mahalanobis distance, its
typicality, the distance to the nearest training images):

- the cue statistics of ``fl_covid.cues`` (what the shift profile uses, there as a mixture);
- the whole pooled embedding (the profile uses a 64-dimensional random projection of it);
- the per-channel means and log standard deviations of the stem and of every stage (the "style" of an image).

Prints, per description and detector, the rate flagged above the 95th percentile of the site's validation scores on its own
test fold (false positives) and on the other site (true positives), and the AUC separating the two.

    python docs/results/shift/per_image_detectors.py RUN_DIR OTHER_SITE
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from fl_covid.config import project_root
from fl_covid.cues import image_statistics
from fl_covid.data import eval_input, load_configured_site, load_site
from fl_covid.site_model import load_site_model

K_NEIGHBOURS = 10


@torch.no_grad()
def describe(model: torch.nn.Module, images: torch.Tensor, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 1, R, R) -> (per-channel mean and log std of the stem and each stage (N, 2 x channels),
    pooled embedding (N, D))."""
    styles, embeddings = [], []
    for start in range(0, len(images), 128):
        x = eval_input(images[start:start + 128], image_size)
        model.select_site(0)
        h = model.stem(x)
        maps = [h]
        h = F.max_pool2d(h, 2)
        for i, (upper, blocks) in enumerate(zip(model.upper, model.stages)):  # COVIDNet._trunk, keeping each stage
            top = upper(h)
            if i > 0:
                h, top = F.max_pool2d(h, 2), F.max_pool2d(top, 2)
            total, inp = top, h
            for block in blocks:
                total = total + block(inp)
                inp = total
            h = total
            maps.append(h)
        styles.append(torch.cat([s for m in maps for s in (m.mean((2, 3)), (m.var((2, 3)) + 1e-6).log() / 2)], 1))
        embeddings.append(torch.flatten(F.adaptive_avg_pool2d(h, 2), 1))
    return torch.cat(styles).double().numpy(), torch.cat(embeddings).double().numpy()


def scores(x: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Per-image novelty scores of every part of ``x`` (part -> (N, F), "train" among them) by three detectors
    built from the standardised training part: the Mahalanobis distance to one Gaussian; its typicality, the
    distance's departure from the validation part's median (an image too close to the centre is as unusual as one
    too far); the mean Euclidean distance to the K_NEIGHBOURS nearest training images."""
    mean, std = x["train"].mean(0), x["train"].std(0)
    z = {k: np.nan_to_num((v - mean) / np.where(std > 0, std, 1.0)) for k, v in x.items()}
    lw = LedoitWolf().fit(z["train"])
    d = {k: np.sqrt(np.einsum("nf,fg,ng->n", v - lw.location_, lw.precision_, v - lw.location_)) for k, v in z.items()}
    centre = np.median(d["val"])
    neighbours = NearestNeighbors(n_neighbors=K_NEIGHBOURS).fit(z["train"])
    return {"Gaussian distance": d, "typicality": {k: np.abs(v - centre) for k, v in d.items()},
            "nearest neighbours": {k: neighbours.kneighbors(v)[0].mean(1) for k, v in z.items() if k != "train"}}


def rates(name: str, x: dict[str, np.ndarray]) -> None:
    """One table row per detector: flagged above the 95th percentile of the validation part's scores."""
    for detector, score in scores(x).items():
        threshold = np.quantile(score["val"], 0.95)
        auc = roc_auc_score(np.r_[np.zeros(len(score["test"])), np.ones(len(score["other"]))],
                            np.r_[score["test"], score["other"]])
        print(f"| {name} | {x['train'].shape[1]} | {detector} | {np.mean(score['test'] > threshold):.3f} | "
              f"{np.mean(score['other'] > threshold):.3f} | {auc:.3f} |")


def main(run_dir: str, other_site: str) -> None:
    torch.set_num_threads(1)
    (folder,) = Path(run_dir).glob("site-*/model")
    site_model = load_site_model(folder)
    model, config = site_model.model.eval(), site_model.config
    site, split = load_configured_site(config, 0)
    other = load_site(project_root() / "data" / other_site, config.cache_size, max_per_class=400, seed=1)
    images = {"train": site.images[split.train], "val": site.images[split.val], "test": site.images[split.test],
              "other": other.images}
    described = {k: describe(model, v, config.image_size) for k, v in images.items()}
    cues = {k: image_statistics(v) for k, v in images.items()}
    keep = np.isfinite(cues["train"]).all(0) & (cues["train"].std(0) > 0)
    print(f"{site.name} model: {', '.join(f'{k} {len(v)}' for k, v in images.items())} images\n")
    print("| description | values | detector | own test fold flagged | other site flagged | AUC own test vs other |")
    print("|---|---|---|---|---|---|")
    rates("cue statistics", {k: v[:, keep] for k, v in cues.items()})
    rates("pooled embedding", {k: v[1] for k, v in described.items()})
    rates("per-channel mean and std, stem and stages", {k: v[0] for k, v in described.items()})


if __name__ == "__main__":
    main(*sys.argv[1:3])
