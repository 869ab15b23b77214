"""The bare training loop, the reference every throughput is divided by: ``fl_covid.engine.train_steps`` alone on
one site, driven as ``fl_covid.federated.SiteRunner.train`` drives it (same model, optimizer, batches and loss
terms of the config's method), without Flower, state files or evaluation. And the summary pass a site does at the
start of a round (``SiteRunner.summarise``), timed alone.

``python -m bench.bare --config-json '{...}' --site-index 0 --steps 100`` (from the project folder) runs one loop
in a process of its own and prints its timing as JSON: ``--default-run`` runs one per site side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fl_covid.config import Config, load_config
from fl_covid.data import IndexStream, Site, Split, load_configured_site
from fl_covid.engine import Chunk, make_optimizer, train_steps
from fl_covid.federated import SiteRunner
from fl_covid.model import initial_model
from fl_covid.objective import build_objective
from fl_covid.seeding import derive


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def site_loop(config: Config, site: Site, split: Split, site_id: int = 0, compiled: bool = False
              ) -> Callable[[int], dict[str, float]]:
    """``run(n)``: n more training steps of one site's model, as SiteRunner.train takes them. A method with
    prototypes trains against a bank of random unit prototypes of one other site (same shapes as the real bank).
    ``compiled``: the model's forward passes through torch.compile (inductor)."""
    spec = config.spec
    model = initial_model(config)
    if compiled:
        model.forward_features = torch.compile(model.forward_features)  # type: ignore[method-assign]
        model.forward_head = torch.compile(model.forward_head)  # type: ignore[method-assign]
        model.project = torch.compile(model.project)  # type: ignore[method-assign]
    optimizer = make_optimizer(model, config.lr)
    stream = IndexStream(split.train, torch.Generator().manual_seed(derive(config.seed, "batches", site_id, 1)))
    augment = torch.Generator().manual_seed(derive(config.seed, "augment", site_id, 1))
    candidates = None
    if spec.prototypes:
        rows = 2 * config.prototypes_per_class
        bank = torch.randn(rows, model.proj_dim, generator=torch.Generator().manual_seed(derive(config.seed, "bank")))
        candidates = (F.normalize(bank, dim=1), torch.arange(rows) % 2)
    shared = {k: v.detach().clone() for k, v in model.state_dict().items()} if spec.proximal else None
    objective = build_objective(config, candidates, shared)

    def next_batch() -> list[Chunk]:
        idx = stream.next(config.batch_size)
        return [Chunk(0, site.images[idx], site.labels[idx])]

    def run(n: int) -> dict[str, float]:
        return train_steps(model, optimizer, next_batch, n, objective, image_size=config.image_size,
                           generator=augment, grad_clip=config.grad_clip, augment=config.augmentation)

    return run


def bare_throughput(config: Config, site: Site, split: Split, steps: int, warmup: int = 2, repeats: int = 3
                    ) -> dict[str, float]:
    """Median of ``repeats`` timings of ``steps`` steps after ``warmup`` steps: images/s."""
    run = site_loop(config, site, split)
    _, warmup_s = timed(lambda: run(warmup))
    seconds = statistics.median(timed(lambda: run(steps))[1] for _ in range(repeats))
    return {"steps": steps, "seconds": round(seconds, 3), "warmup_seconds": round(warmup_s, 3),
            "images_per_s": round(steps * config.batch_size / seconds, 2), "torch_threads": torch.get_num_threads()}


def summary_seconds(config: Config, site: Site, split: Split, repeats: int = 3, evaluate_now: bool = True
                    ) -> float:
    """Median seconds of a site's summary pass (SiteRunner.summarise: BN re-estimation, evaluation of validation
    split and test fold when ``evaluate_now``, prototypes when the method has them) on initial weights."""
    runner = SiteRunner(config, 0, site, split, torch.device("cpu"))
    shared = {k: v.detach().clone() for k, v in runner.model.state_dict().items() if k in runner.keys}
    runner.summarise(shared, None, 1, evaluate_now, True)  # first pass: lazy initialisations
    return statistics.median(timed(lambda: runner.summarise(shared, None, 1, evaluate_now, True))[1]
                             for _ in range(repeats))


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    """One loop in its own process: prepare, warm up, signal ready, wait for go, time, print JSON."""
    parser = argparse.ArgumentParser(description="one bare training loop (see bench/README.md)")
    parser.add_argument("--config-json", required=True, help="the complete config, as Config.to_dict() in JSON")
    parser.add_argument("--site-index", type=int, default=0)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ready", type=Path, help="file to create once warmed up")
    parser.add_argument("--go", type=Path, help="file to wait for before the timed steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(None, json.loads(args.config_json))
    site, split = load_configured_site(config, args.site_index)
    run = site_loop(config, site, split, args.site_index)
    run(args.warmup)
    if args.ready is not None:
        args.ready.touch()
    if args.go is not None:
        _wait_for(args.go, 3600)
    start = time.time()
    run(args.steps)
    end = time.time()
    print(json.dumps({"site": config.sites[args.site_index], "steps": args.steps, "start": start, "end": end,
                      "images": args.steps * config.batch_size,
                      "images_per_s": round(args.steps * config.batch_size / (end - start), 2),
                      "torch_threads": torch.get_num_threads(), "train_images": int(np.size(split.train))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
