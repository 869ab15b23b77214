"""The benchmark's sections: each a function of the run's ``Bench`` returning a JSON-ready dict.

Every section uses the model, image size and batch size of the config (``--config``, ``--set``) except
``scaling`` (configs/smoke.yaml); throughputs are training images per second.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from bench import processes
from bench.bare import bare_throughput, site_loop, summary_seconds, timed
from fl_covid import records as R
from fl_covid.algorithms import ALGORITHMS
from fl_covid.centralized import run_central
from fl_covid.checkpoint import ServerState, optimizer_to_tensors
from fl_covid.config import COMPRESSIONS, Config, federated_config, load_config
from fl_covid.data import IndexStream, Site, Split, augment, load_configured_site, load_site
from fl_covid.experiments.federation import FlowerCLI, LocalGrid, default_run_config, free_port, run_in_process, wire
from fl_covid.federated import LocalState, Received, SiteRunner, initial_shared
from fl_covid.methods import FEDERATED_METHODS
from fl_covid.metrics import ROC_POINTS
from fl_covid.processes import process_table
from fl_covid.privacy import gdp_mu, privacy_report
from fl_covid.prototypes import PrototypeBank
from fl_covid.transport import quantize, weights_digest
from fl_covid.validation import check_bank, check_metrics, check_update, max_prototype_rows
from server.strategy import build_strategy

SMOKE = "configs/smoke.yaml"
FLOWER_TIMEOUT = 4 * 3600.0  # seconds a `flwr run` may take before it counts as failed
PROFILES = {  # quick: short timings on 2 busy cores; full: steadier numbers
    "quick": {"steps": 10, "rounds": 3, "central_per_class": 100, "scaling": (2, 4), "accuracy_rounds": 4,
              "pair_steps": 30},
    "full": {"steps": 50, "rounds": 5, "central_per_class": 0, "scaling": (2, 4, 8, 16), "accuracy_rounds": 10,
             "pair_steps": 0},  # 0: local-steps of the default run
}


@dataclass
class Bench:
    """One benchmark run: the command line, the config it resolves to, the profile, a scratch folder, and the
    results of the sections run so far."""

    args: argparse.Namespace
    config: Config
    profile: dict[str, Any]
    work: Path
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def threads(self) -> int:
        return int(self.args.threads)

    @property
    def extra(self) -> str:
        """The ``--set`` overrides, as a run config's ``overrides`` text."""
        return " ".join(self.args.set)

    @cached_property
    def site_data(self) -> tuple[Site, Split]:
        """The site timed alone (``--site``), decoded once."""
        return load_configured_site(self.config, self.config.sites.index(self.args.site))

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def _ms(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Median milliseconds of ``repeats`` calls."""
    return round(1000 * statistics.median(timed(fn)[1] for _ in range(repeats)), 2)


def _as_server() -> None:
    """Give this process the ServerApp's task identity, which Flower needs to build messages (as
    fl_covid.experiments.federation.run_in_process does)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


# ---------------------------------------------------------------- data and the training loop alone

def data(b: Bench, batches: int = 40) -> dict[str, Any]:
    """Decode + cache every configured site (fl_covid.data.load_site, thread pool); augmentation (crop, flips,
    normalisation) of training batches."""
    config, out = b.config, {}
    site = None
    for name in config.sites:
        site, seconds = timed(lambda name=name: load_site(config.resolved_data_root() / name, config.cache_size,
                                                          name=name, prep=config.preprocessing))
        out[name] = {"images": len(site), "seconds": round(seconds, 3),
                     "decode_cache_images_per_s": round(len(site) / seconds, 1)}
    assert site is not None
    g = torch.Generator().manual_seed(0)
    stream = IndexStream(np.arange(len(site)), g)
    _, seconds = timed(lambda: [augment(site.images[stream.next(config.batch_size)], config.image_size, g)
                                for _ in range(batches)])
    out["augment_images_per_s"] = round(batches * config.batch_size / seconds, 1)
    return out


def _fedbn(config: Config) -> Config:
    """The method the single-site references train: FedBN's loss (cross-entropy only), as the `flower` and
    `central` sections."""
    return config.replace(method="fedbn")


def bare(b: Bench) -> dict[str, Any]:
    """train_steps alone on ``--site`` (FedBN's loss), median of 3 timings; the summary pass of a round."""
    cfg = _fedbn(b.config)
    site, split = b.site_data
    out = bare_throughput(cfg, site, split, b.profile["steps"])
    out["summary_seconds"] = round(summary_seconds(cfg, site, split), 3)
    return out


def threads(b: Bench) -> dict[str, float]:
    """The bare loop with 1 .. cpu-count torch threads (images/s)."""
    site, split = b.site_data
    out = {}
    try:
        for n in range(1, (os.cpu_count() or 1) + 1):
            torch.set_num_threads(n)
            out[str(n)] = bare_throughput(_fedbn(b.config), site, split, max(2, b.profile["steps"] // 2),
                                          repeats=1)["images_per_s"]
    finally:
        torch.set_num_threads(b.threads)
    return out


def torch_compile(b: Bench, repeats: int = 3) -> dict[str, Any]:
    """Eager vs torch.compile (inductor) of the model's forward passes, training only; the timings alternate so
    that a change of machine load hits both. The first compiled steps include the compilation."""
    site, split = b.site_data
    cfg, steps = _fedbn(b.config), b.profile["steps"]
    loops = {"eager": site_loop(cfg, site, split), "compiled": site_loop(cfg, site, split, compiled=True)}
    out: dict[str, Any] = {f"{name}_warmup_seconds": round(timed(lambda loop=loop: loop(2))[1], 2)
                           for name, loop in loops.items()}
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            times[name].append(timed(lambda loop=loop: loop(steps))[1])
    for name in loops:
        out[f"{name}_images_per_s"] = round(steps * cfg.batch_size / statistics.median(times[name]), 2)
    out["speedup"] = round(out["compiled_images_per_s"] / out["eager_images_per_s"], 3)
    return out


def central(b: Bench) -> dict[str, Any]:
    """fl-covid-central, method single, on ``--site``, two epochs: throughput of epoch 2 from its metrics.json."""
    cfg = b.config.replace(sites=(b.args.site,), epochs=2, max_per_class=b.profile["central_per_class"],
                           output_dir=str(b.folder("central")))
    run_dir, wall = timed(lambda: run_central(cfg, "single", show_progress=False))
    _, split = load_configured_site(cfg, 0)
    steps = math.ceil(len(split.train) / cfg.batch_size)
    rows = [r for r in json.loads((run_dir / "metrics.json").read_text()) if r["epoch"] == 2]
    seconds = float(rows[0]["seconds"])
    return {"steps_per_epoch": steps, "epoch2_seconds": round(seconds, 3), "wall_seconds": round(wall, 2),
            "images_per_s": round(steps * cfg.batch_size / seconds, 2)}


# ---------------------------------------------------------------- Flower

def _summarised_rounds(config: Config) -> set[int]:
    """Rounds that start with a summary message, as the server's strategy decides."""
    strategy = build_strategy(config, "bench", 0, 0)
    return {r for r in range(1, config.num_server_rounds + 1) if strategy.summary_needed(r)}


def flower(b: Bench) -> dict[str, Any]:
    """`flwr run` on Ray, one supernode training ``--site`` with FedBN: the client's train ``seconds`` per round
    (metrics.json), the server's round wall time (final_metrics.json ``round_seconds``); the round overhead is the
    round's wall time minus the client's training and, in rounds that start with one, its summary pass (timed in
    this process). Rounds after the first are the steady state."""
    steps, rounds = b.profile["steps"], b.profile["rounds"]
    cfg = _fedbn(b.config).replace(sites=(b.args.site,), local_steps=steps, num_server_rounds=rounds)
    summary_s = b.results.get("bare", {}).get("summary_seconds")
    if summary_s is None:
        summary_s = summary_seconds(cfg, *b.site_data)
    output = b.folder("flower")
    run_config = {"config-file": b.args.config, "method": "fedbn", "num-server-rounds": rounds, "local-steps": steps,
                  "output-dir": str(output),
                  "overrides": f"sites={b.args.site} num-threads={b.threads} {b.extra}".strip()}
    with FlowerCLI(f"num-supernodes=1 client-resources-num-cpus={b.threads}", FLOWER_TIMEOUT,
                   home=b.folder("flwr-home-flower")) as cli:
        run = processes.flower_run(cli, run_config, output, "fedbn")
    rows = [r for r in run.json("metrics.json") if r["phase"] == "train"]
    round_s = {int(k): float(v) for k, v in run.json("final_metrics.json")["round_seconds"].items()}
    summarised = _summarised_rounds(cfg)
    per_round = []
    for r in sorted(round_s):
        train_s = next(float(row["seconds"]) for row in rows if row["round"] == r)
        site_s = train_s + (summary_s if r in summarised else 0.0)
        per_round.append({"round": r, "round_seconds": round(round_s[r], 3), "train_seconds": round(train_s, 3),
                          "summary": r in summarised, "images_per_s": round(steps * cfg.batch_size / train_s, 2),
                          "overhead_seconds": round(round_s[r] - site_s, 3)})
    steady = per_round[1:] or per_round
    return {"rounds": per_round, "wall_seconds": round(run.wall_seconds, 2),
            "startup_and_final_summary_seconds": round(run.wall_seconds - sum(round_s.values()), 2),
            "images_per_s": round(statistics.median(r["images_per_s"] for r in steady), 2),
            "round_overhead_s": round(statistics.median(r["overhead_seconds"] for r in steady), 3),
            "summary_seconds_subtracted": round(summary_s, 3), **run.memory}


# ---------------------------------------------------------------- per message: time and bytes

def _site_state(runner: SiteRunner) -> LocalState:
    """A site's state after a round: its BN and Adam's moments, created by one step."""
    optimizer = torch.optim.Adam(runner.model.parameters(), lr=runner.config.lr)
    runner.model.train()
    runner.model(torch.randn(2, 3, runner.config.image_size, runner.config.image_size)).sum().backward()
    optimizer.step()
    local = {k: v.detach().clone() for k, v in runner.model.state_dict().items() if k in runner.local_keys}
    return LocalState(local, optimizer_to_tensors(optimizer), 1)


def components(b: Bench) -> dict[str, float]:
    """Milliseconds of what a ClientApp and the ServerApp do per message besides training, with the default run's
    method (pyproject): parse the config, build the site's model, flatten / encode / decode the flat weights in
    each compression, digests and checks, a site's state files, the server's checkpoint, Flower's serialisation
    of a weights message, the summary pass."""
    run_config = default_run_config(**{"config-file": b.args.config, "overrides": b.extra})
    cfg = federated_config(run_config)
    site, split = b.site_data
    runner = SiteRunner(cfg, 0, site, split, torch.device("cpu"))
    state = runner.model.state_dict()
    shared = {k: state[k] for k in runner.keys}
    flat = R.flatten(shared, runner.layout)
    size = len(flat)
    rng = np.random.default_rng(0)
    held = flat + rng.normal(0, 1e-3, size).astype(np.float32)  # the sites' copy, one round behind
    local = _site_state(runner)
    work = b.folder("components")
    out: dict[str, float] = {
        "shared_weights_MB": round(flat.nbytes / 2 ** 20, 2),
        "optimizer_state_MB": round(sum(v.numel() * v.element_size() for v in local.optimizer.values()) / 2 ** 20, 2),
        "config_parse_server": _ms(lambda: federated_config(run_config)),
        "config_parse_site": _ms(lambda: federated_config(run_config, at_site=True)),
        "site_model_build": _ms(lambda: SiteRunner(cfg, 0, site, split, torch.device("cpu"))),
        "flatten": _ms(lambda: R.flatten(shared, runner.layout)),
        "unflatten": _ms(lambda: R.unflatten(flat, runner.layout)),
        "weights_digest": _ms(lambda: weights_digest(flat)),
    }
    for c in COMPRESSIONS:
        if c == "int8":  # a difference from the weights the other side holds, error fed back by the caller
            record = R.difference_record(*quantize(flat - held))
            out["encode_int8"] = _ms(lambda: R.difference_record(*quantize(flat - held)))
            out["decode_int8"] = _ms(lambda record=record: held + R.read_difference(record, size))
        else:
            record = R.weights_record(flat, c)
            out[f"encode_{c}"] = _ms(lambda c=c: R.weights_record(flat, c))
            out[f"decode_{c}"] = _ms(lambda c=c, record=record: R.read_weights(record, size, c))
    _as_server()
    for c in ("none", "fp16"):
        msg = Message(RecordDict({R.WEIGHTS: R.weights_record(flat, c)}), dst_node_id=1, message_type="evaluate",
                      group_id="1")
        out[f"flower_serialisation_weights_message_{c}"] = _ms(lambda msg=msg: wire(msg))
    metrics = MetricRecord({R.NUM_EXAMPLES: 500, R.SITE_ID: 0, **{k: 0.5 for k in R.TRAIN_METRICS}})
    out["check_update"] = _ms(lambda: check_update(flat, 10.0, held))
    out["check_reply_metrics"] = _ms(lambda: check_metrics(metrics, R.TRAIN_REPLY_METRICS))
    if cfg.spec.prototypes:
        dim, rows = runner.model.proj_dim, max_prototype_rows(cfg, len(cfg.sites))
        record = R.bank_to_record(_bank(len(cfg.sites), cfg.prototypes_per_class, dim))

        def read_and_check() -> str | None:
            return check_bank(R.read_bank(record, dim, rows), cfg, dim, rows)

        out["prototype_bank_read_and_check"] = _ms(read_and_check)
    out["site_state_save"] = _ms(lambda: local.save(work / "site-state"))
    out["site_state_load"] = _ms(lambda: LocalState.load(work / "site-state"))
    received = Received(flat, local.bn, 1)
    out["received_weights_save"] = _ms(lambda: received.save(work / "received"))
    out["received_weights_load"] = _ms(lambda: Received.load(work / "received"))
    history = [{"phase": "train", "round": 1, "site": s, "loss": 0.5} for s in cfg.sites] * 10
    out["server_checkpoint_save"] = _ms(lambda: ServerState(1, shared, _bank(len(cfg.sites), 1, 128), history,
                                                            cfg.to_dict()).save(work / "server"))
    out["privacy_report_dp_epsilon_50_105_releases"] = _ms(lambda: (gdp_mu.cache_clear(),  # calibration included
                                                                    privacy_report(50.0, 1e-5, 1.0, 105)))
    out["summary_pass_with_evaluation"] = round(1000 * summary_seconds(cfg, site, split), 1)
    out["summary_pass_without_evaluation"] = round(1000 * summary_seconds(cfg, site, split, evaluate_now=False), 1)
    return out


def _bank(num_sites: int, per_class: int, dim: int, count: int = 50) -> PrototypeBank:
    """A bank of random unit prototypes, ``per_class`` per class and site."""
    bank = PrototypeBank.empty(dim)
    for s in range(num_sites):
        rows = 2 * per_class
        bank = bank.merge(PrototypeBank.of_site(s, F.normalize(torch.randn(rows, dim), dim=1),
                                                torch.arange(rows) % 2, torch.full((rows,), count)))
    return bank


def round_bytes(config: Config, num_sites: int) -> dict[str, Any]:
    """Bytes one site receives and sends in a steady round (round 2) of ``config``'s method and compression, as
    serialised Flower messages (protobuf, without gRPC framing). The server's messages come from the real strategy
    (configure_evaluate / configure_train: the summary message when the round has one, the train message with the
    digest or with the weights); the replies are built with the record functions the ClientApp uses (prototypes,
    evaluation metrics with the ROC, trained weights or their int8 difference with its scales, the method's own
    vectors)."""
    _as_server()
    initial, proj_dim = initial_shared(config)
    layout = R.layout_of(initial)
    flat = R.flatten(initial, layout)
    strategy = build_strategy(config, f"{config.method}-run1", len(flat), proj_dim)
    if config.spec.prototypes:
        strategy.restore(_bank(num_sites, config.prototypes_per_class, proj_dim), {})
    grid = LocalGrid(default_run_config(), num_sites)  # its message factory and node ids only
    rng = np.random.default_rng(0)
    sent: dict[str, Message] = {}
    for rnd in (1, 2):  # under int8 the weights of round 2 travel as a difference from those of round 1
        arrays = R.weights_record(flat + rng.normal(0, 1e-3, len(flat)).astype(np.float32))
        sent.pop("summary", None)
        if strategy.summary_needed(rnd):
            sent["summary"] = next(iter(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid)))
        sent["train"] = next(iter(strategy.configure_train(rnd, arrays, ConfigRecord(), grid)))
    replies: dict[str, Message] = {}
    if "summary" in sent:
        metrics: dict[str, Any] = {R.NUM_EXAMPLES: 180, R.SITE_ID: 0}
        if sent["summary"].content[R.CONFIG][R.EVALUATE]:
            metrics.update({k: 0.5 for k in R.EVALUATION_METRICS if k != R.ROC_TPR})
            metrics[R.ROC_TPR] = [0.5] * ROC_POINTS
        content = RecordDict({R.METRICS: MetricRecord(metrics)})
        if config.spec.prototypes:
            content[R.PROTOTYPES] = R.bank_to_record(_bank(1, config.prototypes_per_class, proj_dim))
        replies["summary_reply"] = Message(content, reply_to=sent["summary"])
    trained = flat + rng.normal(0, 1e-3, len(flat)).astype(np.float32)
    weights = (R.difference_record(*quantize(trained - flat)) if config.compression == "int8"
               else R.weights_record(trained, config.compression))
    content = RecordDict({
        R.WEIGHTS: weights,
        R.METRICS: MetricRecord({R.NUM_EXAMPLES: 500, R.SITE_ID: 0, **{k: 0.5 for k in R.TRAIN_METRICS}})})
    if sends := strategy.algorithm.site_sends:  # the method's own vectors (SCAFFOLD's control change)
        content[R.PAYLOAD] = R.payload_record({n: rng.normal(0, 1e-3, len(flat)).astype(np.float32) for n in sends})
    replies["train_reply"] = Message(content, reply_to=sent["train"])
    down = {k: message_to_proto(sent[k]).ByteSize() for k in ("summary", "train") if k in sent}
    up = {k: message_to_proto(m).ByteSize() for k, m in replies.items()}
    return {"server_to_site": sum(down.values()), "site_to_server": sum(up.values()),
            "summary_every_round": "summary" in sent, "values_shared": len(flat),
            "detail": {"server_to_site": down, "site_to_server": up}}


def bytes_per_round(b: Bench) -> dict[str, Any]:
    """Bytes per site and steady round, per direction, for every federated method and compression (a combination
    the method's algorithm refuses is recorded with its reason)."""
    sites = len(b.config.sites)
    out: dict[str, Any] = {}
    for m in FEDERATED_METHODS:
        for c in COMPRESSIONS:
            config = b.config.replace(method=m, compression=c)
            refused = ALGORITHMS[config.spec.algorithm].violations(config)
            out.setdefault(m, {})[c] = {"refused": refused[0]} if refused else round_bytes(config, sites)
    return out


# ---------------------------------------------------------------- more sites, accuracy, Ray cluster

def _virtual_sites(config: Config, k: int, dest: Path) -> list[str]:
    """Split the configured sites' images into ``k`` site folders (symlinks + manifest.csv), keeping each
    patient / near-duplicate group whole and both classes at every site."""
    items = []
    for name in config.sites:
        site = load_site(config.resolved_data_root() / name, 16, name=name)
        items += [(site.root / p, int(y), f"{name}:{g}") for p, y, g in zip(site.paths, site.labels.tolist(),
                                                                                   site.groups)]
    rng = np.random.default_rng(0)
    names = [f"site_{i:02d}" for i in range(k)]
    rows: dict[str, list[dict[str, str]]] = {n: [] for n in names}
    for label in (0, 1):  # deal the groups of each class round-robin, so every site gets both classes
        groups = sorted({g for _, y, g in items if y == label})
        owner = {g: names[i % k] for i, g in enumerate(rng.permutation(groups))}
        for src, y, g in items:
            if y == label and g in owner:
                rows[owner[g]].append({"src": str(src), "label": ("NonCOVID", "COVID")[y], "patient_id": g})
    for n in names:
        for i, row in enumerate(rows[n]):
            rel = f"{row['label']}/{i:05d}{Path(row['src']).suffix}"
            (dest / n / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / n / rel).symlink_to(row["src"])
            row["path"] = rel
        with open(dest / n / "manifest.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "label", "patient_id"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows[n])
    return names


def scaling(b: Bench) -> dict[str, Any]:
    """Two fedbn-proto rounds of the smoke model with k virtual sites (k supernodes, 1 CPU each): round 1 carries
    each client's start-up (imports, decoding its site), round 2 is the steady state."""
    smoke = load_config(SMOKE)
    out: dict[str, Any] = {}
    for k in b.profile["scaling"]:
        names = _virtual_sites(b.config, k, b.folder(f"sites-{k}"))
        output = b.folder(f"scaling-{k}")
        run_config = {"config-file": SMOKE, "method": "fedbn-proto", "num-server-rounds": 2, "local-steps": 2,
                      "data-root": str(b.work / f"sites-{k}"), "output-dir": str(output),
                      "overrides": f"sites={','.join(names)} num-threads=1"}
        with FlowerCLI(f"num-supernodes={k} client-resources-num-cpus=1", FLOWER_TIMEOUT,
                       home=b.folder(f"flwr-home-scaling-{k}")) as cli:
            run = processes.flower_run(cli, run_config, output, "fedbn-proto")
        rows = run.json("metrics.json")
        final = run.json("final_metrics.json")
        per_site = round_bytes(smoke.replace(sites=tuple(names), method="fedbn-proto"), k)
        site_bytes = per_site["server_to_site"] + per_site["site_to_server"]
        out[str(k)] = {"round_seconds": round(final["round_seconds"]["2"], 2),
                       "first_round_seconds": round(final["round_seconds"]["1"], 2),
                       "wall_seconds": round(run.wall_seconds, 2),
                       "client_train_seconds_sum": round(sum(r["seconds"] for r in rows
                                                             if r["phase"] == "train" and r["round"] == 2), 2),
                       "bytes_per_round_all_sites": k * site_bytes, "bytes_per_round_per_site": site_bytes,
                       "peak_rss_mb_server_process": run.memory["peak_rss_mb_server_process"],
                       "peak_rss_mb_whole_simulation": run.memory["peak_rss_mb_whole_simulation"],
                       "peak_rss_mb_per_client_max": max(run.memory["peak_rss_mb_per_client"], default=0.0)}
    ks = [int(k) for k in out]
    if len(ks) > 1:
        slope = np.polyfit(ks, [out[str(k)]["round_seconds"] for k in ks], 1)[0]
        mem = np.polyfit(ks, [out[str(k)]["peak_rss_mb_server_process"] for k in ks], 1)[0]
        out["fit"] = {"round_seconds_per_extra_site": round(float(slope), 3),
                      "server_rss_mb_per_extra_site": round(float(mem), 2)}
    return out


def accuracy(b: Bench) -> dict[str, Any]:
    """fedbn-proto with each compression, same seed, in process (the real ServerApp and ClientApps over Flower's
    wire format, no Ray): final AUC and accuracy per site."""
    out = {}
    for c in COMPRESSIONS:
        output = b.folder(f"accuracy-{c}")
        run_config = default_run_config(**{
            "config-file": b.args.config, "method": "fedbn-proto", "num-server-rounds": b.profile["accuracy_rounds"],
            "local-steps": b.profile["steps"], "output-dir": str(output),
            "overrides": f"compression={c} num-threads={b.threads} {b.extra}".strip()})
        grid, seconds = timed(lambda run_config=run_config: run_in_process(LocalGrid(run_config, len(b.config.sites))))
        final = json.loads((output / f"fedbn-proto-run{grid.run.run_id}" / "final_metrics.json").read_text())
        out[c] = {"seconds": round(seconds, 1), **{s: {m: round(v[m], 4) for m in ("auc", "accuracy")}
                                                   for s, v in final["sites"].items()}}
    return out


def ray_cluster(b: Bench) -> dict[str, Any]:
    """Start a Ray head and a second Ray node on loopback, run a smoke simulation with RAY_ADDRESS pointing at
    the head, and record on which node's raylet each ClientApp actor ran. Stops both nodes by PID."""
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    port = free_port()
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats"]
    actors: dict[int, str] = {}
    try:
        subprocess.run(["ray", "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(["ray", "start", f"--address=127.0.0.1:{port}", *common], check=True, capture_output=True,
                       timeout=120)
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                table = process_table()
                for pid, process in table.items():
                    parent = table.get(process.parent)
                    if process.command.startswith("ray::ClientAppActor") and parent and str(temp) in parent.command:
                        actors[pid] = parent.command.split("--raylet_socket_name=")[-1].split()[0]
                stop.wait(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        output = b.folder("ray-cluster")
        with FlowerCLI("num-supernodes=2 client-resources-num-cpus=1", FLOWER_TIMEOUT,
                       home=b.folder("flwr-home-ray-cluster")) as cli:
            cli.env["RAY_ADDRESS"] = f"127.0.0.1:{port}"  # inherited by the SuperLink it starts, then Ray's driver
            run = processes.flower_run(cli, {"config-file": SMOKE, "num-server-rounds": 1, "local-steps": 2,
                                             "output-dir": str(output)}, output, "fedbn-proto")
        stop.set()
        watcher.join()
    finally:
        processes.kill_tree(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
    raylets = sorted(set(actors.values()))
    return {"ray_address": f"127.0.0.1:{port}", "nodes": 2, "wall_seconds": round(run.wall_seconds, 2),
            "client_actor_raylets": [r.rsplit("/", 1)[-1] for r in raylets],
            "actors_spread_over_nodes": len(raylets) == 2}
