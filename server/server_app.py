"""Flower ServerApp: parse the run config, run the rounds with PrototypeFedAvg, checkpoint, write results."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fl_covid import records as R
from fl_covid.checkpoint import ServerState
from fl_covid.config import Config, federated_config, to_json
from fl_covid.federated import initial_shared
from fl_covid.privacy import privacy_report
from fl_covid.reporting import HISTORY_CSV, HISTORY_JSON, RunWriter, write_csv, write_json
from server.strategy import PrototypeFedAvg

app = ServerApp()
log = logging.getLogger("flwr")  # streamed to the `flwr run` console
CHECKPOINT = "checkpoint"
PRIVACY_JSON = "privacy.json"


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = federated_config(context.run_config)
    run_dir, saved = _run_dir(config, str(context.run_config.get("resume", "") or ""), context.run_id)
    initial = initial_shared(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = RunWriter(run_dir, to_json(config))
    strategy = PrototypeFedAvg(
        method=config.method, site_names=config.sites, lr=config.lr, num_rounds=config.num_server_rounds,
        seed=config.seed, run_name=run_dir.name, min_sites=config.min_sites_required,
        expected={k: (tuple(v.shape), v.numpy().dtype) for k, v in initial.items()},
        max_update_norm=config.max_update_norm, compression=config.compression,
        weight_key=R.NUM_EXAMPLES if config.fedavg_weights == "dataset" else "examples_seen",
        on_row=lambda kind, row: writer.log({"phase": kind, **row}),
    )
    arrays, start = R.to_record(initial), 1
    if saved is not None:  # rows of a round the interrupted run did not complete are dropped
        arrays, start = R.to_record(saved.shared), saved.round + 1
        strategy.bank, writer.rows = saved.bank, saved.history
        write_csv(run_dir / HISTORY_CSV, writer.rows)
        write_json(run_dir / HISTORY_JSON, writer.rows)
        log.info("Resuming %s after round %d of %d", run_dir, saved.round, config.num_server_rounds)
    timeout = config.round_timeout or None  # None: wait for every sampled site
    round_seconds: dict[str, float] = {}  # wall time of each round run by this process, checkpoint included
    for rnd in range(start, config.num_server_rounds + 1):
        started = time.perf_counter()
        log.info("[ROUND %d/%d] lr %.3g", rnd, config.num_server_rounds, strategy.lr_for(rnd))
        replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, ConfigRecord(), grid), timeout=timeout)
        arrays, _ = strategy.aggregate_train(rnd, replies)
        if config.dp_epsilon > 0:  # the guarantee spent so far by each site's prototype releases
            write_json(run_dir / PRIVACY_JSON, privacy_report(config.dp_epsilon, config.dp_delta, config.dp_clip, rnd))
        replies = grid.send_and_receive(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid),
                                        timeout=timeout)
        strategy.aggregate_evaluate(rnd, replies)
        for site, r in _evaluations(writer.rows, rnd).items():
            log.info("round %d %s: AUC %.4f accuracy %.4f", rnd, site, r["auc"], r["accuracy"])
        ServerState(rnd, R.from_record(arrays), strategy.bank, writer.rows, config.to_dict()).save(run_dir / CHECKPOINT)
        round_seconds[str(rnd)] = time.perf_counter() - started
        log.info("round %d took %.2f s", rnd, round_seconds[str(rnd)])
    last_eval = _evaluations(writer.rows, config.num_server_rounds)
    per_site = {s: {**r, "n": r[R.NUM_EXAMPLES]} for s, r in last_eval.items()}
    final = writer.finish(config.method, per_site, {s: r[R.ROC_TPR] for s, r in last_eval.items()},
                          protocol=config.protocol, fold=config.fold, seed=config.seed,
                          rounds=config.num_server_rounds, round_seconds=round_seconds)
    for site, m in final["sites"].items():
        log.info("FINAL %s %s: AUC %.4f accuracy %.4f F1 %.4f sensitivity %.4f precision %.4f (n=%d)",
                 config.method, site, m["auc"], m["accuracy"], m["f1"], m["sensitivity"], m["precision"], m["n"])
    log.info("Results in %s", run_dir)


def _run_dir(config: Config, resume: str, run_id: int) -> tuple[Path, ServerState | None]:
    """A new run's directory ``<output-dir>/<method>-run<run id>``, or the directory to resume (run-config key
    ``resume``: absolute or relative to output-dir) with its last checkpoint, checked against ``config``."""
    if not resume:
        return config.resolved_output_dir() / f"{config.method}-run{run_id}", None
    run_dir = Path(resume).expanduser()
    run_dir = run_dir if run_dir.is_absolute() else config.resolved_output_dir() / run_dir
    saved = ServerState.load(run_dir / CHECKPOINT)
    if saved is None:
        raise FileNotFoundError(f"run-config key 'resume': no checkpoint in {run_dir / CHECKPOINT}; pass the run "
                                f"directory the server wrote, e.g. {config.resolved_output_dir()}/"
                                f"{config.method}-run<RUN ID>")
    saved.check_config(config.to_dict(), run_dir / CHECKPOINT)
    return run_dir, saved


def _evaluations(rows: list[dict], server_round: int) -> dict[str, dict]:
    """Site name -> evaluation row of ``server_round``."""
    return {r["site"]: r for r in rows if r["phase"] == "evaluate" and r["round"] == server_round}
