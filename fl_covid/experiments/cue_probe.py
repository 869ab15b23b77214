"""How much of the dataset cues a trained network's embedding still carries: a linear probe per cue.

For every training site of each run, the site's final model embeds the images of its test fold (eval transform,
own BN); a ridge regression (regularisation chosen by inner cross-validation) predicts each cue statistic of the
same images (``fl_covid.cues.batch_cues`` on the network's input) from the embedding, and the 5-fold
cross-validated R^2 is reported per cue and as a mean. Comparing runs with and without ``cue-adversarial`` shows
what the gradient reversal removed; a probe R^2 near 0 means no linear read-out of the cue is left.

    python -m fl_covid.experiments.cue_probe RUN [RUN ...] --out docs/results/loso/cue_probe.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fl_covid.cli import USER_ERRORS, run_command
from fl_covid.cues import CUE_TARGETS, batch_cues
from fl_covid.data import eval_input, load_configured_site
from fl_covid.experiments.trained import TrainedRun

PROBE_FOLDS = 5
ALPHAS = np.logspace(-2, 4, 13)


@torch.no_grad()
def embeddings_and_cues(model: torch.nn.Module, images: torch.Tensor, image_size: int, batch_size: int = 128
                        ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 1, R, R) -> (embeddings (N, E), cue statistics (N, K)) of the eval-size images, in eval mode."""
    model.eval()
    feats, cues = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        feats.append(model.forward_features(eval_input(batch, image_size), 0))
        small = F.interpolate(batch.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                              align_corners=False).round().clamp(0, 255).to(torch.uint8)
        cues.append(batch_cues(small))
    return torch.cat(feats).numpy(), torch.cat(cues).numpy()


def probe_r2(embeddings: np.ndarray, cues: np.ndarray, seed: int = 0) -> np.ndarray:
    """Cross-validated R^2 of a ridge probe from embeddings (N, E) to each cue (N, K): (K,); NaN for a cue that
    is constant over the images."""
    folds = KFold(PROBE_FOLDS, shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS))
    predicted = cross_val_predict(probe, embeddings, cues, cv=folds)
    residual = ((cues - predicted) ** 2).sum(0)
    total = ((cues - cues.mean(0)) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1 - residual / total, np.nan)


def probe_run(run_dir: Path) -> list[dict[str, object]]:
    """One row per training site of the run: the probe's R^2 per cue on that site's test fold."""
    run = TrainedRun.load(run_dir)
    rows = []
    for k, name in enumerate(run.config.sites):
        loaded = run.site_model(name)
        site, split = load_configured_site(loaded.config, k)
        emb, cues = embeddings_and_cues(loaded.model, site.images[split.test], loaded.config.image_size)
        r2 = probe_r2(emb, cues, seed=loaded.config.seed)
        rows.append({"run": str(run_dir), "method": run.method, "site": name,
                     "cue_adversarial": loaded.config.cue_adversarial, "images": len(cues),
                     "mean_r2": float(np.nanmean(r2)), **{c: float(v) for c, v in zip(CUE_TARGETS, r2)}})
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    head = ["run", "site", "cue-adversarial", "n", "mean R^2", *CUE_TARGETS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = [Path(str(r["run"])).name, r["site"], r["cue_adversarial"], r["images"], f"{r['mean_r2']:.2f}",
                  *(f"{r[c]:.2f}" for c in CUE_TARGETS)]
        lines.append("| " + " | ".join(str(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl_covid.experiments.cue_probe", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (holding config.json)")
    parser.add_argument("--out", type=Path, help="Markdown table to write (and the same rows as JSON beside it)")

    args = parser.parse_args(argv)

    def body() -> int:
        rows = [row for run in args.runs for row in probe_run(run)]
        text = markdown(rows)
        print(text, end="")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
            args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        return 0

    return run_command(body, (*USER_ERRORS, FileNotFoundError))


if __name__ == "__main__":
    raise SystemExit(main())
