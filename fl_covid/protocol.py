"""K folds x S seeds of one method and config, centralized in-process or federated through ``flwr run``.

``fl-covid-protocol --method fedbn-proto --config configs/default.yaml --folds 4 --seeds 3 --out runs/table``
writes one ordinary run directory per fold and seed under ``OUT/fold<f>-seed<s>/`` and ``OUT/protocol.json``
(protocol, settings, every fold-run's status). A fold-run that already finished is reused, so an interrupted
protocol continues where it stopped. Seed s also seeds the fold assignment: S seeds are S repetitions of K-fold
cross-validation, and the same (fold, seed) gives the same split for every method (paired t-tests).
A federated fold-run counts only when ``flwr ls`` says ``finished:completed`` and its final_metrics.json holds
every site: ``flwr run``'s exit code is not trusted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fl_covid.centralized import run_central
from fl_covid.config import (
    PROTOCOLS, Config, ConfigError, load_config, parse_overrides, project_root, resolve_config_file, to_json,
)
from fl_covid.methods import CENTRAL_METHODS, FEDERATED_METHODS, METHODS
from fl_covid.data import DataError
from fl_covid.reporting import CONFIG_JSON, FINAL_METRICS, write_json
from fl_covid.unseen import evaluate_unseen

log = logging.getLogger(__name__)

PROTOCOL_FILE = "protocol.json"
PROTOCOL_TEXT = {
    "grouped": "stratified K-fold with every patient (Site B) and near-duplicate cluster (Site A) in one part "
               "(StratifiedGroupKFold); validation carved from the training folds the same way",
    "image": "stratified K-fold over single images, as in the paper (near-duplicate slices can leak between parts)",
    "official": "the manifest's train/val/test split (one split; fold is ignored)",
}
# settings that do not change what a run learns: a finished fold-run with other values is still reused
REUSE_IGNORES = frozenset({"output-dir", "device", "num-threads", "resume", "site-nodes"})
MODEL_SELECTION = ("none: the last epoch (centralized) or round (federated) is evaluated on the test fold; the "
                   "validation part is only monitored")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_mentioning(text: str) -> list[int]:
    """PIDs (other than this one) whose command line contains ``text``."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(proc.name))
            except OSError:
                continue
    return out


def run_config_string(values: dict[str, Any]) -> str:
    """Flower ``--run-config`` text: strings in single quotes, numbers and booleans bare."""
    parts = []
    for k, v in values.items():
        if isinstance(v, str):
            if "'" in v:
                raise ConfigError(f"run config value {k}={v!r} contains a single quote, which Flower cannot pass")
            parts.append(f"{k}='{v}'")
        elif isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


class FlowerCLI:
    """``flwr run`` against a private managed local SuperLink (own FLWR_HOME and ports), stopped by PID on close."""

    def __init__(self, federation_config: str, timeout: float | None = None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="fl-covid-flwr-"))
        self.federation_config = federation_config
        self.timeout = timeout
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }

    def run(self, run_config: dict[str, Any]) -> tuple[int | None, str]:
        """Start one run and stream it to the end; returns (run id or None if it did not start, output)."""
        cmd = ["flwr", "run", str(project_root()), "--stream", "--run-config", run_config_string(run_config),
               "--federation-config", self.federation_config]
        log.info("%s", " ".join(cmd))
        try:
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=self.timeout)
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            output = f"{e.stdout or ''}{e.stderr or ''}\nflwr run timed out after {self.timeout} s"
        match = re.search(r"Successfully started run (\d+)", output)
        return (int(match.group(1)) if match else None), output

    def status(self, run_id: int) -> str:
        """The run's status from ``flwr ls`` (e.g. ``finished:completed``), or ``unknown: ...``."""
        proc = subprocess.run(["flwr", "ls", "--run-id", str(run_id), "--format", "json"], cwd=project_root(),
                              env=self.env, capture_output=True, text=True, timeout=120)
        try:
            runs = json.loads(proc.stdout)["runs"]
            return next(r["status"] for r in runs if int(r["run-id"]) == run_id)
        except (json.JSONDecodeError, KeyError, StopIteration) as e:
            return f"unknown: flwr ls gave no status ({type(e).__name__}): {(proc.stdout + proc.stderr)[-300:]}"

    def close(self) -> None:
        """Stop the SuperLink (and anything else) started under this private FLWR_HOME, then remove it."""
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            for pid in pids_mentioning(str(self.home)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while pids_mentioning(str(self.home)) and time.time() < deadline:
                time.sleep(0.3)
        shutil.rmtree(self.home, ignore_errors=True)


def finished_run(folder: Path, config: Config) -> Path | None:
    """The run directory in ``folder`` that finished this fold-run (``config``: method, fold, seed, sites), else
    None; ConfigError when it was trained with other settings (reusing it would mix settings in one table)."""
    wanted = json.loads(to_json(config))
    for final in sorted(folder.glob(f"*/{FINAL_METRICS}"), reverse=True):
        try:
            f = json.loads(final.read_text())
            saved = json.loads((final.parent / CONFIG_JSON).read_text())
        except (json.JSONDecodeError, FileNotFoundError):
            continue
        if ((f.get("method"), f.get("fold"), f.get("seed")) != (config.method, config.fold, config.seed)
                or set(f.get("sites", {})) != set(config.sites)):
            continue
        diff = [f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now" for k in sorted(set(saved) | set(wanted))
                if k not in REUSE_IGNORES and saved.get(k) != wanted.get(k)]
        if diff:
            raise ConfigError(f"{final.parent} finished this fold-run with other settings ({'; '.join(diff)}); "
                              "use another --out or remove it")
        return final.parent
    return None


class ProtocolRunner:
    """Runs every fold and seed of one method and config; keeps OUT/protocol.json current."""

    def __init__(self, config: Config, method: str, out: Path, seeds: list[int], config_file: str,
                 overrides: dict[str, str], leave_out: str = "", bn_modes: tuple[str, ...] = ("adapt",),
                 federation_config: str = "client-resources-num-cpus=1", timeout: float | None = None,
                 show_progress: bool = True, run_folds: list[int] | None = None) -> None:
        self.config, self.method, self.out, self.seeds = config, method, out, seeds
        self.config_file, self.overrides = config_file, overrides
        self.leave_out, self.bn_modes = leave_out, bn_modes
        self.federated = METHODS[method].federated
        self.timeout, self.show_progress = timeout, show_progress
        if self.federated and "num-supernodes" not in federation_config:
            federation_config = f"num-supernodes={len(config.sites)} {federation_config}".strip()
        self.federation_config = federation_config
        folds = [0] if config.protocol == "official" else list(range(config.folds))
        if run_folds is not None:
            if not set(run_folds) <= set(folds):
                raise ConfigError(f"--run-folds {run_folds} must be among the folds {folds}")
            folds = run_folds
        self.flower_home: Path | None = None  # private FLWR_HOME of the current federated protocol
        self.runs = [FoldRun(f, s, str(out / f"fold{f}-seed{s}")) for s in seeds for f in folds]

    def record(self) -> None:
        c = self.config
        write_json(self.out / PROTOCOL_FILE, {
            "method": self.method, "mode": "federated" if self.federated else "centralized",
            "protocol": c.protocol, "protocol_text": PROTOCOL_TEXT[c.protocol], "model_selection": MODEL_SELECTION,
            "folds": c.folds, "seeds": self.seeds, "sites": list(c.sites), "leave_out": self.leave_out,
            "bn": list(self.bn_modes) if self.leave_out else [], "config_file": self.config_file,
            "overrides": self.overrides, "exclude_label_conflicts": c.exclude_label_conflicts,
            "federation_config": self.federation_config if self.federated else "",
            "runs": [asdict(r) for r in self.runs],
        })

    def run(self) -> bool:
        """Every fold-run in turn (failures are recorded and the rest still run); True if all completed."""
        self.out.mkdir(parents=True, exist_ok=True)
        flower = FlowerCLI(self.federation_config, self.timeout) if self.federated else None
        self.flower_home = flower.home if flower is not None else None
        try:
            for r in self.runs:
                self._one(r, flower)
                self.record()
        finally:
            if flower is not None:
                flower.close()
        return all(r.status == "completed" for r in self.runs)

    def _one(self, r: FoldRun, flower: FlowerCLI | None) -> None:
        config = self.config.replace(fold=r.fold, seed=r.seed, output_dir=r.folder, method=self.method)
        folder = Path(r.folder)
        folder.mkdir(parents=True, exist_ok=True)
        done = finished_run(folder, config)
        if done is not None:
            log.info("fold %d seed %d: reusing %s", r.fold, r.seed, done)
            r.run_dir, r.status, r.detail = str(done), "completed", "reused"
        elif flower is None:
            try:
                r.run_dir, r.status = str(run_central(config, self.method, self.show_progress)), "completed"
            except Exception as e:  # noqa: BLE001 - record the failed fold-run, run the others, exit non-zero
                log.exception("fold %d seed %d failed", r.fold, r.seed)
                r.status, r.detail = "failed", f"{type(e).__name__}: {e}"
        else:
            self._federated(r, config, flower)
        log.info("fold %d seed %d: %s %s %s", r.fold, r.seed, r.status, r.run_dir, r.detail)
        if r.status == "completed" and self.leave_out:
            self._unseen(r)

    def _federated(self, r: FoldRun, config: Config, flower: FlowerCLI) -> None:
        c = config
        run_id, output = flower.run({
            "config-file": self.config_file, "method": self.method, "num-server-rounds": c.num_server_rounds,
            "local-steps": c.local_steps, "seed": r.seed, "fold": r.fold, "output-dir": r.folder,
            "data-root": str(c.resolved_data_root()),
            "overrides": " ".join(f"{k}={v}" for k, v in self._fixed_overrides().items()),
        })
        Path(r.folder, "flwr-run.log").write_text(output)
        if run_id is None:
            r.status, r.detail = "failed", f"flwr run did not start a run (see {r.folder}/flwr-run.log)"
            return
        status = flower.status(run_id)
        run_dir = Path(r.folder) / f"{self.method}-run{run_id}"
        r.run_dir = str(run_dir)
        if status != "finished:completed":
            r.status, r.detail = "failed", f"run {run_id} status {status} (see {r.folder}/flwr-run.log)"
            return
        try:
            done = finished_run(Path(r.folder), c)
        except ConfigError as e:
            r.status, r.detail = "failed", f"run {run_id} did not train with the intended settings: {e}"
            return
        if done != run_dir:
            r.status, r.detail = "failed", f"run {run_id} completed without final metrics of every site in {run_dir}"
        else:
            r.status, r.detail = "completed", f"run {run_id} {status}"

    def _fixed_overrides(self) -> dict[str, str]:
        """Everything not in Flower's run config travels in ``overrides``; values must hold no spaces."""
        c = self.config
        values = {**self.overrides, "folds": str(c.folds), "protocol": c.protocol, "sites": ",".join(c.sites)}
        values = {k: v for k, v in values.items()
                  if k.replace("_", "-") not in ("num-server-rounds", "local-steps", "seed", "fold", "method",
                                                 "output-dir", "data-root")}
        for k, v in values.items():
            if not v or any(ch.isspace() for ch in v):
                raise ConfigError(f"override {k}={v!r} must be non-empty and hold no spaces to pass through Flower")
        return values

    def _unseen(self, r: FoldRun) -> None:
        data = self.config.resolved_data_root() / self.leave_out
        for bn in self.bn_modes:
            out = Path(r.run_dir) / f"unseen-{self.leave_out}-{bn.replace(':', '-')}"
            if not (out / FINAL_METRICS).is_file():
                try:
                    evaluate_unseen(r.run_dir, data, bn, out, self.leave_out, self.config.max_per_class,
                                    device=self.config.device)
                except Exception as e:  # noqa: BLE001 - recorded like a failed fold-run
                    log.exception("fold %d seed %d: unseen evaluation failed", r.fold, r.seed)
                    r.status, r.detail = "failed", f"unseen evaluation (BN {bn}) failed: {type(e).__name__}: {e}"
                    return
            r.unseen.append(str(out))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fl-covid-protocol", description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=FEDERATED_METHODS + CENTRAL_METHODS)
    parser.add_argument("--config", default="configs/default.yaml", help="YAML experiment config")
    parser.add_argument("--folds", type=int, default=4, help="K (default 4, as the paper)")
    parser.add_argument("--run-folds", help="comma-separated folds to run (default: all K), e.g. 0")
    parser.add_argument("--seeds", type=int, default=3, help="S: seeds 0..S-1 (default 3, as the paper)")
    parser.add_argument("--protocol", choices=PROTOCOLS, help="split protocol (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--out", help="protocol folder (default: <output-dir>/protocol-<method>-<protocol>)")
    parser.add_argument("--leave-out", default="", metavar="SITE",
                        help="train on the other sites only, then evaluate each fold-run on SITE (unseen)")
    parser.add_argument("--bn", default="adapt", help="BN mode(s) for --leave-out, comma-separated "
                                                      "(adapt, average, site:NAME)")
    parser.add_argument("--federation-config", default="client-resources-num-cpus=1",
                        help="Flower --federation-config (num-supernodes is set to the number of sites)")
    parser.add_argument("--timeout", type=float, help="seconds per federated fold-run")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def make_runner(args: argparse.Namespace) -> ProtocolRunner:
    """The runner for parsed arguments; ConfigError for settings that cannot work, before anything trains."""
    if args.seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    overrides = parse_overrides(args.set)
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
            if bn not in ("adapt", "average") and not (bn.startswith("site:") and bn[5:] in config.sites):
                raise ConfigError(f"--bn {bn!r} must be adapt, average or site:NAME with NAME one of the training "
                                  f"sites {list(config.sites)}")
    out = Path(args.out) if args.out else config.resolved_output_dir() / (
        f"protocol-{args.method}-{config.protocol}" + (f"-without-{args.leave_out}" if args.leave_out else ""))
    return ProtocolRunner(config, args.method, out.resolve(), list(range(args.seeds)), config_file, overrides,
                          args.leave_out, bn_modes, args.federation_config, args.timeout, not args.quiet,
                          [int(f) for f in args.run_folds.split(",")] if args.run_folds else None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        runner = make_runner(args)
        ok = runner.run()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in runner.runs:
        print(f"fold {r.fold} seed {r.seed}: {r.status} {r.run_dir} {r.detail}".rstrip())
    print(f"report: fl-covid-report {runner.out} --out {runner.out}/report")
    print(runner.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
