"""Speed, overhead, memory and transfer sizes of fl-covid, measured side by side in one run (bench/README.md).

    python bench/run.py --quick --out bench/quick.json
    python bench/run.py --sections data,components,bytes --quick --out /tmp/fast.json
    python bench/run.py --default-run --rounds 3 --out bench/default-run.json
    python -m bench.run ...                                   # the same, as a module, from the project folder
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # `python bench/run.py`: load this folder as the package `bench`, as `python -m bench.run` does
    _spec = importlib.util.spec_from_file_location("bench", Path(__file__).with_name("__init__.py"))
    assert _spec is not None and _spec.loader is not None
    sys.modules["bench"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["bench"])

import torch

from bench import sections as S
from bench.default_run import default_run, short_rounds
from bench.headline import headline, table
from fl_covid.config import load_config, parse_overrides
from fl_covid.reporting import write_json

log = logging.getLogger("bench")
SECTIONS = {
    "data": S.data,
    "bare": S.bare,
    "threads": S.threads,
    "central": S.central,
    "flower": S.flower,
    "components": S.components,
    "bytes": S.bytes_per_round,
    "scaling": S.scaling,
    "accuracy": S.accuracy,
    "ray-cluster": S.ray_cluster,
    "compile": S.torch_compile,
    "default-run": default_run,
    "short-rounds": short_rounds,
}
DEFAULT_SECTIONS = ("data", "bare", "threads", "central", "flower", "components", "bytes", "scaling")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="sections: " + ", ".join(SECTIONS) + "; see bench/README.md")
    parser.add_argument("--sections", help="comma-separated sections, run in this order (default: "
                        + ",".join(DEFAULT_SECTIONS) + "; with --default-run: none)")
    parser.add_argument("--default-run", action="store_true",
                        help="time the default run's rounds (section default-run) instead of the default sections")
    parser.add_argument("--rounds", type=int, default=0,
                        help="default-run: only the first N rounds (default: num-server-rounds of pyproject.toml)")
    parser.add_argument("--engines", default="inprocess,ray",
                        help="default-run: inprocess and/or ray (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="short timings, 2 and 4 virtual sites")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"),
                        help="JSON results file (default: bench/results.json)")
    parser.add_argument("--config", default="configs/default.yaml", help="experiment YAML (configs/NAME.yaml)")
    parser.add_argument("--site", default="site_b_covidct", help="the site timed alone")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in this process and per Flower client (client-resources-num-cpus)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key everywhere but in the scaling section (e.g. image-size=32)")
    args = parser.parse_args(argv)
    names = [s for s in args.sections.split(",") if s] if args.sections is not None else \
        ([] if args.default_run else list(DEFAULT_SECTIONS))
    names += ["default-run"] if args.default_run else []
    if unknown := [s for s in names if s not in SECTIONS]:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if unknown := set(args.engines.split(",")) - {"inprocess", "ray", ""}:
        parser.error(f"unknown engines {sorted(unknown)}; choose from inprocess, ray")
    if args.rounds < 0:
        parser.error("--rounds must be >= 1 (0: all rounds of the default run)")
    args.section_list = list(dict.fromkeys(names))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("fl_covid").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    config = load_config(args.config, parse_overrides(args.set))
    if args.site not in config.sites:
        raise SystemExit(f"--site {args.site!r} is not one of the config's sites {config.sites}")
    profile = S.PROFILES["quick" if args.quick else "full"]
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(), "torch": torch.__version__,
                    "python": platform.python_version(), "cuda": torch.cuda.is_available()},
        "settings": {"config": args.config, "set": args.set, "site": args.site, "threads": args.threads,
                     "quick": args.quick, "sections": args.section_list, "image_size": config.image_size,
                     "width": config.width, "batch_size": config.batch_size, **profile},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fl-covid-bench-") as tmp:
        bench = S.Bench(args, config, profile, Path(tmp), results)
        for name in args.section_list:
            log.info("section %s", name)
            t0 = time.perf_counter()
            results[name.replace("-", "_")] = SECTIONS[name](bench)
            results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results.update(headline(results))
    write_json(args.out, results)
    print(table(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
