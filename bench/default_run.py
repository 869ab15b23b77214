"""``--default-run``: the rounds of the default run (configs/default.yaml with pyproject's run config, or its first
``--rounds N`` rounds) timed for real, in process and as a Ray simulation, against bare training loops.

* The reference: one bare loop per site (``bench.bare``, 1 torch thread each), run side by side in their own
  processes on the same cores, ``local-steps`` steps each; their images per second of wall time together.
* In process: the real ServerApp and ClientApps in this process (``run_in_process``, sites one after the other),
  on a grid that times each exchange (a message to every site and the replies) and, inside it, each site's
  ClientApp call. Per round: training (the sites' train ``seconds`` metric), the ClientApp's work around it
  (config, model, state files, encoding), the summary (the ClientApp's summary call, timed around it), Flower's
  serialisation both ways (exchange minus calls) and the server's own work (round minus exchanges: strategy,
  checks, aggregation, checkpoint).
* Ray simulation: `flwr run` with one supernode per site and 1 CPU each, as the README runs it. Per round:
  training (the sites' ``seconds`` metric), the summary and the ClientApp's work around training as measured in
  process, and the rest of the round's wall time: serialisation, transfer, the server's work and waiting.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Message

from bench import processes
from bench.bare import timed
from bench.sections import FLOWER_TIMEOUT, Bench
from fl_covid import records as R
from fl_covid.config import Config, federated_config
from fl_covid.experiments.federation import FlowerCLI, LocalGrid, default_run_config, run_in_process


class TimedGrid(LocalGrid):
    """A LocalGrid that times every exchange (``push_messages``: one message to every site, which answers at once)
    and, within it, each site's ClientApp call; the rest of an exchange is Flower's serialisation both ways."""

    def __init__(self, run_config: dict[str, Any], num_nodes: int) -> None:
        super().__init__(run_config, num_nodes)
        self.exchanges: list[dict[str, Any]] = []
        self._calls: dict[int, float] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._calls = {}
        started = time.perf_counter()
        ids = list(super().push_messages(messages))
        seconds = time.perf_counter() - started
        first = messages[0]
        self.exchanges.append({"round": int(first.content[R.CONFIG][R.ROUND]),
                               "kind": "summary" if first.metadata.message_type == "evaluate" else "train",
                               "seconds": seconds, "sites": dict(self._calls)})
        return ids

    def call(self, msg: Message, context: Context) -> Message:  # type: ignore[override]
        started = time.perf_counter()
        reply = LocalGrid.call(msg, context)
        self._calls[self.partition(msg.metadata.dst_node_id)] = time.perf_counter() - started
        return reply


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _train_seconds(rows: list[dict[str, Any]], server_round: int) -> dict[str, float]:
    """Site -> the ``seconds`` metric of its train reply in ``server_round``."""
    return {r["site"]: float(r["seconds"]) for r in rows if r["phase"] == "train" and r["round"] == server_round}


def bare_pair(b: Bench, config: Config, steps: int) -> dict[str, Any]:
    """One bare loop per site, 1 torch thread each, side by side in their own processes."""
    commands = [[sys.executable, "-m", "bench.bare", "--config-json", json.dumps(config.to_dict()),
                 "--site-index", str(i), "--steps", str(steps), "--threads", "1"] for i in range(len(config.sites))]
    loops = processes.run_in_step(commands, b.folder("bare-pair"))
    window = max(loop["end"] for loop in loops) - min(loop["start"] for loop in loops)
    return {"steps": steps, "loops": len(loops), "window_seconds": round(window, 3),
            "images_per_s": round(sum(loop["images"] for loop in loops) / window, 2),
            "images_per_s_per_loop": {loop["site"]: loop["images_per_s"] for loop in loops}}


def in_process(b: Bench, values: dict[str, Any], config: Config) -> dict[str, Any]:
    """The default run in this process, every exchange timed."""
    output = b.folder("default-in-process")
    grid = TimedGrid(default_run_config(**{**values, "output-dir": str(output)}), len(config.sites))
    _, wall = timed(lambda: run_in_process(grid))
    run_dir = output / f"{config.method}-run{grid.run.run_id}"
    rows = json.loads((run_dir / "metrics.json").read_text())
    round_s = {int(k): float(v) for k, v in json.loads((run_dir / "final_metrics.json").read_text())
               ["round_seconds"].items()}
    per_round = []
    for r in sorted(round_s):
        exchanges = [e for e in grid.exchanges if e["round"] == r]
        train = _train_seconds(rows, r)
        calls = {kind: {config.sites[p]: s for e in exchanges if e["kind"] == kind for p, s in e["sites"].items()}
                 for kind in ("summary", "train")}
        exchange_s = sum(e["seconds"] for e in exchanges)
        sites_s = sum(calls["summary"].values()) + sum(calls["train"].values())
        per_round.append({
            "round": r, "wall_seconds": _r(round_s[r]),
            "train_seconds": _r(sum(train.values())),
            "client_around_train_seconds": _r(sum(calls["train"].values()) - sum(train.values())),
            "summary_seconds": _r(sum(calls["summary"].values())),
            "serialisation_seconds": _r(exchange_s - sites_s),
            "server_seconds": _r(round_s[r] - exchange_s),
            "transfer_and_waiting_seconds": _r(round_s[r] - sites_s),
            "per_site": {s: {"train": _r(train.get(s)), "summary": _r(calls["summary"].get(s)),
                             "around_train": _r(calls["train"][s] - train[s]) if s in train else None}
                         for s in config.sites}})
    final = [e for e in grid.exchanges if e["round"] > max(round_s)]
    return {"rounds": per_round, "wall_seconds": round(wall, 2), "rounds_seconds": round(sum(round_s.values()), 2),
            "final_summary_seconds": round(sum(e["seconds"] for e in final), 2)}


def ray_simulation(b: Bench, values: dict[str, Any], config: Config, measured: dict[str, Any] | None
                   ) -> dict[str, Any]:
    """The default run as `flwr run` on Ray, one supernode per site with 1 CPU each. ``measured``: the in-process
    run's rounds, whose summary and ClientApp times stand in for those the replies do not carry."""
    output = b.folder("default-ray")
    federation = f"num-supernodes={len(config.sites)} client-resources-num-cpus=1"
    with FlowerCLI(federation, FLOWER_TIMEOUT, home=b.folder("flwr-home-default")) as cli:
        run = processes.flower_run(cli, {**values, "output-dir": str(output)}, output, config.method)
    rows = run.json("metrics.json")
    round_s = {int(k): float(v) for k, v in run.json("final_metrics.json")["round_seconds"].items()}
    local = {r["round"]: r["per_site"] for r in (measured or {}).get("rounds", [])}
    per_round = []
    for r in sorted(round_s):
        train = _train_seconds(rows, r)
        sites = local.get(r)
        summary = around = None
        if sites is not None:  # the server waits for the slowest site of each exchange
            summary = max((v["summary"] or 0.0) for v in sites.values())
            around = max((v["around_train"] or 0.0) for v in sites.values())
            train_exchange = max(train[s] + (sites[s]["around_train"] or 0.0) for s in train)
        else:
            train_exchange = max(train.values())
        sites_s = train_exchange + (summary or 0.0)
        per_round.append({
            "round": r, "wall_seconds": _r(round_s[r]), "train_seconds_max": _r(max(train.values())),
            "train_seconds_per_site": {s: _r(v) for s, v in train.items()},
            "summary_seconds_max_in_process": _r(summary), "client_around_train_seconds_max_in_process": _r(around),
            "transfer_and_waiting_seconds": _r(round_s[r] - sites_s)})
    return {"federation_config": federation, "rounds": per_round, "wall_seconds": round(run.wall_seconds, 2),
            "rounds_seconds": round(sum(round_s.values()), 2),
            "startup_and_final_summary_seconds": round(run.wall_seconds - sum(round_s.values()), 2), **run.memory}


def default_run(b: Bench) -> dict[str, Any]:
    """The default run's rounds, in process and on Ray (``--engines``), against one bare loop per site."""
    values: dict[str, Any] = {"config-file": b.args.config}
    if b.args.rounds:
        values["num-server-rounds"] = b.args.rounds
    if b.extra:
        values["overrides"] = b.extra
    config = federated_config(default_run_config(**values))
    engines = [e for e in b.args.engines.split(",") if e]
    images_per_round = config.local_steps * config.batch_size * len(config.sites)
    out: dict[str, Any] = {"method": config.method, "rounds": config.num_server_rounds,
                           "local_steps": config.local_steps, "sites": list(config.sites),
                           "images_per_round": images_per_round, "torch_threads_in_process": b.threads}
    pair_steps = b.profile["pair_steps"] or config.local_steps
    out["bare_pair"] = reference = bare_pair(b, config, pair_steps)
    if "inprocess" in engines:
        out["in_process"] = in_process(b, values, config)
    if "ray" in engines:
        out["ray"] = ray_simulation(b, values, config, out.get("in_process"))
    for engine in ("in_process", "ray"):
        if engine in out:
            e = out[engine]
            e["images_per_s"] = round(config.num_server_rounds * images_per_round / e["rounds_seconds"], 2)
            e["images_per_s_incl_startup"] = round(config.num_server_rounds * images_per_round / e["wall_seconds"], 2)
            e["throughput_ratio_vs_bare_pair"] = round(e["images_per_s"] / reference["images_per_s"], 3)
    if "in_process" in out:  # sites take turns in one process: compare with one loop too
        one = statistics.mean(reference["images_per_s_per_loop"].values())
        out["in_process"]["throughput_ratio_vs_one_bare_loop"] = round(out["in_process"]["images_per_s"] / one, 3)
    return out



SHORT_ROUND_STEPS = (5, 10, 105)


def short_rounds(b: Bench) -> dict[str, Any]:
    """Steady-state cost of short rounds: the default run's method and sites at 5, 10 and 105 local steps per
    round, the same image budget each (``SHORT_ROUND_STEPS``; quick: 210 steps per site, full: 1050), in process
    and on Ray, against one bare loop per site side by side. Steady state: every round but the first (which
    decodes the sites and builds the model). Reports rounds per minute and the federation's training images per
    second over those rounds, and the ratio to the bare loops' images per second together."""
    budget = 210 if b.args.quick else 1050
    base = federated_config(default_run_config(**{"config-file": b.args.config}))
    reference = bare_pair(b, base, b.profile["pair_steps"] or 105)
    engines = [e for e in b.args.engines.split(",") if e]
    out: dict[str, Any] = {"image_budget_steps_per_site": budget, "bare_pair": reference, "by_steps": {}}
    for steps in SHORT_ROUND_STEPS:
        rounds = max(3, budget // steps)
        values: dict[str, Any] = {"config-file": b.args.config, "num-server-rounds": rounds, "local-steps": steps,
                                  **({"overrides": b.extra} if b.extra else {})}
        config = federated_config(default_run_config(**values))
        images_per_round = steps * config.batch_size * len(config.sites)
        row: dict[str, Any] = {"rounds": rounds}
        measured = None
        for engine in engines:
            sub = b.folder(f"short-{steps}-{engine}")
            run = (in_process(dataclasses.replace(b, work=sub), values, config) if engine == "inprocess" else
                   ray_simulation(dataclasses.replace(b, work=sub), values, config, measured))
            if engine == "inprocess":
                measured = run
            steady = [r["wall_seconds"] for r in run["rounds"][1:]]
            seconds = sum(steady)
            row[engine] = {"rounds_per_minute": round(60 * len(steady) / seconds, 2),
                           "images_per_s": round(len(steady) * images_per_round / seconds, 2),
                           "throughput_ratio_vs_bare_pair": round(len(steady) * images_per_round / seconds
                                                                  / reference["images_per_s"], 3),
                           "median_round_seconds": round(statistics.median(steady), 3),
                           "wall_seconds": run["wall_seconds"], "rounds_detail": run["rounds"]}
        out["by_steps"][str(steps)] = row
    return out
