"""Which BN statistics should a federated site evaluate with? The final models of finished fold-runs, evaluated
with three sets of BN running statistics under the same final weights:

- ``re-estimated (eval)``: as saved, re-estimated by the final summary through the evaluation transform;
- ``last round``: the running statistics of the site's last training round (its saved local state);
- ``re-estimated (train)``: re-estimated on 256 training images through the training transform (random crops and
  flips), as ``bn-transform: train`` does.

Prints, per site, the validation AUC pooled over the fold-runs and the mean test AUC of each (a Markdown table).
Needs the fold-runs' full folders (site models and states), not only the committed result files.

Usage: python docs/results/frontier/bn_statistics.py docs/results/frontier/fedbn-ls10 [...]
"""

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fl_covid.data import load_configured_site
from fl_covid.engine import predict, recalibrate_bn
from fl_covid.federated import LocalState
from fl_covid.site_model import load_site_model

VARIANTS = ("re-estimated (eval)", "last round", "re-estimated (train)")


def _probs(model: torch.nn.Module, data, split, image_size: int) -> tuple:
    """(val labels, val probs, test labels, test probs) of one site model."""
    y = data.labels.numpy()
    return tuple(x for idx in (split.val, split.test)
                 for x in (y[idx], predict(model, data.images[idx], 0, image_size)[0]))


def scores(variant_dir: Path, site: str, index: int) -> dict[str, list[tuple]]:
    """variant -> per fold-run (val labels, val probs, test labels, test probs)."""
    out: dict[str, list[tuple]] = {v: [] for v in VARIANTS}
    for run in sorted(variant_dir.glob("fold*-seed*/*/")):
        folder = run / f"site-{site}"
        if not (folder / "model").is_dir():
            continue
        loaded = load_site_model(folder / "model")
        cfg, model = loaded.config, loaded.model
        data, split = load_configured_site(cfg, index)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        out[VARIANTS[0]].append(_probs(model, data, split, cfg.image_size))
        model.load_state_dict({**saved, **LocalState.load(folder / "state").bn})
        out[VARIANTS[1]].append(_probs(model, data, split, cfg.image_size))
        model.load_state_dict(saved)
        subset = split.train[torch.randperm(len(split.train), generator=torch.Generator().manual_seed(0))[:256].numpy()]
        recalibrate_bn(model, data.images[subset], cfg.image_size, crops=torch.Generator().manual_seed(1))
        out[VARIANTS[2]].append(_probs(model, data, split, cfg.image_size))
    return out


def main(paths: list[str]) -> None:
    torch.set_num_threads(1)
    print("| fold-runs | site | n | " + " | ".join(f"{v}: pooled val / mean test" for v in VARIANTS) + " |")
    print("|---|---|---|" + "---|" * len(VARIANTS))
    for path in paths:
        for index, site in enumerate(("site_a_sarscov2", "site_b_covidct")):
            by_variant = scores(Path(path), site, index)
            cells = []
            for runs in by_variant.values():
                pooled = roc_auc_score(np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs]))
                test = np.mean([roc_auc_score(r[2], r[3]) for r in runs])
                cells.append(f"{100 * pooled:.1f} / {100 * test:.1f}")
            print(f"| {Path(path).name} | {site} | {len(runs)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
