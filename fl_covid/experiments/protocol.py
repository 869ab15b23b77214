"""K folds x S seeds of one method and config: centralized, or federated in one process or through ``flwr run``.

``fl-covid-protocol --method fedbn-proto --config configs/default.yaml --folds 4 --seeds 3 --out runs/table``
writes one ordinary run directory per fold and seed under ``OUT/fold<f>-seed<s>/`` and ``OUT/protocol.json``
(protocol, settings, every fold-run's status). A fold-run that already finished is reused, so an interrupted
protocol continues where it stopped. Seed s also seeds the fold assignment: S seeds are S repetitions of K-fold
cross-validation, and the same (fold, seed) gives the same split for every method (paired t-tests).

Federated fold-runs use ``--engine inprocess`` by default: the real ServerApp and ClientApps in one process
(fl_covid.experiments.federation), which pays no Flower or Ray start-up; ``--engine flower`` runs each through
``flwr run`` on a private local SuperLink and counts it only when ``flwr ls`` says ``finished:completed``.
``--jobs N`` runs N fold-runs at a time, each in a fresh process of its own (nothing carries over between
fold-runs), with the machine's cores divided between them (config key num-threads).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fl_covid.centralized import run_central
from fl_covid.cli import run_command
from fl_covid.config import (
    CENTRAL_ONLY_KEYS,
    FEDERATION_ONLY_KEYS,
    PROTOCOLS,
    Config,
    load_config,
    parse_overrides,
    project_root,
    resolve_config_file,
    to_json,
)
from fl_covid.errors import ConfigError
from fl_covid.experiments.federation import FlowerCLI, LocalGrid, default_run_config, run_in_process
from fl_covid.experiments.unseen import evaluate_unseen, parse_bn
from fl_covid.methods import CENTRAL_METHODS, FEDERATED_METHODS, METHODS
from fl_covid.reporting import CONFIG_JSON, FINAL_METRICS, PROTOCOL_FILE, PROTOCOL_TEXT, write_json

log = logging.getLogger(__name__)

ENGINES = ("inprocess", "flower")
# settings that do not change what a run learns: a finished fold-run with other values is still reused
REUSE_IGNORES = frozenset({"output-dir", "device", "num-threads", "resume", "site-nodes"})
MODEL_SELECTION = ("none: the last epoch (centralized) or round (federated) is evaluated on the test fold; the "
                   "validation split is reported beside it, and every setting is chosen on validation")


@dataclass
class FoldRun:
    """One fold and seed of the protocol: where it ran and how it ended."""

    fold: int
    seed: int
    folder: str
    run_dir: str = ""
    status: str = "pending"
    detail: str = ""
    unseen: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    """What every fold-run of a protocol shares (picklable: fold-runs may run in worker processes)."""

    config: Config
    method: str
    config_file: str  # configs/NAME.yaml of the app (the sites read only the app's own configs)
    overrides: dict[str, str]
    engine: str
    federation_config: str
    timeout: float | None
    leave_out: str
    bn_modes: tuple[str, ...]
    show_progress: bool


def finished_run(folder: Path, config: Config) -> Path | None:
    """The run directory in ``folder`` that finished this fold-run (``config``: method, fold, seed, sites), else
    None; ConfigError when it was trained with other settings (reusing it would mix settings in one table).

    A run directory is ``folder/<run>/`` as a fold-run writes it, or ``folder`` itself holding only the small result
    files (``final_metrics.json``, ``config.json``) as they are committed. A key the saved config lacks (added to
    the project after that run) counts as its default; a centralized run ignores the federation's keys."""
    wanted = json.loads(to_json(config))
    defaults = Config().to_dict()
    ignored = REUSE_IGNORES | (CENTRAL_ONLY_KEYS if METHODS[config.method].federated else FEDERATION_ONLY_KEYS)
    for final in sorted([*folder.glob(FINAL_METRICS), *folder.glob(f"*/{FINAL_METRICS}")], reverse=True):
        try:
            f = json.loads(final.read_text())
            saved = json.loads((final.parent / CONFIG_JSON).read_text())
        except (json.JSONDecodeError, FileNotFoundError):
            continue
        if ((f.get("method"), f.get("fold"), f.get("seed")) != (config.method, config.fold, config.seed)
                or set(f.get("sites", {})) != set(config.sites)):
            continue
        diff = [f"{k}: {saved.get(k, defaults.get(k))!r} there, {wanted.get(k)!r} now"
                for k in sorted(set(saved) | set(wanted))
                if k not in ignored and saved.get(k, defaults.get(k)) != wanted.get(k)]
        if diff:
            raise ConfigError(f"{final.parent} finished this fold-run with other settings ({'; '.join(diff)}); "
                              "use another --out or remove it")
        return final.parent
    return None


def fresh_run_id(folder: Path, method: str) -> int:
    """The smallest run id whose run directory ``folder/<method>-run<id>`` does not exist: a fold-run interrupted
    after some site wrote its final model (written once) is not continued but run again beside it."""
    run_id = 1
    while (folder / f"{method}-run{run_id}").exists():
        run_id += 1
    return run_id


def app_config_name(file: str | Path) -> str:
    """``configs/NAME.yaml`` for a config file inside the app's configs/ folder; ConfigError otherwise."""
    path = Path(file).resolve()
    configs = (project_root() / "configs").resolve()
    if path.parent != configs:
        raise ConfigError(f"--config {file} must be one of the app's configs/*.yaml (a federated site reads only "
                          "the app's own configs): copy it into configs/")
    return f"configs/{path.name}"


def fixed_overrides(plan: Plan) -> dict[str, str]:
    """Everything not in Flower's run config travels in ``overrides``; values must hold no spaces."""
    c = plan.config
    values = {**plan.overrides, "folds": str(c.folds), "protocol": c.protocol, "sites": ",".join(c.sites)}
    values = {k: v for k, v in values.items()
              if k.replace("_", "-") not in ("num-server-rounds", "local-steps", "seed", "fold", "method",
                                             "output-dir", "data-root")}
    for k, v in values.items():
        if not v or any(ch.isspace() for ch in v):
            raise ConfigError(f"override {k}={v!r} must be non-empty and hold no spaces to pass through Flower")
    return values


def federated_run_config(plan: Plan, config: Config, folder: str) -> dict[str, Any]:
    """The run config of one federated fold-run."""
    return {"config-file": plan.config_file, "method": plan.method, "num-server-rounds": config.num_server_rounds,
            "local-steps": config.local_steps, "seed": config.seed, "fold": config.fold, "output-dir": folder,
            "data-root": str(config.resolved_data_root()),
            "overrides": " ".join(f"{k}={v}" for k, v in fixed_overrides(plan).items())}


def execute(plan: Plan, r: FoldRun) -> FoldRun:
    """Run (or reuse) one fold-run and its unseen-site evaluations; failures are recorded, never raised."""
    config = plan.config.replace(fold=r.fold, seed=r.seed, output_dir=r.folder, method=plan.method)
    folder = Path(r.folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = finished_run(folder, config)
        if done is not None:
            log.info("fold %d seed %d: done, skipped (%s)", r.fold, r.seed, done)
            r.run_dir, r.status, r.detail = str(done), "completed", "done, skipped"
        elif not METHODS[plan.method].federated:
            r.run_dir, r.status = str(run_central(config, plan.method, plan.show_progress)), "completed"
        elif plan.engine == "inprocess":
            run_config = default_run_config(**federated_run_config(plan, config, r.folder))
            run_in_process(LocalGrid(run_config, len(config.sites), run_id=fresh_run_id(folder, plan.method)))
            r.run_dir = str(finished_run(folder, config) or "")
            r.status = "completed" if r.run_dir else "failed"
            r.detail = "" if r.run_dir else "the run ended without final metrics of every site"
        else:
            _flower(plan, r, config)
    except Exception as e:
        log.exception("fold %d seed %d failed", r.fold, r.seed)
        r.status, r.detail = "failed", f"{type(e).__name__}: {e}"
    log.info("fold %d seed %d: %s %s %s", r.fold, r.seed, r.status, r.run_dir, r.detail)
    if r.status == "completed" and plan.leave_out:
        _unseen(plan, r)
    return r


def _flower(plan: Plan, r: FoldRun, config: Config) -> None:
    with FlowerCLI(plan.federation_config, plan.timeout) as flower:
        run_id, output = flower.run(federated_run_config(plan, config, r.folder))
        Path(r.folder, "flwr-run.log").write_text(output)
        status = flower.status(run_id) if run_id is not None else "not started"
    if run_id is None:
        r.status, r.detail = "failed", f"flwr run did not start a run (see {r.folder}/flwr-run.log)"
        return
    run_dir = Path(r.folder) / f"{plan.method}-run{run_id}"
    r.run_dir = str(run_dir)
    if status != "finished:completed":
        r.status, r.detail = "failed", f"run {run_id} status {status} (see {r.folder}/flwr-run.log)"
        return
    try:
        done = finished_run(Path(r.folder), config)
    except ConfigError as e:
        r.status, r.detail = "failed", f"run {run_id} did not train with the intended settings: {e}"
        return
    if done != run_dir:
        r.status, r.detail = "failed", f"run {run_id} completed without final metrics of every site in {run_dir}"
    else:
        r.status, r.detail = "completed", f"run {run_id} {status}"


def _unseen(plan: Plan, r: FoldRun) -> None:
    data = plan.config.resolved_data_root() / plan.leave_out
    for bn in plan.bn_modes:
        out = Path(r.run_dir) / f"unseen-{plan.leave_out}-{bn.replace(':', '-')}"
        if not (out / FINAL_METRICS).is_file():
            try:
                evaluate_unseen(r.run_dir, data, bn, out, plan.leave_out, plan.config.max_per_class,
                                device=plan.config.device)
            except Exception as e:
                log.exception("fold %d seed %d: unseen evaluation failed", r.fold, r.seed)
                r.status, r.detail = "failed", f"unseen evaluation (BN {bn}) failed: {type(e).__name__}: {e}"
                return
        r.unseen.append(str(out))


def _worker(plan: Plan, r: FoldRun) -> FoldRun:
    """A fold-run in a worker process of its own."""
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s fold{r.fold}-seed{r.seed} %(name)s: %(message)s")
    return execute(plan, r)


class ProtocolRunner:
    """Runs every fold and seed of one method and config; keeps OUT/protocol.json current."""

    def __init__(self, plan: Plan, out: Path, seeds: list[int], run_folds: list[int] | None = None,
                 jobs: int = 1) -> None:
        self.plan, self.out, self.seeds, self.jobs = plan, out, seeds, jobs
        config = plan.config
        folds = [0] if config.protocol == "official" else list(range(config.folds))
        if run_folds is not None:
            if not set(run_folds) <= set(folds):
                raise ConfigError(f"--run-folds {run_folds} must be among the folds {folds}")
            folds = run_folds
        self.runs = [FoldRun(f, s, str(out / f"fold{f}-seed{s}")) for s in seeds for f in folds]

    def record(self) -> None:
        p, c = self.plan, self.plan.config
        federated = METHODS[p.method].federated
        write_json(self.out / PROTOCOL_FILE, {
            "method": p.method, "mode": "federated" if federated else "centralized",
            "engine": p.engine if federated else "", "protocol": c.protocol, "protocol_text": PROTOCOL_TEXT[c.protocol],
            "model_selection": MODEL_SELECTION, "folds": c.folds, "seeds": self.seeds, "sites": list(c.sites),
            "leave_out": p.leave_out, "bn": list(p.bn_modes) if p.leave_out else [], "config_file": p.config_file,
            "overrides": p.overrides, "exclude_label_conflicts": c.exclude_label_conflicts,
            "federation_config": p.federation_config if federated and p.engine == "flower" else "",
            "jobs": self.jobs, "runs": [asdict(r) for r in self.runs],
        })

    def run(self, deadline: float | None = None) -> bool:
        """Every fold-run (failures are recorded and the rest still run); True if all completed. No fold-run starts
        after ``deadline`` (time.monotonic()); those stay "pending". ConfigError before anything trains when a
        fold-run's folder holds a finished run of other settings."""
        self.out.mkdir(parents=True, exist_ok=True)
        for r in self.runs:
            config = self.plan.config.replace(fold=r.fold, seed=r.seed, output_dir=r.folder, method=self.plan.method)
            if Path(r.folder).is_dir():
                finished_run(Path(r.folder), config)
        self.record()

        def may_start() -> bool:
            return deadline is None or time.monotonic() < deadline

        if self.jobs == 1:
            for i, r in enumerate(self.runs):
                if not may_start():
                    break
                self.runs[i] = execute(self.plan, r)
                self.record()
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(self.jobs, mp_context=context, max_tasks_per_child=1) as pool:
                waiting = list(range(len(self.runs)))
                running: dict[Future, int] = {}
                while waiting or running:
                    while waiting and len(running) < self.jobs and may_start():
                        i = waiting.pop(0)
                        running[pool.submit(_worker, self.plan, self.runs[i])] = i
                    if not running:
                        break
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        self.runs[running.pop(future)] = future.result()
                    self.record()
        for r in self.runs:
            if r.status == "pending":
                log.info("fold %d seed %d: not started (--stop-after reached)", r.fold, r.seed)
        return all(r.status == "completed" for r in self.runs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fl-covid-protocol", description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=FEDERATED_METHODS + CENTRAL_METHODS)
    parser.add_argument("--config", default="configs/default.yaml", help="YAML experiment config")
    parser.add_argument("--folds", type=int, default=4, help="K (default 4, as the paper)")
    parser.add_argument("--run-folds", help="comma-separated folds to run (default: all K), e.g. 0")
    parser.add_argument("--seeds", type=int, default=3, help="S: seeds 0..S-1 (default 3, as the paper)")
    parser.add_argument("--from-seed", type=int, default=0, metavar="F",
                        help="run seeds F..S-1 only (default 0), e.g. --seeds 5 --from-seed 3 for unseen folds")
    parser.add_argument("--protocol", choices=PROTOCOLS, help="split protocol (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--out", help="protocol folder (default: <output-dir>/protocol-<method>-<protocol>)")
    parser.add_argument("--leave-out", default="", metavar="SITE",
                        help="train on the other sites only, then evaluate each fold-run on SITE (unseen)")
    parser.add_argument("--bn", default="adapt", help="BN mode(s) for --leave-out, comma-separated "
                                                      "(adapt, average, site:NAME)")
    parser.add_argument("--engine", choices=ENGINES, default="inprocess",
                        help="federated fold-runs: the ServerApp and ClientApps in one process (default) or flwr run")
    parser.add_argument("--jobs", type=int, default=1, help="fold-runs at a time, each in a process of its own")
    parser.add_argument("--federation-config", default="client-resources-num-cpus=1",
                        help="Flower --federation-config for --engine flower (num-supernodes = number of sites)")
    parser.add_argument("--timeout", type=float, help="seconds per federated fold-run (--engine flower)")
    parser.add_argument("--stop-after", type=float, metavar="MINUTES",
                        help="start no fold-run after MINUTES (those in hand finish); run again to continue")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def make_runner(args: argparse.Namespace) -> ProtocolRunner:
    """The runner for parsed arguments; ConfigError for settings that cannot work, before anything trains."""
    if args.seeds < 1 or args.jobs < 1:
        raise ConfigError("--seeds and --jobs must be >= 1")
    if not 0 <= args.from_seed < args.seeds:
        raise ConfigError(f"--from-seed {args.from_seed} must be in 0..{args.seeds - 1} (--seeds {args.seeds})")
    if getattr(args, "stop_after", None) is not None and args.stop_after <= 0:
        raise ConfigError("--stop-after must be > 0 minutes")
    overrides = parse_overrides(args.set)
    if args.jobs > 1 and "num-threads" not in overrides:  # the cores divided between the fold-runs
        overrides["num-threads"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    config_file = str(resolve_config_file(args.config))
    fixed = {"folds": str(args.folds), **({"protocol": args.protocol} if args.protocol else {})}
    config = load_config(config_file, {**overrides, **fixed})
    bn_modes = tuple(b for b in args.bn.split(",") if b)
    if args.leave_out:
        if args.leave_out not in config.sites:
            raise ConfigError(f"--leave-out {args.leave_out!r} is not one of the config's sites {config.sites}")
        rest = [s for s in config.sites if s != args.leave_out]
        if not rest:
            raise ConfigError("--leave-out needs at least one other site to train on")
        config = config.replace(sites=rest)
        for bn in bn_modes:
            try:
                mode, _ = parse_bn(bn)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if mode.startswith("site:") and mode[5:] not in config.sites:
                raise ConfigError(f"--bn {bn!r}: {mode[5:]} is not one of the training sites {list(config.sites)}")
    out = Path(args.out) if args.out else config.resolved_output_dir() / (
        f"protocol-{args.method}-{config.protocol}" + (f"-without-{args.leave_out}" if args.leave_out else ""))
    federation_config = args.federation_config
    if "num-supernodes" not in federation_config:
        federation_config = f"num-supernodes={len(config.sites)} {federation_config}".strip()
    plan = Plan(config, args.method, app_config_name(config_file) if METHODS[args.method].federated else config_file,
                overrides, args.engine, federation_config, args.timeout, args.leave_out, bn_modes,
                not args.quiet and args.jobs == 1)
    return ProtocolRunner(plan, out.resolve(), list(range(args.from_seed, args.seeds)),
                          [int(f) for f in args.run_folds.split(",")] if args.run_folds else None, args.jobs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + 60 * args.stop_after if args.stop_after is not None else None

    def work() -> int:
        runner = make_runner(args)
        ok = runner.run(deadline)
        for r in runner.runs:
            print(f"fold {r.fold} seed {r.seed}: {r.status} {r.run_dir} {r.detail}".rstrip())
        print(f"report: fl-covid-report {runner.out} --out {runner.out}/report")
        print(runner.out)
        return 0 if ok else 1

    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
