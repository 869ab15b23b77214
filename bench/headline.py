"""The headline ratios the targets are stated in (bench/README.md), and the results as Markdown tables."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

TARGETS: dict[str, tuple[str, float]] = {
    "throughput_ratio_flower_vs_bare": (">=", 0.95),
    "round_overhead_s": ("<", 0.5),
    "federation_throughput_ratio_vs_bare": (">=", 0.90),
    "short_rounds_10_steps_throughput_ratio_ray": (">=", 0.75),
    "bytes_ratio_compressed_vs_fedavg_fp32": ("<=", 0.25),
}
_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<": operator.lt, "<=": operator.le}


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys of the results: ratios of the sections that ran, and which targets they meet."""
    out: dict[str, Any] = {}
    bare = results.get("bare", {}).get("images_per_s")
    if bare and "flower" in results:
        out["throughput_ratio_flower_vs_bare"] = round(results["flower"]["images_per_s"] / bare, 3)
        out["round_overhead_s"] = results["flower"]["round_overhead_s"]
    if bare and "central" in results:
        out["throughput_ratio_central_vs_bare"] = round(results["central"]["images_per_s"] / bare, 3)
    if "bytes" in results:
        b = results["bytes"]

        def total(method: str, compression: str) -> int:
            return b[method][compression]["server_to_site"] + b[method][compression]["site_to_server"]

        base = total("fedavg", "none")
        out["bytes_ratio_by_compression"] = {c: round(total("fedbn-proto", c) / base, 4) for c in b["fedbn-proto"]}
        out["bytes_ratio_compressed_vs_fedavg_fp32"] = out["bytes_ratio_by_compression"]["int8"]
    default = results.get("default_run", {})
    if "ray" in default:
        out["federation_throughput_ratio_vs_bare"] = default["ray"]["throughput_ratio_vs_bare_pair"]
    if "in_process" in default:
        out["federation_throughput_ratio_vs_bare_in_process"] = default["in_process"]["throughput_ratio_vs_bare_pair"]
    short = results.get("short_rounds", {}).get("by_steps", {})
    for steps, row in short.items():
        for engine in ("ray", "inprocess"):
            if engine in row:
                out[f"short_rounds_{steps}_steps_throughput_ratio_{engine}"] = \
                    row[engine]["throughput_ratio_vs_bare_pair"]
    out["targets"] = {k: {"target": f"{op} {v}", "met": _OPS[op](out[k], v)}
                      for k, (op, v) in TARGETS.items() if k in out}
    return out


def table(results: dict[str, Any]) -> str:
    lines = ["", "| measurement | value |", "|---|---|"]

    def row(name: str, value: Any) -> None:
        lines.append(f"| {name} | {value} |")

    for name, d in results.get("data", {}).items():
        if isinstance(d, dict):
            row(f"decode + cache {name} (images/s)", d["decode_cache_images_per_s"])
    if "data" in results:
        row("augmentation (images/s)", results["data"]["augment_images_per_s"])
    for key, label in (("bare", "bare engine"), ("central", "centralized trainer"), ("flower", "Flower ClientApp")):
        if key in results:
            row(f"{label} (images/s)", results[key]["images_per_s"])
    if "bare" in results:
        row("summary pass with evaluation, one site (s)", results["bare"]["summary_seconds"])
    for n, v in results.get("threads", {}).items():
        row(f"bare engine, {n} torch thread(s) (images/s)", v)
    for key in ("throughput_ratio_flower_vs_bare", "throughput_ratio_central_vs_bare", "round_overhead_s",
                "bytes_ratio_compressed_vs_fedavg_fp32", "federation_throughput_ratio_vs_bare",
                "federation_throughput_ratio_vs_bare_in_process"):
        if key in results:
            met = results.get("targets", {}).get(key)
            row(key, f"{results[key]}" + (f" (target {met['target']}: {'met' if met['met'] else 'NOT met'})"
                                          if met else ""))
    if "flower" in results:
        f = results["flower"]
        row("Flower start-up and final summary outside the rounds (s)", f["startup_and_final_summary_seconds"])
        row("peak RSS per client (MiB)", f["peak_rss_mb_per_client"])
        row("peak RSS server process / whole simulation (MiB)",
            f"{f['peak_rss_mb_server_process']} / {f['peak_rss_mb_whole_simulation']}")
    for name, v in results.get("components", {}).items():
        row(f"per message: {name}" + ("" if name.endswith("_MB") else " (ms)"), v)
    for method, per in results.get("bytes", {}).items():
        for compression, v in per.items():
            row(f"bytes/round/site {method} {compression} (down / up)",
                f"refused: {v['refused']}" if "refused" in v else f"{v['server_to_site']:,} / {v['site_to_server']:,}")
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
    if "torch_compile" in results:
        c = results["torch_compile"]
        row("torch.compile: images/s eager / compiled (first steps incl. compilation, s)",
            f"{c['eager_images_per_s']} / {c['compiled_images_per_s']} ({c['compiled_warmup_seconds']})")
    if "default_run" in results:
        lines += default_run_tables(results["default_run"])
    if "short_rounds" in results:
        d = results["short_rounds"]
        lines += ["", f"Short rounds, steady state (rounds after the first), {d['image_budget_steps_per_site']} local "
                  f"steps per site in all; bare loops side by side: {d['bare_pair']['images_per_s']} images/s", "",
                  "| local steps | rounds | engine | rounds / min | median round (s) | images/s | vs bare pair |",
                  "|---|---|---|---|---|---|---|"]
        for steps, row in d["by_steps"].items():
            for engine in ("inprocess", "ray"):
                if engine in row:
                    e = row[engine]
                    lines.append(f"| {steps} | {row['rounds']} | {engine} | {e['rounds_per_minute']} | "
                                 f"{e['median_round_seconds']} | {e['images_per_s']} | "
                                 f"{e['throughput_ratio_vs_bare_pair']} |")
    return "\n".join(lines)


def default_run_tables(d: dict[str, Any]) -> list[str]:
    """Throughput of the default run's rounds and where each round's time goes."""
    title = (f"Default run: {d['method']}, {d['rounds']} rounds x {d['local_steps']} local steps, sites "
             f"{', '.join(d['sites'])}; bare loops side by side: {d['bare_pair']['images_per_s']} images/s")
    lines = ["", title, "", "| engine | images/s (rounds) | incl. start-up | vs bare loops |", "|---|---|---|---|"]
    for engine in ("in_process", "ray"):
        if engine in d:
            e = d[engine]
            lines.append(f"| {engine} | {e['images_per_s']} | {e['images_per_s_incl_startup']} | "
                         f"{e['throughput_ratio_vs_bare_pair']} |")
    if "in_process" in d:
        lines += ["", "In process, seconds per round (sites one after the other, sums over sites):", "",
                  "| round | wall | train | around train | summary | serialisation | server |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['wall_seconds']} | {r['train_seconds']} | {r['client_around_train_seconds']} "
                  f"| {r['summary_seconds']} | {r['serialisation_seconds']} | {r['server_seconds']} |"
                  for r in d["in_process"]["rounds"]]
    if "ray" in d:
        caption = ("Ray simulation, seconds per round (sites in parallel: the slowest site; summary and ClientApp "
                   "work around training as measured in process):")
        header = ("| round | wall | train (max) | summary (max) | around train (max) | serialisation, transfer, "
                  "server and waiting |")
        lines += ["", caption, "", header, "|---|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['wall_seconds']} | {r['train_seconds_max']} | "
                  f"{r['summary_seconds_max_in_process']} | {r['client_around_train_seconds_max_in_process']} | "
                  f"{r['transfer_and_waiting_seconds']} |" for r in d["ray"]["rounds"]]
    return lines
