"""Typed, validated, frozen configuration of an experiment: the only reader of its YAML files, ``--set`` overrides
and run config (what a hospital's SuperNode and the operator trust, whatever the run says, is ``fl_covid.policy``).

Every setting has one name (kebab-case, as in YAML and Flower's run config) and one default here. A YAML file
holds the structure of an experiment; flat ``key=value`` overrides (``--set`` on the command line, Flower's run
config) come on top. Unknown keys, wrong types and out-of-range values fail at start, naming the key.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, fields
from functools import cache
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from fl_covid.dicom import WINDOW_LEVEL, WINDOW_WIDTH
from fl_covid.errors import ConfigError
from fl_covid.methods import FEDERATED_METHODS, METHODS, Method
from fl_covid.preprocess import SPECTRUM_BAND, Augmentation, Preprocessing

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
PROTOCOLS = ("grouped", "image", "official")
COMPRESSIONS = ("none", "fp16", "int8")
FEDAVG_WEIGHTS = ("equal", "dataset")
BN_TRANSFORMS = ("eval", "train")  # the images of the BN re-estimation (bn-transform)


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
    # DICOM slices: window on Hounsfield units mapped to 8-bit grey (default: the lung window)
    dicom_window_width: float = WINDOW_WIDTH
    dicom_window_level: float = WINDOW_LEVEL
    # preprocessing against dataset-specific cues (fl_covid.preprocess): crop to the body, padded square, or to the
    # lungs alone;
    # robust per-image intensity standardisation, or histogram equalisation (not both); augmentation of zoom,
    # contrast/gamma, blur (strength in [0, 1]);
    # of the low-frequency amplitude spectrum (|u|, |v| <= spectrum-band cycles per pixel), grey-level warp, borders
    body_crop: bool = False
    standardize: bool = False
    equalize: bool = False
    lung_crop: bool = False
    cue_augment: float = 0.0
    style_augment: float = 0.0
    random_convolution: float = 0.0  # probability of RandConv per training image (0 = off)
    mixstyle: float = 0.0  # probability of MixStyle on the stem's features per training chunk (0 = off)
    spectrum_band: float = SPECTRUM_BAND
    # cue-adversarial training: weight of the reversed gradient of a site-local head regressing each training
    # image's cue statistics (fl_covid.cues.batch_cues) from its embedding (0 = off; the head never leaves a site)
    cue_adversarial: float = 0.0
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
    # weight of each site in the average, computed by the server: "equal" (the paper's objective: every site takes
    # local-steps steps of batch-size images and counts the same, as 16 + 16 images in one centralized batch) or
    # "dataset" (training-set size as the site reported it in its first accepted reply: FedAvg's objective)
    fedavg_weights: str = "equal"
    max_update_norm: float = 0.0
    # deployment: "site=node-id,..." pins each site to the node the operator registered for it (empty: a site is
    # pinned to the node of its first accepted reply)
    site_nodes: str = ""
    # a prototype never summarises fewer training images than this (fewer: the class's prototype is withheld)
    min_prototype_images: int = 10
    # prototypes per class and site: 1 = the class mean, k > 1 = means of k k-means clusters (sub-prototypes)
    prototypes_per_class: int = 1
    # each other site's prototype counts this many times among an anchor's contrastive pairs
    prototype_weight: float = 1.0
    # the sites compute and send their prototypes every k rounds (the bank of the last refresh is used in between;
    # a site's DP releases are one per refresh)
    prototype_every: int = 1
    # training images a site passes through the received model at the start of a round (0 = all): BN
    # re-estimation and prototypes (with DP, prototypes always summarise every training image)
    summary_images: int = 256
    # re-estimate a site's BN running statistics under the received weights before evaluating / training
    bn_recalibration: bool = True
    # the images of that re-estimation: "eval" (the evaluation transform: the whole image resized) or "train" (the
    # training transform: random crops and flips, as the running statistics of training see them); one value for
    # every site or "SITE=eval|train,..." per site (a site not named: eval)
    bn_transform: str = "eval"
    # evaluate every k rounds (the last round always)
    eval_every: int = 1
    # Adam's moments across rounds: "keep" (restored from the site's state) or "reset" every round
    optimizer_state: str = "keep"
    # FedProx's proximal term weight (methods with a proximal term)
    proximal_mu: float = 0.01
    sgd_lr: float = 0.01  # the local learning rate of methods whose algorithm trains with SGD (SCAFFOLD)
    # MS-Net (methods with auxiliary branches): softmax temperature and weight of the distillation of the site's
    # auxiliary branch into the universal head (the branches' own CE always has weight 1)
    msnet_temperature: float = 2.0
    msnet_weight: float = 0.5
    # server step: fedadam / fedyogi: eta; fedavgm and the FedAvg methods: the server learning rate on the sites'
    # mean update (on a FedAvg method a value other than 1 makes it FedAvgM without momentum); 0 = the usual value
    server_lr: float = 0.0
    server_momentum: float = 0.9  # fedavgm: momentum; fedadam / fedyogi: beta_1
    server_tau: float = 1e-3  # fedadam / fedyogi: adaptivity
    # deployment: continue the run directory RESUME (absolute, or relative to output-dir) from its checkpoint
    resume: str = ""
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
        need(0 < self.dicom_window_width < float("inf"), "dicom-window-width", "must be a finite number of HU > 0")
        need(abs(self.dicom_window_level) < float("inf"), "dicom-window-level", "must be a finite number of HU")
        need(not (self.body_crop and self.lung_crop), "lung-crop",
             "excludes body-crop (the lungs' crop lies inside the body's)")
        need(not (self.standardize and self.equalize), "equalize",
             "excludes standardize (equalisation already undoes any increasing intensity change)")
        need(0.0 <= self.cue_augment <= 1.0, "cue-augment", "must be in [0, 1] (0 = off)")
        need(0.0 <= self.style_augment <= 1.0, "style-augment", "must be in [0, 1] (0 = off)")
        need(0.0 <= self.random_convolution <= 1.0, "random-convolution", "must be in [0, 1] (0 = off)")
        need(0.0 <= self.mixstyle <= 1.0, "mixstyle", "must be in [0, 1] (0 = off)")
        need(self.cue_adversarial >= 0, "cue-adversarial", "must be >= 0 (0 = off)")
        need(0.0 < self.spectrum_band <= 0.5, "spectrum-band", "must be in (0, 0.5] cycles per pixel")
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
        need(self.method in METHODS, "method", f"must be one of {tuple(METHODS)}")
        need(self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
        need(self.local_steps >= 1, "local-steps", "must be >= 1")
        need(0 <= self.min_sites <= len(self.sites), "min-sites", "must be in [0, number of sites] (0 = all)")
        need(self.round_timeout >= 0, "round-timeout", "must be >= 0 seconds (0 = wait for every site)")
        need(self.compression in COMPRESSIONS, "compression", f"must be one of {COMPRESSIONS}")
        need(self.fedavg_weights in FEDAVG_WEIGHTS, "fedavg-weights", f"must be one of {FEDAVG_WEIGHTS}")
        need(self.min_prototype_images >= 1, "min-prototype-images", "must be >= 1")
        need(1 <= self.prototypes_per_class <= 16, "prototypes-per-class", "must be in [1, 16]")
        need(self.prototype_weight > 0, "prototype-weight", "must be > 0")
        need(self.prototype_every >= 1, "prototype-every", "must be >= 1")
        need(self.summary_images >= 0, "summary-images", "must be >= 0 (0 = every training image)")
        need(self.eval_every >= 1, "eval-every", "must be >= 1")
        need(self.optimizer_state in ("keep", "reset"), "optimizer-state", "must be 'keep' or 'reset'")
        need(self.prototypes_per_class == 1 or self.dp_epsilon == 0, "prototypes-per-class",
             "must be 1 with dp-epsilon > 0 (the DP guarantee covers class means, not clusters)")
        need(self.proximal_mu >= 0, "proximal-mu", "must be >= 0")
        need(self.sgd_lr > 0, "sgd-lr", "must be > 0")
        need(self.msnet_temperature > 0, "msnet-temperature", "must be > 0")
        need(self.msnet_weight >= 0, "msnet-weight", "must be >= 0 (0 = auxiliary branches without distillation)")
        need(self.server_lr >= 0, "server-lr", "must be >= 0 (0 = the server optimizer's usual value)")
        need(not self.spec.proximal or self.server_lr in (0, 1), "server-lr",
             f"must be 0 or 1 for {self.method} (Flower's FedProx steps by the sites' mean update)")
        need(0 <= self.server_momentum < 1, "server-momentum", "must be in [0, 1)")
        need(self.server_tau > 0, "server-tau", "must be > 0")
        try:
            self.pinned_nodes
        except ValueError as e:
            raise ConfigError(f"config key 'site-nodes' {e}") from None
        try:
            self.bn_transforms
        except ValueError as e:
            raise ConfigError(f"config key 'bn-transform' {e}") from None
        need(self.max_update_norm >= 0, "max-update-norm", "must be >= 0 (0 = no bound on a site's update)")
        need(self.dp_epsilon >= 0, "dp-epsilon", "must be >= 0 (0 = prototypes without noise)")
        need(0 < self.dp_delta < 1, "dp-delta", "must be in (0, 1)")
        need(self.dp_clip > 0, "dp-clip", "must be > 0")
        need(self.dp_epsilon == 0 or self.spec.prototypes, "dp-epsilon",
             "applies to the prototypes of methods that exchange them (fedbn-proto); set it to 0 otherwise")

    @property
    def spec(self) -> Method:
        """The record of ``method``: what is shared, kept per site and added to the loss."""
        return METHODS[self.method]

    @property
    def augmentation(self) -> Augmentation:
        """What training does to its crops beyond random cropping (cue-augment, style-augment, spectrum-band,
        random-convolution)."""
        return Augmentation(self.cue_augment, self.style_augment, self.spectrum_band, self.random_convolution)

    def prototypes_due(self, server_round: int) -> bool:
        """Whether the summary at the start of ``server_round`` computes and sends prototypes: methods that
        exchange them, rounds 1, 1 + k, 1 + 2k, ... (k = prototype-every), never the final summary. The server
        asks for them and each site checks the request against this schedule (its DP releases)."""
        return (self.spec.prototypes and 1 <= server_round <= self.num_server_rounds
                and (server_round - 1) % self.prototype_every == 0)

    @property
    def pinned_nodes(self) -> dict[int, int]:
        """``site-nodes`` as site index -> node id; ValueError when it names an unknown site or a bad id."""
        out: dict[int, int] = {}
        for site, node in self._site_pairs(self.site_nodes, "'SITE=NODE_ID,...'", lambda v: v.strip().isdigit()):
            if self.sites.index(site) in out or int(node) in out.values():
                raise ValueError(f"pins a site or a node twice: {self.site_nodes!r}")
            out[self.sites.index(site)] = int(node)
        return out

    @property
    def bn_transforms(self) -> tuple[str, ...]:
        """``bn-transform`` per site index ("eval" or "train"); ValueError when it names an unknown site or
        value."""
        if self.bn_transform in BN_TRANSFORMS:
            return (self.bn_transform,) * len(self.sites)
        out = {site: "eval" for site in self.sites}
        out.update(self._site_pairs(self.bn_transform, f"one of {BN_TRANSFORMS} or 'SITE=VALUE,...'",
                                    lambda v: v in BN_TRANSFORMS))
        return tuple(out[site] for site in self.sites)

    def _site_pairs(self, text: str, expected: str, valid: Callable[[str], bool]) -> list[tuple[str, str]]:
        """The (site, value) pairs of a "SITE=VALUE,..." key; ValueError naming the ``expected`` form when a pair
        lacks "=", names a site not in the run or holds a value ``valid`` refuses."""
        pairs = []
        for pair in filter(None, (p.strip() for p in text.split(","))):
            site, sep, value = pair.partition("=")
            if not sep or site not in self.sites or not valid(value):
                raise ValueError(f"must be {expected} with SITE among {self.sites}, got {pair!r}")
            pairs.append((site, value))
        return pairs

    @property
    def cache_size(self) -> int:
        """Side of the cached square images: image_size * 256 / 224, the SPEC's resize before a random crop."""
        return round(self.image_size * 256 / 224)

    @property
    def preprocessing(self) -> Preprocessing:
        """How files become cached images (DICOM window, body or lung crop, standardisation or equalisation)."""
        return Preprocessing((self.dicom_window_width, self.dicom_window_level), self.body_crop, self.standardize,
                             self.equalize, self.lung_crop)

    @property
    def effective_server_lr(self) -> float:
        """``server-lr``, or the server optimizer's usual value: 3e-3 for FedAdam / FedYogi, 1.0 otherwise."""
        return self.server_lr or (3e-3 if self.spec.server_optimizer in ("fedadam", "fedyogi") else 1.0)

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

    def replace(self, **overrides: Any) -> Config:
        """A copy with kebab-case or snake_case overrides applied and validated."""
        return _build({**self.to_dict(), **overrides})


def project_root() -> Path:
    """The project's source folder, also when the code runs from a Flower app bundle.

    The checkout this code was imported from, when it holds the embedded data's manifests (a source checkout,
    e.g. one on ``PYTHONPATH``); Flower imports the app from an unpacked copy without them (an app bundle holds
    no CSV), and then the installed distribution (``pip install -e .``) still knows where the project lives.
    ``FL_COVID_HOME`` overrides both.
    """
    if env := os.environ.get("FL_COVID_HOME"):
        return Path(env).expanduser().resolve()
    if any((PACKAGE_DIR.parent / "data").glob("*/manifest.csv")):
        return PACKAGE_DIR.parent
    try:
        direct = metadata.distribution("fl-covid").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        direct = None
    if direct:
        url = json.loads(direct).get("url", "")
        if url.startswith("file://") and (Path(url[7:]) / "data").is_dir():
            return Path(url[7:])
    return PACKAGE_DIR.parent


_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "tuple[str, ...]": tuple[str, ...]}


def coerce_field(key: str, value: Any, field: Field) -> Any:
    """``value`` (a YAML value or an override string) as the type of the dataclass ``field``, or ConfigError
    naming ``key``."""
    typ = _TYPES[field.type] if isinstance(field.type, str) else field.type
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


def _build(values: Mapping[str, Any]) -> Config:
    kwargs = {}
    for key, value in values.items():
        norm = key.replace("_", "-")
        if norm not in _FIELDS:
            raise ConfigError(f"unknown config key '{key}'; known keys: {', '.join(sorted(_FIELDS))}")
        f = _FIELDS[norm]
        kwargs[f.name] = coerce_field(norm, value, f)
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


# settings that only a federation reads (centralized training ignores them) and the one only centralized reads
FEDERATION_ONLY_KEYS = frozenset({
    "num-server-rounds", "local-steps", "min-sites", "round-timeout", "compression", "fedavg-weights",
    "max-update-norm", "site-nodes", "min-prototype-images", "prototypes-per-class", "prototype-weight",
    "prototype-every", "summary-images", "bn-recalibration", "bn-transform", "eval-every", "optimizer-state",
    "proximal-mu", "sgd-lr", "server-lr", "server-momentum", "server-tau", "resume", "dp-epsilon", "dp-delta",
    "dp-clip"})
CENTRAL_ONLY_KEYS = frozenset({"epochs"})
FEDERATED_KEYS = ("method", "num-server-rounds", "local-steps", "seed", "fold", "data-root", "output-dir",
                  "resume")
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


@cache
def _warn_once(message: str) -> None:
    """Log a warning once per process (clients parse the run config for every message)."""
    log.warning(message)


def federated_config(run_config: Mapping[str, Any], at_site: bool = False) -> Config:
    """Config of a Flower run: YAML ``config-file``, then the run config's own scalars, then ``overrides``
    ("key=value key=value", the explicit word of whoever started the run). An empty ``data-root`` /
    ``output-dir`` keeps the YAML value or the default. Flower always sends every run-config key, so a YAML value
    for one of FEDERATED_KEYS is replaced by the run config's: set those with --run-config.

    ``at_site``: a site reads ``config-file`` only from its own installed copy of the app (``site_config_file``),
    never from a path the server chose. A centralized method is refused, naming the key ``method``."""
    run_config = dict(run_config)
    scalars = {k: run_config[k] for k in FEDERATED_KEYS if k in run_config and run_config[k] != ""}
    overrides = parse_overrides(str(run_config.get("overrides", "")).split())
    name = str(run_config.get("config-file") or "configs/default.yaml")
    file = site_config_file(name) if at_site else resolve_config_file(name)
    config = load_config(file, {**scalars, **overrides})
    if not config.spec.federated:
        raise ConfigError(f"config key 'method' is {config.method!r}, a centralized method: a federated run needs "
                          f"one of {FEDERATED_METHODS} (run centralized methods with fl-covid-central)")
    if config.spec.contrastive and config.arch != "redesigned":
        raise ConfigError(f"config key 'arch' is {config.arch!r}, but method {config.method!r} needs "
                          "arch=redesigned (the original COVID-Net has no projection head for prototypes)")
    if not at_site:
        from_yaml = load_config(file)
        for key in scalars.keys() - overrides.keys():
            attr = key.replace("-", "_")
            if getattr(from_yaml, attr) != getattr(Config, attr) and getattr(from_yaml, attr) != getattr(config, attr):
                _warn_once(f"{file} sets {key}={getattr(from_yaml, attr)} but the run config says "
                           f"{getattr(config, attr)}, which wins; pass --run-config \"{key}={getattr(from_yaml, attr)}\" "
                           "to use the file's value")
    return config


def site_config_file(name: str) -> Path:
    """The experiment YAML a site trains with: ``configs/<name>.yaml`` of the site's own copy of the app (whose
    content the site approved), never an arbitrary path (the server could probe the site's files with it)."""
    parts = PurePosixPath(name).parts
    if len(parts) != 2 or parts[0] != "configs" or not SAFE_NAME.fullmatch(parts[1]) \
            or not parts[1].endswith((".yaml", ".yml")):
        raise ConfigError(f"config-file {name!r} must name a file configs/NAME.yaml of the app")
    file = PACKAGE_DIR.parent / "configs" / parts[1]
    if not file.is_file():
        raise ConfigError(f"config-file {name!r} is not one of the app's configs")
    return file
