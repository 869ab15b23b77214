"""A trained model at a hospital that never trained: choose its BatchNorm, evaluate, report per image and patient.

``fl-covid-evaluate --run RUN --data SITE_DIR --bn adapt`` loads the run's final shared weights and evaluates every
image of the new site. The BN choice:

- ``adapt``: affine parameters averaged over the training sites, running statistics re-estimated from the new
  site's images (forward passes in train mode, cumulative average, no labels, no gradients);
- ``average``: every BN tensor averaged over the training sites (parameters and statistics);
- ``tent`` / ``tent:STEPS``: ``adapt``, then test-time entropy minimisation of the BN affine parameters on the new
  site's unlabelled images (``fl_covid.engine.entropy_adapt_bn``, default 10 steps of 64 images);
- ``site:NAME``: borrow training site NAME's BN.

Leave-one-site-out: train on one site (``--set sites=A``) and evaluate on the other with this command; the AUC
measured is added to each training site's model card (``unseen_site_auc``), where ``fl-covid-predict`` quotes it.

Shift: every image is scored against each training site's shift profile (``fl_covid.shift``, under that site's own
BN) and flagged when it is far from all of them; predictions.csv gets ``shift_score`` and ``shift_flag``,
patients.csv the fraction of each patient's images flagged and a majority flag, final_metrics.json a ``shift``
summary with the batch test of the site's images as a whole.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_covid.cli import run_command
from fl_covid.config import to_json
from fl_covid.data import CLASSES, Site, load_site
from fl_covid.engine import entropy_adapt_bn, evaluate, recalibrate_bn, select_device
from fl_covid.experiments.trained import TrainedRun, site_model_dir
from fl_covid.metrics import binary_metrics, roc_on_grid
from fl_covid.model import COVIDNet
from fl_covid.reporting import RunWriter, write_csv
from fl_covid.shift import check_shift, far_from_all, group_flags, image_columns, warning_text
from fl_covid.site_model import record_unseen_auc

log = logging.getLogger(__name__)

BN_MODES = ("adapt", "tent", "tent:STEPS", "average", "site:NAME")
TENT_STEPS = 10


def average_bn(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of several sites' BN tensors (same keys); integer counters take the maximum."""
    if not states:
        raise ValueError("no BN states to average")
    keys = set(states[0])
    if any(set(s) != keys for s in states):
        raise ValueError("BN states to average have different tensor names")
    out = {}
    for k in states[0]:
        stack = torch.stack([s[k] for s in states])
        out[k] = stack.float().mean(0).to(stack.dtype) if stack.is_floating_point() else stack.max(0).values
    return out


def parse_bn(bn: str) -> tuple[str, int]:
    """(mode, tent steps) of a BN choice (see BN_MODES); ValueError naming the choices otherwise. ``site:NAME``
    gives (``site:NAME``, 0): whether NAME trained is for the run to say."""
    mode, _, steps = bn.partition(":")
    if mode == "site" and steps:
        return bn, 0
    if mode in ("adapt", "average") and not steps:
        return mode, 0
    if mode == "tent" and (not steps or (steps.isdigit() and int(steps) >= 1)):
        return mode, int(steps or TENT_STEPS)
    raise ValueError(f"--bn must be one of {BN_MODES} (STEPS >= 1), got {bn!r}")


def model_for_unseen(run: TrainedRun, bn: str, site: Site | None = None, batch_size: int = 64,
                     device: torch.device | str = "cpu") -> COVIDNet:
    """The run's final model with BN chosen by ``bn`` (see BN_MODES); ``adapt`` and ``tent`` need the new
    ``site``'s images (never its labels)."""
    mode, steps = parse_bn(bn)
    if mode.startswith("site:"):
        return run.model(run.site_bn(mode[5:]))
    model = run.model(average_bn([run.site_bn(s) for s in run.config.sites]))
    if mode == "average":
        return model
    if site is None:
        raise ValueError(f"--bn {bn} needs the new site's images")
    if mode == "adapt":
        recalibrate_bn(model, site.images, run.config.image_size, batch_size=batch_size, device=device)
    else:
        entropies = entropy_adapt_bn(model, site.images, run.config.image_size, steps,
                                     batch_size=batch_size, seed=run.config.seed, device=device)
        log.info("entropy adaptation on %s: mean entropy %.4f -> %.4f", site.name, entropies[0], entropies[-1])
    return model


def per_patient(site: Site, probs: np.ndarray, flagged: np.ndarray | None = None,
                ) -> tuple[list[dict], dict[str, float] | None]:
    """Mean P(COVID) per patient_id (rows) and patient-level metrics; ([], None) without patient ids. With the
    images' shift flags (N,), each row has the fraction of the patient's images flagged and whether most are.

    Images without an id are left out; a patient whose images carry both labels is listed but not scored.
    """
    ids = list(site.patient_ids)
    if not any(ids):
        return [], None
    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(ids):
        if pid:
            groups.setdefault(pid, []).append(i)
    rows = []
    labels = site.labels.numpy()
    shift = group_flags(ids, flagged) if flagged is not None else {}
    for pid, idx in sorted(groups.items()):
        y = set(labels[idx].tolist())
        rows.append({"patient_id": pid, "label": CLASSES[y.pop()] if len(y) == 1 else "mixed",
                     "n_images": len(idx), "mean_prob_covid": float(np.mean(probs[idx]))})
        if pid in shift:
            rows[-1] |= {"shift_fraction": shift[pid][0], "shift_flag": int(shift[pid][1])}
    scored = [r for r in rows if r["label"] != "mixed"]
    if len(scored) < len(rows):
        log.warning("site '%s': %d patients have images of both labels; not scored at patient level", site.name,
                    len(rows) - len(scored))
    y = np.array([CLASSES.index(r["label"]) for r in scored])
    if len(set(y.tolist())) < 2:
        return rows, None
    return rows, binary_metrics(y, np.array([r["mean_prob_covid"] for r in scored]))


def check_unseen(run: TrainedRun, site: Site, batch_size: int = 64,
                 device: torch.device | str = "cpu") -> tuple[np.ndarray, dict[str, Any]] | None:
    """The new site's images against every training site's shift profile: per-image scores (N,) (the smallest
    over the training sites) and the summary; None (logged) when a training site's card has no profile."""
    checks = []
    for name in run.config.sites:
        site_model = run.site_model(name)
        if (profile := site_model.card.get("shift")) is None:
            log.warning("the model card of training site '%s' has no shift profile: images not checked for shift",
                        name)
            return None
        checks.append(check_shift(profile, name, site_model.model, site.images, run.config.image_size, batch_size,
                                  device))
    return far_from_all(checks)


def evaluate_unseen(run_dir: str | Path, data: str | Path, bn: str, out: str | Path | None = None,
                    name: str | None = None, max_per_class: int = 0, batch_size: int = 64,
                    device: str = "auto") -> Path:
    """Evaluate run ``run_dir`` on every image of the site folder ``data``; returns the output folder.

    Writes final_metrics.json (one site, plus ``patient_level`` when its images have patient ids, from the manifest
    or the DICOM headers, and ``shift``), predictions.csv, patients.csv (if patient ids) and roc.png into ``out``
    (default ``RUN/unseen-<site>-<bn>``), and adds the AUC to each training site's model card.
    """
    run = TrainedRun.load(run_dir)
    cfg = run.config
    folder = Path(data).expanduser().resolve()
    site_name = name or folder.name
    trained_folders = {(cfg.resolved_data_root() / s).resolve() for s in cfg.sites}
    if site_name in cfg.sites or folder in trained_folders:
        raise ValueError(f"site '{site_name}' trained in run {run.dir} (its sites are {list(cfg.sites)}): its "
                         "images are not unseen; train without it (--set sites=...) or pass another site")
    site = load_site(folder, cfg.cache_size, name=site_name, max_per_class=max_per_class, seed=cfg.seed,
                     exclude_label_conflicts=cfg.exclude_label_conflicts, skip_unreadable=cfg.skip_unreadable,
                     prep=cfg.preprocessing)
    dev = select_device(device)
    shift_scores, shift = check_unseen(run, site, batch_size, dev) or (None, None)
    model = model_for_unseen(run, bn, site, batch_size, dev)
    metrics, probs = evaluate(model, site.images, site.labels, 0, cfg.image_size, dev)
    out = Path(out) if out else run.dir / f"unseen-{site_name}-{bn.replace(':', '-')}"
    out.mkdir(parents=True, exist_ok=True)
    writer = RunWriter(out, to_json(cfg))
    labels = site.labels.numpy()
    rows = [{"path": p, "label": int(y), "prob_covid": float(q)} for p, y, q in zip(site.paths, labels, probs)]
    if shift_scores is not None:
        for row, columns in zip(rows, image_columns(shift_scores)):
            row |= columns
    write_csv(out / "predictions.csv", rows)
    patients, patient_metrics = per_patient(site, probs, shift_scores > 1 if shift_scores is not None else None)
    if patients:
        write_csv(out / "patients.csv", patients)
        if shift is not None:
            shift["patients"] = {"n": len(patients), "flagged": sum(p["shift_flag"] for p in patients)}
    writer.finish(cfg.method, {site_name: metrics}, {site_name: roc_on_grid(labels, probs)},
                  protocol="unseen-site", trained_protocol=cfg.protocol, fold=cfg.fold, seed=cfg.seed,
                  bn=bn, trained_sites=list(cfg.sites), evaluated_run=str(run.dir), data=str(site.root),
                  patient_level=patient_metrics, shift=shift)
    log.info("%s on unseen site %s (BN %s): AUC %.4f accuracy %.4f (n=%d)", cfg.method, site_name, bn,
             metrics["auc"], metrics["accuracy"], metrics["n"])
    for trained in cfg.sites:
        record_unseen_auc(site_model_dir(run.dir, trained), site_name, metrics, bn=bn, evaluation=str(out))
    if shift is not None and (text := warning_text(shift)):
        log.warning("%s", text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-covid-evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory of a trained model")
    parser.add_argument("--data", required=True, help="site folder (COVID/, NonCOVID/, optional manifest.csv)")
    parser.add_argument("--bn", required=True, metavar="{adapt,tent,tent:STEPS,average,site:NAME}", help="BN for the new site")
    parser.add_argument("--out", help="output folder (default RUN/unseen-<site>-<bn>)")
    parser.add_argument("--name", help="site name (default: the folder name)")
    parser.add_argument("--max-per-class", type=int, default=0, help="seeded subset per class (0 = all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    def work() -> int:
        out = evaluate_unseen(args.run, args.data, args.bn, args.out, args.name, args.max_per_class,
                              args.batch_size, args.device)
        print((out / "final_metrics.json").read_text().strip())
        print(out)
        return 0

    return run_command(work, (ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
