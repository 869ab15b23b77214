"""Typed, validated, frozen configuration: the only reader of YAML files, ``--set`` overrides and run config.

Every setting has one name (kebab-case, as in YAML and Flower's run config) and one default here. A YAML file
holds the structure of an experiment; flat ``key=value`` overrides (``--set`` on the command line, Flower's run
config) come on top. Unknown keys, wrong types and out-of-range values fail at start, naming the key.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import yaml

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
PROTOCOLS = ("grouped", "image", "official")
FEDERATED_METHODS = ("fedavg", "fedbn", "fedbn-proto")
CENTRAL_METHODS = ("single", "joint", "sepnorm", "contrastive")
COMPRESSIONS = ("none", "fp16")


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is allowed."""


@dataclass(frozen=True)
class Config:
    """One experiment: data, split, model, loss, optimisation, federation, output."""

    # data and split
    data_root: str = ""
    sites: tuple[str, ...] = ("site_a_sarscov2", "site_b_covidct")
    image_size: int = 64
    protocol: str = "grouped"
    folds: int = 4
    fold: int = 0
    val_fraction: float = 0.1
    max_per_class: int = 0
    exclude_label_conflicts: bool = True
    skip_unreadable: bool = False
    # model and loss
    arch: str = "redesigned"
    width: float = 0.25
    alpha: float = 1.0
    temperature: float = 0.05
    # optimisation
    batch_size: int = 16
    lr: float = 1e-4
    grad_clip: float = 5.0
    epochs: int = 10
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0
    # federation
    method: str = "fedbn-proto"
    num_server_rounds: int = 20
    local_steps: int = 100
    min_sites: int = 0
    round_timeout: float = 0.0
    compression: str = "none"
    # FedAvg weights: "dataset" = training-set size (classic FedAvg); "seen" = images processed this round,
    # equal for every site since all take local-steps steps (the paper's balanced 16 + 16 batches)
    fedavg_weights: str = "dataset"
    max_update_norm: float = 0.0
    # differential privacy of the prototypes (fedbn-proto)
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    # output
    output_dir: str = ""
    tag: str = ""

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"config key '{key}' {what}, got {getattr(self, key.replace('-', '_'))!r}")

        need(len(self.sites) >= 1 and all(isinstance(s, str) and s for s in self.sites), "sites",
             "must list at least one site folder")
        need(len(set(self.sites)) == len(self.sites), "sites", "must not repeat a site")
        need(self.image_size >= 32, "image-size", "must be >= 32")
        need(self.protocol in PROTOCOLS, "protocol", f"must be one of {PROTOCOLS}")
        need(self.folds >= 2, "folds", "must be >= 2")
        need(0 <= self.fold < self.folds, "fold", f"must be in [0, folds={self.folds})")
        need(0.0 < self.val_fraction < 0.5, "val-fraction", "must be in (0, 0.5)")
        need(self.max_per_class >= 0, "max-per-class", "must be >= 0 (0 = all images)")
        need(self.arch in ("redesigned", "covidnet"), "arch", "must be 'redesigned' or 'covidnet'")
        need(self.width > 0, "width", "must be > 0")
        need(self.alpha >= 0, "alpha", "must be >= 0")
        need(self.temperature > 0, "temperature", "must be > 0")
        need(self.batch_size >= 2, "batch-size", "must be >= 2")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.grad_clip > 0, "grad-clip", "must be > 0")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
             "must be 'auto', 'cpu' or 'cuda[:N]'")
        need(self.num_threads >= 0, "num-threads", "must be >= 0 (0 = torch's default)")
        need(self.method in FEDERATED_METHODS + CENTRAL_METHODS, "method",
             f"must be one of {FEDERATED_METHODS + CENTRAL_METHODS}")
        need(self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
        need(self.local_steps >= 1, "local-steps", "must be >= 1")
        need(0 <= self.min_sites <= len(self.sites), "min-sites", "must be in [0, number of sites] (0 = all)")
        need(self.round_timeout >= 0, "round-timeout", "must be >= 0 seconds (0 = wait for every site)")
        need(self.compression in COMPRESSIONS, "compression", f"must be one of {COMPRESSIONS}")
        need(self.fedavg_weights in ("dataset", "seen"), "fedavg-weights", "must be 'dataset' or 'seen'")
        need(self.max_update_norm >= 0, "max-update-norm", "must be >= 0 (0 = no bound on a site's update)")
        need(self.dp_epsilon >= 0, "dp-epsilon", "must be >= 0 (0 = prototypes without noise)")
        need(0 < self.dp_delta < 1, "dp-delta", "must be in (0, 1)")
        need(self.dp_clip > 0, "dp-clip", "must be > 0")
        need(self.dp_epsilon == 0 or self.method == "fedbn-proto", "dp-epsilon",
             "applies to the prototypes of method fedbn-proto only; set it to 0 for other methods")

    @property
    def cache_size(self) -> int:
        """Side of the cached square images: image_size * 256 / 224, the SPEC's resize before a random crop."""
        return round(self.image_size * 256 / 224)

    @property
    def min_sites_required(self) -> int:
        """Sites that must answer for a round to count (``min-sites`` 0 means all of them)."""
        return self.min_sites or len(self.sites)

    def resolved_data_root(self) -> Path:
        """Absolute data root: the configured one, else the embedded default shipped with the project."""
        if self.data_root:
            return Path(self.data_root).expanduser().resolve()
        return project_root() / "data"

    def resolved_output_dir(self) -> Path:
        """Absolute folder for run directories: the configured one, else ``runs/`` in the project."""
        if self.output_dir:
            return Path(self.output_dir).expanduser().resolve()
        return project_root() / "runs"

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping of every setting (JSON-friendly)."""
        return {f.name.replace("_", "-"): (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self)}

    def replace(self, **overrides: Any) -> "Config":
        """A copy with kebab-case or snake_case overrides applied and validated."""
        return _build({**self.to_dict(), **overrides})


def project_root() -> Path:
    """The project's source folder, also when the code runs from a Flower app bundle.

    Flower imports the app from an unpacked copy without the embedded data; the installed distribution
    (``pip install -e .``) still knows where the project lives. ``FL_COVID_HOME`` overrides both.
    """
    if env := os.environ.get("FL_COVID_HOME"):
        return Path(env).expanduser().resolve()
    try:
        direct = metadata.distribution("fl-covid").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        direct = None
    if direct:
        url = json.loads(direct).get("url", "")
        if url.startswith("file://") and (Path(url[7:]) / "data").is_dir():
            return Path(url[7:])
    return PACKAGE_DIR.parent


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` (YAML value or override string) to the field's type, or raise naming ``key``."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ == tuple[str, ...]:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"config key '{key}' must be of type {name}, got {value!r}")


_FIELDS = {f.name.replace("_", "-"): f for f in fields(Config)}
_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "tuple[str, ...]": tuple[str, ...]}


def _build(values: Mapping[str, Any]) -> Config:
    kwargs = {}
    for key, value in values.items():
        norm = key.replace("_", "-")
        if norm not in _FIELDS:
            raise ConfigError(f"unknown config key '{key}'; known keys: {', '.join(sorted(_FIELDS))}")
        f = _FIELDS[norm]
        kwargs[f.name] = _coerce(norm, value, _TYPES[f.type] if isinstance(f.type, str) else f.type)
    return Config(**kwargs)


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` -> dict; a pair without '=' is an error naming it."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out


def resolve_config_file(path: str | os.PathLike) -> Path:
    """A YAML path as given, else relative to the project (``configs/x.yaml`` works from any folder)."""
    p = Path(path).expanduser()
    for candidate in (p, project_root() / p, PACKAGE_DIR.parent / p):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"config file {str(path)!r} not found (looked in the current folder and {project_root()})")


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (flat mapping of kebab-case keys), then ``overrides``."""
    values: dict[str, Any] = {}
    if path:
        file = resolve_config_file(path)
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {file} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file} must hold a mapping of keys to values")
        values.update(loaded)
    values.update(overrides or {})
    return _build(values)


def to_json(config: Config) -> str:
    """Resolved config as JSON, with absolute data and output paths."""
    d = config.to_dict()
    d["data-root"] = str(config.resolved_data_root())
    d["output-dir"] = str(config.resolved_output_dir())
    return json.dumps(d, indent=2)




FEDERATED_KEYS = ("method", "num-server-rounds", "local-steps", "seed", "fold", "data-root", "output-dir")


@lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    """Log a warning once per process (clients parse the run config for every message)."""
    log.warning(message)


def federated_config(run_config: Mapping[str, Any]) -> Config:
    """Config of a Flower run: YAML ``config-file``, then the run config's own scalars, then ``overrides``
    ("key=value key=value", the explicit word of whoever started the run). An empty ``data-root`` /
    ``output-dir`` keeps the YAML value or the default. Flower always sends every run-config key, so a YAML value
    for one of FEDERATED_KEYS is replaced by the run config's: set those with --run-config."""
    run_config = dict(run_config)
    scalars = {k: run_config[k] for k in FEDERATED_KEYS if k in run_config and run_config[k] != ""}
    overrides = parse_overrides(str(run_config.get("overrides", "")).split())
    file = run_config.get("config-file") or "configs/default.yaml"
    config = load_config(file, {**scalars, **overrides})
    from_yaml = load_config(file)
    for key in scalars.keys() - overrides.keys():
        attr = key.replace("-", "_")
        if getattr(from_yaml, attr) != getattr(Config, attr) and getattr(from_yaml, attr) != getattr(config, attr):
            _warn_once(f"{file} sets {key}={getattr(from_yaml, attr)} but the run config says "
                       f"{getattr(config, attr)}, which wins; pass --run-config \"{key}={getattr(from_yaml, attr)}\" "
                       "to use the file's value")
    return config
