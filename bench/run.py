"""Speed, overhead, memory and transfer sizes of fl-covid, measured side by side in one run.

    python bench/run.py --quick --out bench/quick.json      # about 3-5 minutes on 2 CPU cores
    python bench/run.py --out bench/full.json               # + 8 and 16 virtual sites, longer timings
    python bench/run.py --sections accuracy,ray-cluster,compile --out bench/extra.json

Sections (``--sections``, default: the first six):
  data         decode + cache (fl_covid.data.load_site) and augmentation throughput
  bare         fl_covid.engine.train_steps alone on one site (the reference)
  threads      the same with 1 .. cpu-count torch threads (what num-threads / client-resources-num-cpus set)
  central      the centralized trainer (fl-covid-central, method single) on the same site
  flower       `flwr run .` on Ray with one supernode for the same site: client throughput from the run's
               metrics.json, round wall time from final_metrics.json, peak memory (RSS) per process
  components   milliseconds of the per-message work around training that makes up the round overhead
  bytes        bytes per site and round, per direction, for every method and compression
  scaling      2, 4 (8, 16 in full mode) virtual sites split from the data by patient / duplicate group,
               smoke-sized model, one round each: round time, server memory, bytes
  accuracy     the in-process federation (real ServerApp and ClientApps, no Ray) with each compression
  ray-cluster  a Flower simulation attached to a running two-node Ray cluster (RAY_ADDRESS)
  compile      torch.compile of the model's forward passes vs eager

Same model, image size and batch size (the config's) everywhere except ``scaling`` (configs/smoke.yaml).
Every Flower run uses a private Flower home and ports (tests/flower_local.py) and is checked by its status,
not its exit code. Memory is resident set size read from /proc: peaks per process (VmHWM) and the largest sum
over the simulation's process tree seen by a 0.2 s sampler (shared pages count once per process).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flwr.app import ConfigRecord, MetricRecord  # noqa: E402

from fl_covid import records as R  # noqa: E402
from fl_covid.centralized import run_central  # noqa: E402
from fl_covid.config import COMPRESSIONS, FEDERATED_METHODS, Config, load_config, parse_overrides  # noqa: E402
from fl_covid.data import IndexStream, Site, Split, augment, load_configured_site, load_site  # noqa: E402
from fl_covid.checkpoint import ServerState, optimizer_to_tensors  # noqa: E402
from fl_covid.engine import Chunk, evaluate, make_optimizer, train_steps  # noqa: E402
from fl_covid.federated import LocalState, shared_keys  # noqa: E402
from fl_covid.model import create_model  # noqa: E402
from fl_covid.prototypes import PrototypeBank  # noqa: E402
from fl_covid.reporting import write_json  # noqa: E402
from tests.flower_local import LocalFlower, free_port  # noqa: E402

log = logging.getLogger("bench")
SMOKE = "configs/smoke.yaml"
DEFAULT_SECTIONS = ("data", "bare", "threads", "central", "flower", "components", "bytes", "scaling")
ALL_SECTIONS = DEFAULT_SECTIONS + ("accuracy", "ray-cluster", "compile")
PROFILES = {  # quick: fits 5 minutes on 2 busy cores; full: steadier numbers
    "quick": {"steps": 10, "rounds": 3, "central_per_class": 100, "scaling": (2, 4), "accuracy_rounds": 4},
    "full": {"steps": 50, "rounds": 5, "central_per_class": 0, "scaling": (2, 4, 8, 16), "accuracy_rounds": 10},
}


# ---------------------------------------------------------------- processes and memory (Linux /proc)

def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    table = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            table[int(d.name)] = (ppid, cmd)
    return table


def _descendants(roots: list[int], table: dict[int, tuple[int, str]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [p for p in roots if p in table]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += children.get(pid, [])
    return out


def _memory_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def _role(cmd: str) -> str:
    if "ClientAppActor" in cmd:
        return "client"
    if "flwr-simulation" in cmd:
        return "server"  # the ServerApp and the Ray driver share this process
    if "flower-superlink" in cmd or "flower-superexec" in cmd:
        return "superlink"
    return "ray"


class MemorySampler:
    """Samples the process tree under every process whose command line mentions ``marker``."""

    def __init__(self, marker: str, interval: float = 0.2) -> None:
        self.marker, self.interval = marker, interval
        self.peak_mb: dict[int, tuple[str, float]] = {}  # pid -> (role, VmHWM)
        self.peak_total_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            table = _proc_table()
            total = 0.0
            for pid in _descendants([p for p, (_, c) in table.items() if self.marker in c], table):
                try:
                    rss, hwm = _memory_mb(pid)
                except OSError:
                    continue
                total += rss
                role, peak = self.peak_mb.get(pid, ("ray", 0.0))
                if role == "ray":  # a Ray worker becomes a ClientAppActor only once its actor starts
                    role = _role(table[pid][1])
                self.peak_mb[pid] = (role, max(hwm, peak))
            self.peak_total_mb = max(self.peak_total_mb, total)
            self._stop.wait(self.interval)

    def summary(self) -> dict[str, Any]:
        by_role: dict[str, list[float]] = {}
        for role, mb in self.peak_mb.values():
            by_role.setdefault(role, []).append(round(mb, 1))
        return {"peak_rss_mb_per_client": sorted(by_role.get("client", []), reverse=True),
                "peak_rss_mb_server_process": max(by_role.get("server", [0.0])),
                "peak_rss_mb_whole_simulation": round(self.peak_total_mb, 1),
                "processes_seen": {k: len(v) for k, v in by_role.items()}}


def _flower_run(flower: LocalFlower, run_config: str, federation: str, output: Path, method: str
                ) -> tuple[Path, float, dict[str, Any]]:
    """`flwr run` with memory sampling; returns (run dir, wall seconds, memory summary). Fails on a failed run."""
    with MemorySampler(str(flower.home)) as sampler:
        started = time.perf_counter()
        run_id, output_text = flower.run(run_config, federation)
        wall = time.perf_counter() - started
    status = flower.status(run_id)
    run_dir = output / f"{method}-run{run_id}"
    if status != "finished:completed" or not (run_dir / "final_metrics.json").is_file():
        raise RuntimeError(f"flwr run {run_id} ended {status}:\n{output_text[-3000:]}")
    return run_dir, wall, sampler.summary()


# ---------------------------------------------------------------- sections

def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def bench_data(config: Config, batches: int = 40) -> dict[str, Any]:
    """Decode + cache every configured site; augmentation (crop + flips + normalisation) of training batches."""
    out: dict[str, Any] = {}
    site = None
    for name in config.sites:
        site, seconds = _timed(lambda: load_site(config.resolved_data_root() / name, config.cache_size, name=name))
        out[name] = {"images": len(site), "seconds": round(seconds, 3),
                     "decode_cache_images_per_s": round(len(site) / seconds, 1)}
    assert site is not None
    g = torch.Generator().manual_seed(0)
    stream = IndexStream(np.arange(len(site)), g)
    _, seconds = _timed(lambda: [augment(site.images[stream.next(config.batch_size)], config.image_size, g)
                                 for _ in range(batches)])
    out["augment_images_per_s"] = round(batches * config.batch_size / seconds, 1)
    return out


def _site_loop(config: Config, site: Site, split: Split, seed: int = 0
               ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], list[Chunk]]]:
    """A site's model, optimizer and batch source, as fl_covid.federated.SiteRunner builds them."""
    torch.manual_seed(config.seed)
    model = create_model(config.arch, config.width, 1, image_size=config.image_size)
    stream = IndexStream(split.train, torch.Generator().manual_seed(seed))

    def next_batch() -> list[Chunk]:
        idx = stream.next(config.batch_size)
        return [Chunk(0, site.images[idx], site.labels[idx])]

    return model, make_optimizer(model, config.lr), next_batch


def bench_bare(config: Config, site: Site, split: Split, steps: int, warmup: int = 2, repeats: int = 3,
               with_evaluation: bool = True) -> dict[str, Any]:
    """train_steps alone (alpha 0, as fedbn), median of ``repeats`` timings of ``steps`` steps after ``warmup``;
    then one evaluation of the test fold, the client's other work in a round."""
    model, optimizer, next_batch = _site_loop(config, site, split)
    g = torch.Generator().manual_seed(1)

    def run(n: int) -> dict[str, float]:
        return train_steps(model, optimizer, next_batch, n, image_size=config.image_size, generator=g,
                           grad_clip=config.grad_clip)

    _, warmup_s = _timed(lambda: run(warmup))
    seconds = statistics.median(_timed(lambda: run(steps))[1] for _ in range(repeats))
    out = {"steps": steps, "seconds": round(seconds, 3), "warmup_seconds": round(warmup_s, 3),
           "images_per_s": round(steps * config.batch_size / seconds, 2)}
    if with_evaluation:
        test = split.test
        eval_s = statistics.median(_timed(lambda: evaluate(model, site.images[test], site.labels[test], 0,
                                                           config.image_size))[1] for _ in range(repeats))
        out.update(evaluate_seconds=round(eval_s, 3), test_images=len(test))
    return out


def bench_compile(config: Config, site: Site, split: Split, steps: int, repeats: int = 3) -> dict[str, Any]:
    """Eager vs torch.compile (inductor) of the model's forward passes, training only; the timings alternate so
    that a change of machine load hits both. The first compiled steps include the compilation."""
    loops = {}
    for name in ("eager", "compiled"):
        model, optimizer, next_batch = _site_loop(config, site, split)
        if name == "compiled":
            model.forward_features = torch.compile(model.forward_features)  # type: ignore[method-assign]
            model.forward_head = torch.compile(model.forward_head)  # type: ignore[method-assign]
        g = torch.Generator().manual_seed(1)
        loops[name] = (lambda n, m=model, o=optimizer, b=next_batch, g=g: train_steps(
            m, o, b, n, image_size=config.image_size, generator=g, grad_clip=config.grad_clip))
    out: dict[str, Any] = {f"{name}_warmup_seconds": round(_timed(lambda: loop(2))[1], 2)
                           for name, loop in loops.items()}
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            times[name].append(_timed(lambda: loop(steps))[1])
    for name in loops:
        out[f"{name}_images_per_s"] = round(steps * config.batch_size / statistics.median(times[name]), 2)
    out["speedup"] = round(out["compiled_images_per_s"] / out["eager_images_per_s"], 3)
    return out


def bench_central(config: Config, site_name: str, per_class: int, output: Path) -> dict[str, Any]:
    """fl-covid-central method single on one site, two epochs; throughput of epoch 2 from its metrics.json."""
    cfg = config.replace(sites=(site_name,), epochs=2, max_per_class=per_class, output_dir=str(output))
    run_dir, wall = _timed(lambda: run_central(cfg, "single", show_progress=False))
    _, split = load_configured_site(cfg, 0)
    steps = math.ceil(len(split.train) / cfg.batch_size)
    rows = [r for r in json.loads((run_dir / "metrics.json").read_text()) if r["epoch"] == 2]
    seconds = float(rows[0]["seconds"])
    return {"steps_per_epoch": steps, "epoch2_seconds": round(seconds, 3), "wall_seconds": round(wall, 2),
            "images_per_s": round(steps * cfg.batch_size / seconds, 2)}


def bench_flower(flower: LocalFlower, config_file: str, extra: str, site_name: str, steps: int, rounds: int,
                 threads: int, eval_seconds: float, output: Path) -> dict[str, Any]:
    """One supernode training ``site_name`` (fedbn) for ``rounds`` rounds; rounds after the first are steady."""
    output.mkdir(parents=True, exist_ok=True)
    run_config = (f"config-file='{config_file}' method='fedbn' num-server-rounds={rounds} local-steps={steps} "
                  f"output-dir='{output}' overrides='sites={site_name} num-threads={threads} {extra}'")
    run_dir, wall, memory = _flower_run(flower, run_config, f"num-supernodes=1 client-resources-num-cpus={threads}",
                                        output, "fedbn")
    cfg = json.loads((run_dir / "config.json").read_text())
    rows = [r for r in json.loads((run_dir / "metrics.json").read_text()) if r["phase"] == "train"]
    round_s = {int(k): v for k, v in json.loads((run_dir / "final_metrics.json").read_text())["round_seconds"].items()}
    per_round = []
    for r in sorted(round_s):
        train_s = next(float(row["seconds"]) for row in rows if row["round"] == r)
        per_round.append({"round": r, "round_seconds": round(round_s[r], 3), "train_seconds": round(train_s, 3),
                          "images_per_s": round(steps * cfg["batch-size"] / train_s, 2),
                          "overhead_seconds": round(round_s[r] - train_s - eval_seconds, 3)})
    steady = per_round[1:] or per_round
    return {"rounds": per_round, "wall_seconds": round(wall, 2),
            "startup_seconds": round(wall - sum(round_s.values()), 2),
            "images_per_s": statistics.median(r["images_per_s"] for r in steady),
            "round_overhead_s": statistics.median(r["overhead_seconds"] for r in steady),
            "evaluate_seconds_subtracted": eval_seconds, **memory}


def bench_components(config: Config, work: Path, repeats: int = 3) -> dict[str, float]:
    """Median milliseconds of what a ClientApp and the ServerApp do per message besides training: parse the
    config, build the model, move the optimizer state in and out of context.state, persist the site's and the
    server's state, encode and decode weights."""
    def ms(fn: Callable[[], Any]) -> float:
        return round(1000 * statistics.median(_timed(fn)[1] for _ in range(repeats)), 1)

    model = create_model(config.arch, config.width, 1, image_size=config.image_size)
    optimizer = make_optimizer(model, config.lr)
    model(torch.randn(2, 3, config.image_size, config.image_size)).sum().backward()
    optimizer.step()  # creates Adam's moments
    opt_state = optimizer_to_tensors(optimizer)
    keys = shared_keys(model, "fedbn-proto")
    state = model.state_dict()
    shared = {k: state[k] for k in keys}
    local = LocalState({k: v for k, v in state.items() if k not in keys}, opt_state, 1)
    opt_record, fp16_record = R.to_record(opt_state), R.to_record(shared, "fp16")
    bank = PrototypeBank.from_sites({0: (F.normalize(torch.randn(2, 128), dim=1), torch.tensor([3, 4]))})
    rows = [{"phase": "train", "round": 1, "site": "a", "loss": 0.5}] * 20
    return {
        "federated_config": ms(lambda: load_config("configs/default.yaml", {"sites": config.sites})),
        "create_model": ms(lambda: create_model(config.arch, config.width, 1, image_size=config.image_size)),
        "optimizer_state_MB": round(sum(v.numel() * v.element_size() for v in opt_state.values()) / 2 ** 20, 1),
        "optimizer_state_to_record": ms(lambda: R.to_record(opt_state)),
        "optimizer_state_from_record": ms(lambda: R.from_record(opt_record)),
        "weights_to_record_none": ms(lambda: R.to_record(shared)),
        "weights_to_record_fp16": ms(lambda: R.to_record(shared, "fp16")),
        "weights_decode_fp16": ms(lambda: R.decode_tensors(fp16_record)),
        "site_state_save": ms(lambda: local.save(work / "site-state")),
        "server_state_save": ms(lambda: ServerState(1, shared, bank, rows, config.to_dict()).save(work / "server")),
    }


def bytes_per_round(config: Config, num_sites: int = 2) -> dict[str, Any]:
    """Bytes of the records one site receives and sends in a steady round (train + evaluate), built by the same
    functions the ServerApp and ClientApp use; ArrayRecord/MetricRecord/ConfigRecord.count_bytes()."""
    model = create_model(config.arch, config.width, 1, image_size=config.image_size)
    state = model.state_dict()
    protos = {s: (F.normalize(torch.randn(2, 128), dim=1), torch.tensor([5, 7])) for s in range(num_sites)}
    config_rec = ConfigRecord({R.ROUND: 2, R.LR: 1e-4, R.RUN_NAME: "fedbn-proto-run1234567890123456789"})
    train_metrics = MetricRecord({R.NUM_EXAMPLES: 500, R.SITE_ID: 0, **{k: 0.5 for k in R.TRAIN_METRICS}})
    eval_metrics = MetricRecord({R.NUM_EXAMPLES: 180, R.SITE_ID: 0, **{k: 0.5 for k in R.EVALUATE_REPLY_METRICS
                                                                      if k not in (R.NUM_EXAMPLES, R.SITE_ID)}})
    eval_metrics[R.ROC_TPR] = [0.5] * 101
    out: dict[str, Any] = {}
    for method in FEDERATED_METHODS:
        shared = {k: state[k] for k in shared_keys(model, method)}
        proto = method == "fedbn-proto"
        bank_all = R.bank_to_record(PrototypeBank.from_sites(protos)).count_bytes() if proto else 0
        bank_one = R.bank_to_record(PrototypeBank.from_sites({0: protos[0]})).count_bytes() if proto else 0
        out[method] = {}
        for compression in COMPRESSIONS:
            weights = R.to_record(shared, compression).count_bytes()
            down = {"train": weights + bank_all + config_rec.count_bytes(),
                    "evaluate": weights + config_rec.count_bytes()}
            up = {"train": weights + bank_one + train_metrics.count_bytes(), "evaluate": eval_metrics.count_bytes()}
            out[method][compression] = {"server_to_site": sum(down.values()), "site_to_server": sum(up.values()),
                                        "weights_one_way": weights, "tensors": len(shared),
                                        "detail": {"server_to_site": down, "site_to_server": up}}
    return out


def _virtual_sites(config: Config, k: int, dest: Path) -> list[str]:
    """Split the configured sites' images into ``k`` site folders (symlinks + manifest.csv), keeping each
    patient / near-duplicate group (fl_covid.data's groups) whole and both classes at every site."""
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


def bench_scaling(flower: LocalFlower, config: Config, counts: tuple[int, ...], work: Path) -> dict[str, Any]:
    """Two fedbn-proto rounds of the smoke model with k virtual sites (k supernodes, 1 CPU each): round 1 carries
    each client's start-up (imports, decoding its site), round 2 is the steady state."""
    smoke = load_config(SMOKE)
    out: dict[str, Any] = {}
    for k in counts:
        data = work / f"sites-{k}"
        names = _virtual_sites(config, k, data)
        output = work / f"runs-{k}"
        output.mkdir(parents=True)
        run_config = (f"config-file='{SMOKE}' method='fedbn-proto' num-server-rounds=2 local-steps=2 "
                      f"data-root='{data}' output-dir='{output}' overrides='sites={','.join(names)} num-threads=1'")
        run_dir, wall, memory = _flower_run(flower, run_config, f"num-supernodes={k} client-resources-num-cpus=1",
                                            output, "fedbn-proto")
        rows = json.loads((run_dir / "metrics.json").read_text())
        final = json.loads((run_dir / "final_metrics.json").read_text())
        per_site = bytes_per_round(smoke, k)["fedbn-proto"]["none"]
        out[str(k)] = {"round_seconds": round(final["round_seconds"]["2"], 2),
                       "first_round_seconds": round(final["round_seconds"]["1"], 2), "wall_seconds": round(wall, 2),
                       "client_train_seconds_sum": round(sum(r["seconds"] for r in rows
                                                             if r["phase"] == "train" and r["round"] == 2), 2),
                       "bytes_per_round_all_sites": k * (per_site["server_to_site"] + per_site["site_to_server"]),
                       "bytes_per_round_per_site": per_site["server_to_site"] + per_site["site_to_server"],
                       "peak_rss_mb_server_process": memory["peak_rss_mb_server_process"],
                       "peak_rss_mb_whole_simulation": memory["peak_rss_mb_whole_simulation"],
                       "peak_rss_mb_per_client_max": max(memory["peak_rss_mb_per_client"], default=0.0)}
    ks = [int(k) for k in out]
    if len(ks) > 1:
        slope = np.polyfit(ks, [out[str(k)]["round_seconds"] for k in ks], 1)[0]
        mem = np.polyfit(ks, [out[str(k)]["peak_rss_mb_server_process"] for k in ks], 1)[0]
        out["fit"] = {"round_seconds_per_extra_site": round(float(slope), 3),
                      "server_rss_mb_per_extra_site": round(float(mem), 2)}
    return out


def bench_accuracy(config_file: str, extra: str, rounds: int, steps: int, output: Path) -> dict[str, Any]:
    """fedbn-proto on the real data with each compression, in process (real ServerApp + ClientApps, Flower's
    wire format, no Ray), same seed: final AUC and accuracy per site."""
    from tests.inprocess import run_dir, run_federation

    out = {}
    for compression in COMPRESSIONS:
        folder = output / compression
        folder.mkdir(parents=True)
        _, seconds = _timed(lambda: run_federation(
            folder, method="fedbn-proto", **{"config-file": config_file, "num-server-rounds": rounds,
                                             "local-steps": steps},
            overrides=f"compression={compression} num-threads={torch.get_num_threads()} {extra}"))
        final = json.loads((run_dir(folder) / "final_metrics.json").read_text())
        out[compression] = {"seconds": round(seconds, 1), **{s: {m: round(v[m], 4) for m in ("auc", "accuracy")}
                                                             for s, v in final["sites"].items()}}
    return out


def bench_ray_cluster(work: Path) -> dict[str, Any]:
    """Start a Ray head and a second Ray node on loopback, run a smoke simulation with RAY_ADDRESS pointing at
    the head, and record on which node's raylet each ClientApp actor ran. Stops both nodes by PID."""
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    port = free_port()
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats"]
    env = dict(os.environ)
    actors: dict[int, str] = {}
    try:
        subprocess.run(["ray", "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                       check=True, capture_output=True, env=env, timeout=120)
        subprocess.run(["ray", "start", f"--address=127.0.0.1:{port}", *common], check=True, capture_output=True,
                       env=env, timeout=120)
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                table = _proc_table()
                for pid, (ppid, cmd) in table.items():
                    if cmd.startswith("ray::ClientAppActor") and ppid in table and str(temp) in table[ppid][1]:
                        actors[pid] = table[ppid][1].split("--raylet_socket_name=")[-1].split()[0]
                stop.wait(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        output = work / "runs-ray-cluster"
        output.mkdir(parents=True)
        with LocalFlower(work / "flwr-home-ray-cluster") as flower:
            flower.env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
            run_dir, wall, _ = _flower_run(
                flower, f"config-file='{SMOKE}' num-server-rounds=1 local-steps=2 output-dir='{output}'",
                "num-supernodes=2 client-resources-num-cpus=1", output, "fedbn-proto")
        stop.set()
        watcher.join()
    finally:
        _kill_tree(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
    raylets = sorted(set(actors.values()))
    return {"ray_address": f"127.0.0.1:{port}", "nodes": 2, "wall_seconds": round(wall, 2),
            "client_actor_raylets": [r.rsplit("/", 1)[-1] for r in raylets],
            "actors_spread_over_nodes": len(raylets) == 2, "run_completed": (run_dir / "final_metrics.json").is_file()}


def _kill_tree(marker: str) -> None:
    """SIGTERM, then SIGKILL, every process whose command line mentions ``marker`` and its descendants."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        table = _proc_table()
        for pid in _descendants([p for p, (_, c) in table.items() if marker in c], table):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3)


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short timings, 2 and 4 virtual sites (< 5 min)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json", help="JSON results file")
    parser.add_argument("--config", default="configs/default.yaml", help="model, image and batch size")
    parser.add_argument("--site", default="site_b_covidct", help="the site timed alone")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads here and per Flower client (client-resources-num-cpus)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key everywhere but in the scaling section (e.g. image-size=32)")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated subset of {','.join(ALL_SECTIONS)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("fl_covid").setLevel(logging.WARNING)
    sections = [s for s in args.sections.split(",") if s]
    if unknown := set(sections) - set(ALL_SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {ALL_SECTIONS}")
    profile = PROFILES["quick" if args.quick else "full"]
    torch.set_num_threads(args.threads)
    config = load_config(args.config, parse_overrides(args.set))
    extra = " ".join(args.set)  # the same overrides for the Flower runs
    site_index = config.sites.index(args.site)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(), "torch": torch.__version__,
                    "python": platform.python_version(), "cuda": torch.cuda.is_available()},
        "settings": {"config": args.config, "set": args.set, "site": args.site, "threads": args.threads,
                     "quick": args.quick,
                     "image_size": config.image_size, "width": config.width, "batch_size": config.batch_size,
                     **profile},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fl-covid-bench-") as tmp:
        work = Path(tmp)
        site, split = load_configured_site(config, site_index)
        with LocalFlower(work / "flwr-home") as flower:
            for name in sections:
                log.info("section %s", name)
                t0 = time.perf_counter()
                if name == "data":
                    results["data"] = bench_data(config)
                elif name == "bare":
                    results["bare"] = bench_bare(config, site, split, profile["steps"])
                elif name == "threads":
                    results["threads"] = {}
                    for n in range(1, (os.cpu_count() or 1) + 1):
                        torch.set_num_threads(n)
                        results["threads"][str(n)] = bench_bare(config, site, split, max(2, profile["steps"] // 2),
                                                                repeats=1, with_evaluation=False)["images_per_s"]
                    torch.set_num_threads(args.threads)
                elif name == "compile":
                    results["compile"] = bench_compile(config, site, split, profile["steps"])
                elif name == "central":
                    results["central"] = bench_central(config, args.site, profile["central_per_class"],
                                                       work / "central")
                elif name == "flower":
                    eval_s = results.get("bare", {}).get("evaluate_seconds", 0.0)
                    results["flower"] = bench_flower(flower, args.config, extra, args.site, profile["steps"],
                                                     profile["rounds"], args.threads, eval_s, work / "flower")
                elif name == "components":
                    results["components_ms"] = bench_components(config, work / "components")
                elif name == "bytes":
                    results["bytes_per_round"] = bytes_per_round(config)
                elif name == "scaling":
                    results["scaling"] = bench_scaling(flower, config, profile["scaling"], work / "scaling")
                elif name == "accuracy":
                    results["accuracy"] = bench_accuracy(args.config, extra, profile["accuracy_rounds"],
                                                         profile["steps"], work / "accuracy")
                elif name == "ray-cluster":
                    results["ray_cluster"] = bench_ray_cluster(work)
                results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results.update(_headline(results))
    write_json(args.out, results)
    print(_table(results))
    print(f"wrote {args.out}")
    return 0


def _headline(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios the targets are stated in (bench/README.md)."""
    out: dict[str, Any] = {}
    bare = results.get("bare", {}).get("images_per_s")
    if bare and "flower" in results:
        out["throughput_ratio_flower_vs_bare"] = round(results["flower"]["images_per_s"] / bare, 3)
        out["round_overhead_s"] = results["flower"]["round_overhead_s"]
    if bare and "central" in results:
        out["throughput_ratio_central_vs_bare"] = round(results["central"]["images_per_s"] / bare, 3)
    if "bytes_per_round" in results:
        b = results["bytes_per_round"]

        def total(method: str, compression: str) -> int:
            return b[method][compression]["server_to_site"] + b[method][compression]["site_to_server"]

        base = total("fedavg", "none")
        ratios = {c: round(total("fedbn-proto", c) / base, 4) for c in COMPRESSIONS}
        out["bytes_ratio_by_compression"] = ratios  # fedbn-proto with each compression vs fedavg float32
        out["bytes_ratio_compressed_vs_fedavg_fp32"] = min(ratios[c] for c in COMPRESSIONS if c != "none")
    return out


def _table(results: dict[str, Any]) -> str:
    lines = ["", "| measurement | value |", "|---|---|"]

    def row(name: str, value: Any) -> None:
        lines.append(f"| {name} | {value} |")

    if "data" in results:
        for name, d in results["data"].items():
            if isinstance(d, dict):
                row(f"decode + cache {name} (images/s)", d["decode_cache_images_per_s"])
        row("augmentation (images/s)", results["data"]["augment_images_per_s"])
    for key, label in (("bare", "bare engine"), ("central", "centralized trainer"), ("flower", "Flower ClientApp")):
        if key in results:
            row(f"{label} (images/s)", results[key]["images_per_s"])
    for n, v in results.get("threads", {}).items():
        row(f"bare engine, {n} torch thread(s) (images/s)", v)
    for key in ("throughput_ratio_flower_vs_bare", "throughput_ratio_central_vs_bare", "round_overhead_s"):
        if key in results:
            row(key, results[key])
    if "flower" in results:
        f = results["flower"]
        row("Flower start-up (s)", f["startup_seconds"])
        row("peak RSS per client (MiB)", f["peak_rss_mb_per_client"])
        row("peak RSS server process / whole simulation (MiB)",
            f"{f['peak_rss_mb_server_process']} / {f['peak_rss_mb_whole_simulation']}")
    for name, v in results.get("components_ms", {}).items():
        row(f"per message: {name}" + ("" if name.endswith("_MB") else " (ms)"), v)
    for method, per in results.get("bytes_per_round", {}).items():
        for compression, v in per.items():
            row(f"bytes/round/site {method} {compression} (down / up)",
                f"{v['server_to_site']:,} / {v['site_to_server']:,}")
    if "bytes_ratio_by_compression" in results:
        row("fedbn-proto vs fedavg-fp32 bytes", results["bytes_ratio_by_compression"])
    for k, v in results.get("scaling", {}).items():
        if k != "fit":
            row(f"{k} sites: round s / server RSS MiB / bytes per round",
                f"{v['round_seconds']} / {v['peak_rss_mb_server_process']} / {v['bytes_per_round_all_sites']:,}")
    if "fit" in results.get("scaling", {}):
        row("scaling fit", results["scaling"]["fit"])
    for c, v in results.get("accuracy", {}).items():
        row(f"accuracy with compression {c}", {s: m for s, m in v.items() if s != "seconds"})
    if "ray_cluster" in results:
        row("simulation on a 2-node Ray cluster: actors on both nodes",
            results["ray_cluster"]["actors_spread_over_nodes"])
    if "compile" in results:
        c = results["compile"]
        row("torch.compile: images/s eager / compiled (first steps incl. compilation, s)",
            f"{c['eager_images_per_s']} / {c['compiled_images_per_s']} ({c['compiled_warmup_seconds']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
