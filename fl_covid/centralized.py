"""Centralized baselines of the paper: Single, Joint, SepNorm, contrastive joint learning and the Table I
comparators on the same backbone (Series / Parallel Adapter, MS-Net).

``fl-covid-central --config configs/default.yaml --method contrastive --set epochs=5`` trains on the pooled
sites (or each site alone for ``single``) with the same engine as the federated client, evaluates every site on
its own test fold and prints the run directory as the last line.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fl_covid.checkpoint import PREDICTIONS_CSV, SITE_MODEL, VAL_PREDICTIONS_CSV, site_folder
from fl_covid.cli import run_command
from fl_covid.config import Config, load_config, parse_overrides, to_json
from fl_covid.data import IndexStream, Site, Split, load_configured_site
from fl_covid.engine import Chunk, cosine_lr, evaluate, make_optimizer, select_device, train_steps
from fl_covid.errors import ConfigError
from fl_covid.methods import CENTRAL_METHODS, METHODS
from fl_covid.metrics import operating_point, roc_on_grid
from fl_covid.model import initial_model, one_site_state
from fl_covid.objective import build_objective
from fl_covid.reporting import RunWriter, new_run_dir, summary_lines, write_predictions
from fl_covid.seeding import derive
from fl_covid.shift import shift_profile
from fl_covid.site_model import model_card, save_site_model

log = logging.getLogger(__name__)


def _train_one(config: Config, method: str, sites: list[tuple[Site, Split]], members: list[int],
               writer: RunWriter, device: torch.device, bar: tqdm) -> dict[str, dict]:
    """Train one model on the sites ``members`` (indices into ``sites``); returns test results per site: the
    test fold's metrics, the validation split's as ``val_<name>`` and the operating point's as ``op_<name>``
    (the threshold chosen on the validation split, the test metrics at it; absent when the split lacks a class),
    and the ROC on the grid. Each site's model card records the operating point's threshold."""
    spec = METHODS[method]
    per_site_bn = spec.per_site_bn
    model = initial_model(config, len(members) if per_site_bn else 1)  # a federated run's, for the same seed
    optimizer = make_optimizer(model, config.lr)
    streams = {k: IndexStream(sites[k][1].train, torch.Generator().manual_seed(derive(config.seed, "batches", k)))
               for k in members}
    aug_gen = torch.Generator().manual_seed(derive(config.seed, "augment", members[0]))
    steps_per_epoch = math.ceil(max(len(sites[k][1].train) for k in members) / config.batch_size)
    total = config.epochs * steps_per_epoch

    def next_batch() -> list[Chunk]:
        chunks = []
        for j, k in enumerate(members):
            idx = streams[k].next(config.batch_size)
            chunks.append(Chunk(j if per_site_bn else 0, sites[k][0].images[idx], sites[k][0].labels[idx]))
        if not per_site_bn and len(chunks) > 1:  # pooled: one batch through shared BN
            chunks = [Chunk(0, torch.cat([c.images for c in chunks]), torch.cat([c.labels for c in chunks]))]
        return chunks

    objective = build_objective(config)
    for epoch in range(1, config.epochs + 1):
        start = (epoch - 1) * steps_per_epoch
        started = time.perf_counter()
        stats = train_steps(
            model, optimizer, next_batch, steps_per_epoch, objective, image_size=config.image_size,
            generator=aug_gen, grad_clip=config.grad_clip, augment=config.augmentation,
            mixstyle=config.mixstyle,
            lr_at=lambda s, start=start: cosine_lr(config.lr, start + s, total), device=device, progress=bar.update,
        )
        stats["seconds"] = time.perf_counter() - started  # training steps of the epoch, without validation
        for j, k in enumerate(members):
            site, split = sites[k]
            val, _ = evaluate(model, site.images[split.val], site.labels[split.val], j if per_site_bn else 0,
                              config.image_size, device)
            writer.log({"epoch": epoch, "site": site.name, "site_id": k, **stats,
                        **{f"val_{m}": v for m, v in val.items()}, "auc": val["auc"]})
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
    results = {}
    for j, k in enumerate(members):
        site, split = sites[k]
        bn_index = j if per_site_bn else 0
        val, val_probs = evaluate(model, site.images[split.val], site.labels[split.val], bn_index, config.image_size,
                                  device)
        folder = site_folder(writer.dir.parent, writer.dir.name, site.name)
        write_predictions(folder / VAL_PREDICTIONS_CSV, site, split.val, val_probs)
        metrics, probs = evaluate(model, site.images[split.test], site.labels[split.test], bn_index,
                                  config.image_size, device)
        labels = site.labels[split.test].numpy()
        write_predictions(folder / PREDICTIONS_CSV, site, split.test, probs)
        point = operating_point(site.labels[split.val].numpy(), val_probs, labels, probs)
        profile = shift_profile(model, site.images[split.train], site.images[split.val], config.image_size,
                                site=bn_index, seed=config.seed, device=device)
        save_site_model(folder / SITE_MODEL, one_site_state(model, bn_index), model_card(
            config, site, split.train, run=writer.dir.name, method=method, rounds=config.epochs,
            validation={k: v for k, v in val.items() if k != "n"}, shift=profile,
            operating_threshold=point["threshold"] if point is not None else None))
        metrics.update({f"val_{k}": v for k, v in val.items() if k != "n"})
        metrics.update({f"op_{k}": v for k, v in (point or {}).items()})
        results[site.name] = {"metrics": metrics, "roc": roc_on_grid(labels, probs)}
    return results


def run_central(config: Config, method: str, show_progress: bool = True) -> Path:
    """Train ``method`` on the configured sites and fold; returns the run directory."""
    if method not in CENTRAL_METHODS:
        raise ConfigError(f"config key 'method' must be one of the centralized methods {CENTRAL_METHODS}, got "
                          f"{method!r} (federated methods run with flwr run)")
    if METHODS[method].contrastive and config.arch != "redesigned":
        raise ConfigError(f"method {method!r} needs arch=redesigned (the original COVID-Net has no projection)")
    config = config.replace(method=method)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    started = time.perf_counter()
    device = select_device(config.device)
    sites = [load_configured_site(config, k) for k in range(len(config.sites))]
    writer = RunWriter(new_run_dir(config.resolved_output_dir(), method, config.tag), to_json(config))
    groups = [list(range(len(sites)))] if METHODS[method].pooled else [[k] for k in range(len(sites))]
    total = sum(config.epochs * math.ceil(max(len(sites[k][1].train) for k in g) / config.batch_size)
                for g in groups)
    results: dict[str, dict] = {}
    with tqdm(total=total, desc=f"{method}", unit="step", disable=not show_progress) as bar:
        for members in groups:
            results.update(_train_one(config, method, sites, members, writer, device, bar))
    final = writer.finish(method, {s: r["metrics"] for s, r in results.items()},
                          {s: r["roc"] for s, r in results.items()}, protocol=config.protocol, fold=config.fold,
                          seed=config.seed, wall_seconds=round(time.perf_counter() - started, 1))
    for line in summary_lines(final):
        log.info("%s %s", method, line)
    return writer.dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-covid-central", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml", help="YAML experiment config")
    parser.add_argument("--method", required=True, choices=CENTRAL_METHODS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def work() -> int:
        run_dir = run_central(load_config(args.config, parse_overrides(args.set)), args.method,
                              show_progress=not args.quiet)
        print((run_dir / "final_metrics.json").read_text().strip())
        print(run_dir)
        return 0

    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
