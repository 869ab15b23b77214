"""Flower ServerApp: parse the run config, run the rounds with PrototypeFedAvg, checkpoint, write results."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fl_covid import records as R
from fl_covid.checkpoint import StateStore
from fl_covid.config import federated_config, to_json
from fl_covid.federated import initial_shared
from fl_covid.prototypes import PrototypeBank
from fl_covid.reporting import HISTORY_JSON, RunWriter
from server.strategy import PrototypeFedAvg

app = ServerApp()
log = logging.getLogger("flwr")  # streamed to the `flwr run` console
CHECKPOINT = "checkpoint"


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = federated_config(context.run_config)
    resume = str(context.run_config.get("resume", "") or "")
    run_dir = Path(resume) if resume else config.resolved_output_dir() / f"{config.method}-run{context.run_id}"
    initial = initial_shared(config)
    store = StateStore(run_dir / CHECKPOINT)
    saved = store.load(("shared", "bank")) if resume else None
    if resume and saved is None:
        raise FileNotFoundError(f"resume: no checkpoint under {run_dir / CHECKPOINT}")
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = RunWriter(run_dir, to_json(config))
    strategy = PrototypeFedAvg(
        method=config.method, site_names=config.sites, lr=config.lr, num_rounds=config.num_server_rounds,
        seed=config.seed, run_name=run_dir.name, min_sites=config.min_sites_required,
        expected={k: (tuple(v.shape), v.numpy().dtype) for k, v in initial.items()},
        on_row=lambda kind, row: writer.log({"phase": kind, **row}),
    )
    arrays, start = R.to_record(initial), 1
    if saved is not None:
        tensors, meta = saved
        arrays, start = R.to_record(tensors["shared"]), int(meta["round"]) + 1
        strategy.bank = PrototypeBank.from_sites(
            {} if not len(tensors.get("bank", {}).get("vectors", [])) else
            {int(s): (tensors["bank"]["vectors"][tensors["bank"]["sites"] == s],
                      tensors["bank"]["counts"][tensors["bank"]["sites"] == s])
             for s in tensors["bank"]["sites"].unique().tolist()})
        writer.rows = [r for r in json.loads((run_dir / HISTORY_JSON).read_text()) if r["round"] < start]
        log.info("Resuming %s from round %d", run_dir, start)
    last_eval: dict[str, dict] = {}
    for rnd in range(start, config.num_server_rounds + 1):
        log.info("[ROUND %d/%d] lr %.3g", rnd, config.num_server_rounds, strategy.lr_for(rnd))
        replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(rnd, replies)
        replies = grid.send_and_receive(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid))
        strategy.aggregate_evaluate(rnd, replies)
        last_eval = {r["site"]: r for r in writer.rows if r["phase"] == "evaluate" and r["round"] == rnd}
        for site, r in last_eval.items():
            log.info("round %d %s: AUC %.4f accuracy %.4f", rnd, site, r["auc"], r["accuracy"])
        bank = strategy.bank
        store.save({"shared": R.from_record(arrays),
                    "bank": {"vectors": bank.vectors, "labels": bank.labels, "sites": bank.sites,
                             "counts": bank.counts}},
                   {"round": rnd, "method": config.method, "seed": config.seed,
                    "sampling": "python random re-seeded with seed * 100003 + round before each sampling"})
    per_site = {s: {**r, "n": r[R.NUM_EXAMPLES]} for s, r in last_eval.items()}
    final = writer.finish(config.method, per_site, {s: r[R.ROC_TPR] for s, r in last_eval.items()},
                          protocol=config.protocol, fold=config.fold, seed=config.seed,
                          rounds=config.num_server_rounds)
    for site, m in final["sites"].items():
        log.info("FINAL %s %s: AUC %.4f accuracy %.4f F1 %.4f sensitivity %.4f precision %.4f (n=%d)",
                 config.method, site, m["auc"], m["accuracy"], m["f1"], m["sensitivity"], m["precision"], m["n"])
    log.info("Results in %s", run_dir)
