"""Flower ServerApp: parse the run config, build the strategy, run the rounds, checkpoint, write results."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fl_covid import records as R
from fl_covid.checkpoint import ServerState
from fl_covid.config import Config, federated_config, to_json
from fl_covid.federated import initial_shared
from fl_covid.observe import emit
from fl_covid.policy import TRUST_ENV, load_server_trust
from fl_covid.privacy import run_privacy_report
from fl_covid.reporting import HISTORY_CSV, HISTORY_JSON, RunWriter, summary_lines, write_csv, write_json
from server.collect import send_and_collect
from server.signing import Signing
from server.strategy import SitesMixin, build_strategy

app = ServerApp()
log = logging.getLogger("flwr")  # streamed to the `flwr run` console
CHECKPOINT = "checkpoint"
PRIVACY_JSON = "privacy.json"


@dataclass
class Run:
    """A run directory being written: its writer (config, metric rows, results) and the checkpoint it resumes."""

    dir: Path
    writer: RunWriter
    saved: ServerState | None


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    config = federated_config(context.run_config)
    run = open_run(config, context.run_id)
    initial, proj_dim = initial_shared(config)
    layout = R.layout_of(initial)
    strategy = build_strategy(config, run.dir.name, R.layout_size(layout), proj_dim,
                              on_row=lambda kind, row: run.writer.log({"phase": kind, **row}),
                              on_aggregated=lambda rnd, s: emit("aggregated", round=rnd, bank=s.bank),
                              signing=signing(config, run, context.run_id))
    weights, first = initial, 1
    if run.saved is not None:
        weights, first = run.saved.shared, run.saved.round + 1
        strategy.restore(run.saved.bank, run.saved.optimizer)
        log.info("Resuming %s after round %d of %d", run.dir, run.saved.round, config.num_server_rounds)
    round_seconds = run_rounds(grid, strategy, config, run, layout, R.weights_record(R.flatten(weights, layout)),
                               first)
    finish(config, run, round_seconds, time.perf_counter() - started)


def signing(config: Config, run: Run, run_id: int) -> Signing | None:
    """End-to-end authentication when the SuperLink machine has a trust file (``$FL_COVID_SERVER_TRUST``; a
    deployment's sites refuse unsigned instructions); None otherwise (simulation). A run works in the folders of
    its own run id; a resumed run names the run it continues, from its directory ``<method>-run<ID>``."""
    if not os.environ.get(TRUST_ENV):
        return None
    origin = run_id
    if run.saved is not None:
        match = re.fullmatch(rf"{re.escape(config.method)}-run(\d+)", run.dir.name)
        if match is None:
            raise ValueError(f"config key 'resume': {run.dir} is not a run directory <method>-run<ID> of method "
                             f"{config.method}; the sites keep each run's state under its run id")
        origin = int(match.group(1))
    return Signing(load_server_trust(Path(os.environ[TRUST_ENV])), config, run_id, origin)


def open_run(config: Config, run_id: int) -> Run:
    """A new run's directory ``<output-dir>/<method>-run<run id>``, or the directory to resume (config key
    ``resume``: absolute or relative to output-dir) with its last checkpoint, checked against ``config``; rows of
    a round the interrupted run did not complete are dropped."""
    if not config.resume:
        run_dir = config.resolved_output_dir() / f"{config.method}-run{run_id}"
        run_dir.mkdir(parents=True, exist_ok=True)
        return Run(run_dir, RunWriter(run_dir, to_json(config)), None)
    run_dir = Path(config.resume).expanduser()
    run_dir = (run_dir if run_dir.is_absolute() else config.resolved_output_dir() / run_dir).resolve()
    saved = ServerState.load(run_dir / CHECKPOINT)
    if saved is None:
        raise FileNotFoundError(f"config key 'resume': no checkpoint in {run_dir / CHECKPOINT}; pass the run "
                                f"directory the server wrote, e.g. {config.resolved_output_dir()}/"
                                f"{config.method}-run<RUN ID>")
    saved.check_config(config.to_dict(), run_dir / CHECKPOINT)
    writer = RunWriter(run_dir, to_json(config))
    writer.rows = list(saved.history)
    write_csv(run_dir / HISTORY_CSV, writer.rows)
    write_json(run_dir / HISTORY_JSON, writer.rows)
    return Run(run_dir, writer, saved)


def run_rounds(grid: Grid, strategy: SitesMixin, config: Config, run: Run, layout: R.Layout, arrays: ArrayRecord,
               first: int) -> dict[str, float]:
    """Rounds ``first``..num-server-rounds, each a summary (when needed: evaluation of the previous round's
    weights, prototypes) and a training step, then the final summary (evaluation of the last weights); a
    checkpoint after every round. Returns each round's wall time (seconds, checkpoint included) by round."""
    timeout = config.round_timeout or None  # None: wait for every site
    round_seconds: dict[str, float] = {}
    for rnd in range(first, config.num_server_rounds + 1):
        started = time.perf_counter()
        log.info("[ROUND %d/%d] lr %.3g", rnd, config.num_server_rounds, strategy.lr_for(rnd))
        if strategy.summary_needed(rnd):
            summarise(grid, strategy, run, arrays, rnd, timeout)
        arrays = train(grid, strategy, arrays, rnd, timeout)
        save_round(config, run, strategy, layout, arrays, rnd)
        round_seconds[str(rnd)] = time.perf_counter() - started
        log.info("round %d took %.2f s", rnd, round_seconds[str(rnd)])
    summarise(grid, strategy, run, arrays, config.num_server_rounds + 1, timeout)
    return round_seconds


def train(grid: Grid, strategy: SitesMixin, arrays: ArrayRecord, server_round: int, timeout: float | None
          ) -> ArrayRecord:
    """The train message of ``server_round``; returns the global weights the strategy aggregates from the
    replies."""
    replies = send_and_collect(grid, strategy.configure_train(server_round, arrays, ConfigRecord(), grid), timeout)
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    return aggregated


def save_round(config: Config, run: Run, strategy: SitesMixin, layout: R.Layout, arrays: ArrayRecord,
               server_round: int) -> None:
    """After ``server_round``: the guarantee spent so far by each site's prototype releases (``privacy.json``,
    with DP) and the checkpoint a resume continues from (weights, bank, metric rows, server optimizer state)."""
    if config.dp_epsilon > 0:
        write_json(run.dir / PRIVACY_JSON, run_privacy_report(config, server_round))
    ServerState(server_round, R.unflatten(arrays[R.FLAT].numpy(), layout), strategy.bank, run.writer.rows,
                config.to_dict(), strategy.optimizer_state()).save(run.dir / CHECKPOINT)


def summarise(grid: Grid, strategy: SitesMixin, run: Run, arrays: ArrayRecord, server_round: int,
              timeout: float | None) -> None:
    """The summary message at the start of ``server_round``: the sites evaluate the weights (when due) and
    return their prototypes; the evaluation is logged as that of round ``server_round - 1``."""
    replies = send_and_collect(grid, strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid), timeout)
    strategy.aggregate_evaluate(server_round, replies)
    for site, r in _evaluations(run.writer.rows, server_round - 1).items():
        log.info("round %d %s: AUC %.4f (validation %.4f) accuracy %.4f", server_round - 1, site, r["auc"],
                 r["val_auc"], r["accuracy"])


def finish(config: Config, run: Run, round_seconds: dict[str, float], wall_seconds: float) -> None:
    """final_metrics.json and figures from the last round's evaluation rows (with the ServerApp's wall time,
    since this process started: a resumed run counts its own part); the final metrics to the log, at 0.5 and at
    each site's operating point."""
    last_eval = _evaluations(run.writer.rows, config.num_server_rounds)
    per_site = {s: {**r, "n": r[R.NUM_EXAMPLES]} for s, r in last_eval.items()}
    final = run.writer.finish(config.method, per_site, {s: r[R.ROC_TPR] for s, r in last_eval.items()},
                              protocol=config.protocol, fold=config.fold, seed=config.seed,
                              rounds=config.num_server_rounds, round_seconds=round_seconds,
                              wall_seconds=round(wall_seconds, 1))
    for line in summary_lines(final):
        log.info("FINAL %s %s", config.method, line)
    log.info("Results in %s", run.dir)


def _evaluations(rows: list[dict], server_round: int) -> dict[str, dict]:
    """Site name -> evaluation row of ``server_round``."""
    return {r["site"]: r for r in rows if r["phase"] == "evaluate" and r["round"] == server_round}
