"""What a hospital's SuperNode and the operator's SuperLink trust, each read from its own machine, never from the
run: the site's policy (what it agrees to train), the SuperNode's node config (its site, folders and signing key)
and the operator's trust file (the operator's signing key, each site's public key and node).

The server cannot change any of them: a site checks every run's config against its ``SitePolicy`` before it trains
(``SitePolicy.violations``), and the ServerApp sends instructions only to the nodes ``ServerTrust`` pins to a site.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from fl_covid.config import Config, coerce_field
from fl_covid.errors import ConfigError
from fl_covid.methods import FEDERATED_METHODS
from fl_covid.trust import NotTrusted, parse_public_key


@dataclass(frozen=True)
class SitePolicy:
    """A hospital's own limits on what it trains, set in its SuperNode's node config (or the YAML file that the
    node config key ``policy`` names) and checked by the site before it trains; the server cannot change them.

    ``approved-apps``: SHA-256 digests of the app bundles (FABs) the site runs (checked by ``fl-covid-clientapp``
    before any code of a run is loaded; empty = none, and the SuperNode script refuses to start).
    ``operator-key``: the operator's Ed25519 public key (base64, ``deploy/make_signing_key.sh``); a deployed site
    runs only instructions it signed (``fl_covid.trust``), and refuses every run while it is missing.
    ``require-dp`` with ``max-dp-epsilon`` (the config's dp-epsilon, per release; 0 = no bound), ``min-dp-epsilon``
    (a floor, 0 = none), ``max-dp-delta`` (0 = no bound) and ``dp-budget`` (total epsilon over all runs of this
    site; 0 = no bound): prototypes leave the site only with differential privacy within these bounds.
    ``max-*``: resource caps. ``min-prototype-images``: the smallest ``min-prototype-images`` a run may use.
    ``keep-runs``: training state of older runs than the newest ``keep-runs`` is deleted (final models are kept).
    The defaults constrain little (a simulation has no hospital behind it); deploy/site-policy.example.yaml is a
    hospital's starting point.
    """

    approved_apps: tuple[str, ...] = ()
    operator_key: str = ""
    allowed_methods: tuple[str, ...] = FEDERATED_METHODS
    require_dp: bool = False
    max_dp_epsilon: float = 0.0
    min_dp_epsilon: float = 0.0
    max_dp_delta: float = 0.0
    dp_budget: float = 0.0
    max_rounds: int = 1000
    max_local_steps: int = 5000
    max_batch_size: int = 256
    max_width: float = 1.0
    max_image_size: int = 512
    max_threads: int = 64
    min_prototype_images: int = 1
    keep_runs: int = 5

    def __post_init__(self) -> None:
        for digest in self.approved_apps:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ConfigError(f"site policy key 'approved-apps': {digest!r} is not a SHA-256 hex digest")
        if unknown := set(self.allowed_methods) - set(FEDERATED_METHODS):
            raise ConfigError(f"site policy key 'allowed-methods': {sorted(unknown)} are not federated methods "
                              f"{FEDERATED_METHODS}")
        if self.operator_key:
            try:
                parse_public_key(self.operator_key, "site policy key 'operator-key'")
            except NotTrusted as e:
                raise ConfigError(str(e)) from None
        if self.max_dp_epsilon and self.min_dp_epsilon > self.max_dp_epsilon:
            raise ConfigError(f"site policy key 'min-dp-epsilon' {self.min_dp_epsilon} is above max-dp-epsilon "
                              f"{self.max_dp_epsilon}")
        for key in ("max_dp_epsilon", "min_dp_epsilon", "max_dp_delta", "dp_budget"):
            if getattr(self, key) < 0:
                raise ConfigError(f"site policy key '{key.replace('_', '-')}' must be >= 0")
        for key in ("max_rounds", "max_local_steps", "max_batch_size", "max_image_size", "max_threads",
                    "min_prototype_images", "keep_runs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"site policy key '{key.replace('_', '-')}' must be >= 1")

    def violations(self, config: Config) -> list[str]:
        """Why this site refuses to train ``config`` (empty when it complies)."""
        c, out = config, []
        if c.method not in self.allowed_methods:
            out.append(f"method {c.method!r} is not among allowed-methods {list(self.allowed_methods)}")
        if self.require_dp and c.spec.prototypes and c.dp_epsilon <= 0:
            out.append("prototypes must be released with differential privacy (require-dp) but dp-epsilon is 0")
        if self.max_dp_epsilon and c.spec.prototypes and c.dp_epsilon > self.max_dp_epsilon:
            out.append(f"dp-epsilon {c.dp_epsilon} per round exceeds max-dp-epsilon {self.max_dp_epsilon}")
        if self.min_dp_epsilon and c.spec.prototypes and 0 < c.dp_epsilon < self.min_dp_epsilon:
            out.append(f"dp-epsilon {c.dp_epsilon} per round is below min-dp-epsilon {self.min_dp_epsilon}")
        if self.max_dp_delta and c.spec.prototypes and c.dp_epsilon > 0 and c.dp_delta > self.max_dp_delta:
            out.append(f"dp-delta {c.dp_delta} exceeds max-dp-delta {self.max_dp_delta}")
        for key, value, cap in (("num-server-rounds", c.num_server_rounds, self.max_rounds),
                                ("local-steps", c.local_steps, self.max_local_steps),
                                ("batch-size", c.batch_size, self.max_batch_size),
                                ("width", c.width, self.max_width), ("image-size", c.image_size, self.max_image_size),
                                ("num-threads", c.num_threads or os.cpu_count() or 1, self.max_threads)):
            if value > cap:
                out.append(f"{key} {value} exceeds the site's cap {cap}")
        if c.min_prototype_images < self.min_prototype_images:
            out.append(f"min-prototype-images {c.min_prototype_images} is below the site's "
                       f"{self.min_prototype_images}")
        return out


_POLICY_FIELDS = {f.name.replace("_", "-"): f for f in fields(SitePolicy)}
POLICY_ENV = "FL_COVID_SITE_POLICY"  # the policy file, for the guard that runs before the app (clients/guard.py)


def load_site_policy(file: Path | None, values: Mapping[str, Any] | None = None) -> SitePolicy:
    """A site policy: the YAML ``file`` (if any), then ``values`` (node config keys) on top. Lists may be YAML lists
    or comma-separated strings. Unknown keys, wrong types and bad values are errors naming the key."""
    merged: dict[str, Any] = {}
    if file is not None:
        file = file.expanduser()
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"site policy file {file} cannot be read: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"site policy file {file} must hold a mapping of keys to values")
        merged.update(loaded)
    merged.update(values or {})
    kwargs = {}
    for key, value in merged.items():
        if key not in _POLICY_FIELDS:
            raise ConfigError(f"unknown site policy key '{key}'; known: {', '.join(sorted(_POLICY_FIELDS))}")
        f = _POLICY_FIELDS[key]
        if isinstance(value, str) and f.type in ("tuple[str, ...]", tuple[str, ...]):
            value = [v.strip() for v in value.replace(",", " ").split()]
        kwargs[f.name] = coerce_field(key, value, f)
    return SitePolicy(**kwargs)


NODE_KEYS = ("site", "data-dir", "state-dir", "policy", "signing-key", "partition-id", "num-partitions")


@dataclass(frozen=True)
class NodeConfig:
    """A SuperNode's own settings. Deployment: ``site`` (its name in the experiment's ``sites``), absolute
    ``data-dir`` and ``state-dir``, its policy and ``signing-key`` (the file of its Ed25519 private key, which signs
    its replies); simulation: Flower's ``partition-id`` / ``num-partitions``."""

    site: str = ""
    data_dir: str = ""
    state_dir: str = ""
    signing_key: str = ""
    partition: int = -1
    num_partitions: int = 0
    policy: SitePolicy = SitePolicy()

    @property
    def deployed(self) -> bool:
        return bool(self.site)

    def site_index(self, config: Config) -> int:
        """This node's index into ``config.sites``."""
        if self.deployed:
            if self.site not in config.sites:
                raise ConfigError(f"node config site {self.site!r} is not one of the config's sites {config.sites}")
            return config.sites.index(self.site)
        if self.num_partitions != len(config.sites):
            raise ConfigError(f"the federation has {self.num_partitions} nodes but config key 'sites' lists "
                              f"{len(config.sites)}")
        return self.partition

    def data_folder(self, config: Config) -> Path:
        """The site's image folder: ``data-dir`` in deployment, ``<data-root>/<site>`` in simulation."""
        return Path(self.data_dir) if self.deployed else config.resolved_data_root() / config.sites[self.partition]

    def state_root(self, config: Config) -> Path:
        """Where the site keeps its state: ``state-dir`` in deployment, ``output-dir`` in simulation."""
        return Path(self.state_dir) if self.deployed else config.resolved_output_dir()


def parse_node_config(node_config: Mapping[str, Any]) -> NodeConfig:
    """A SuperNode's node config -> NodeConfig. Policy keys may stand in the node config itself or in the YAML file
    named by ``policy`` (node config wins); an unknown key is an error naming it."""
    nc = dict(node_config)
    unknown = set(nc) - set(NODE_KEYS) - set(_POLICY_FIELDS)
    if unknown:
        raise ConfigError(f"unknown node config keys {sorted(unknown)}; known: "
                          f"{', '.join(sorted(set(NODE_KEYS) | set(_POLICY_FIELDS)))}")
    policy = load_site_policy(Path(str(nc["policy"])) if nc.get("policy") else None,
                              {k: v for k, v in nc.items() if k in _POLICY_FIELDS})
    if "site" in nc:
        for key in ("data-dir", "state-dir"):
            value = str(nc.get(key, ""))
            if not value or not Path(value).expanduser().is_absolute():
                raise ConfigError(f"node config key '{key}' must be an absolute folder, got {value!r}: start the "
                                  "SuperNode with --node-config \"site='NAME' data-dir='/abs/data' "
                                  "state-dir='/abs/state'\"")
        return NodeConfig(site=str(nc["site"]), data_dir=str(Path(str(nc["data-dir"])).expanduser()),
                          state_dir=str(Path(str(nc["state-dir"])).expanduser()),
                          signing_key=str(nc.get("signing-key", "")), policy=policy)
    try:
        return NodeConfig(partition=int(nc["partition-id"]), num_partitions=int(nc["num-partitions"]), policy=policy)
    except (KeyError, ValueError) as e:
        raise ConfigError("node config needs 'site', 'data-dir' and 'state-dir' (deployment) or Flower's "
                          "'partition-id' and 'num-partitions' (simulation)") from e


TRUST_ENV = "FL_COVID_SERVER_TRUST"  # the operator's trust file, for the ServerApp (deploy/start_superlink.sh --trust)


@dataclass(frozen=True)
class ServerTrust:
    """The operator's side of end-to-end authentication (``fl_covid.trust``), a YAML file on the SuperLink machine
    named by ``$FL_COVID_SERVER_TRUST``::

        signing-key: /etc/fl-covid/operator.sign.key     # the operator's Ed25519 private key
        sites:                                           # per site: the node id of its registration and the
          site_a_sarscov2: {node: 1234, key: BASE64}     # public key that signs its replies

    Node pins live here, on the server's side, instead of in the run config that every site can read."""

    signing_key: Path
    keys: Mapping[str, str]  # site -> public key (base64)
    nodes: Mapping[str, int]  # site -> node id

    def check(self, sites: tuple[str, ...]) -> None:
        """ConfigError unless every site of the run has a key and a node here."""
        if missing := [s for s in sites if s not in self.keys]:
            raise ConfigError(f"the trust file (${TRUST_ENV}) has no key and node for sites {missing}")


def load_server_trust(file: Path) -> ServerTrust:
    """The operator's trust file; ConfigError naming the key that is missing or wrong."""
    try:
        loaded = yaml.safe_load(Path(file).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"trust file {file} cannot be read: {e}") from e
    if not isinstance(loaded, dict) or set(loaded) != {"signing-key", "sites"} or not isinstance(loaded["sites"], dict):
        raise ConfigError(f"trust file {file} must hold exactly 'signing-key' (a file) and 'sites' (site: {{node: "
                          "ID, key: BASE64}})")
    keys, nodes = {}, {}
    for site, entry in loaded["sites"].items():
        if not isinstance(entry, dict) or set(entry) != {"node", "key"} or not isinstance(entry["node"], int):
            raise ConfigError(f"trust file {file}: site {site!r} must have 'node' (the node id of its "
                              "registration) and 'key' (its public signing key)")
        try:
            parse_public_key(entry["key"], f"trust file {file}: key of site {site!r}")
        except NotTrusted as e:
            raise ConfigError(str(e)) from None
        keys[str(site)], nodes[str(site)] = str(entry["key"]), entry["node"]
    if len(set(nodes.values())) != len(nodes):
        raise ConfigError(f"trust file {file} pins two sites to one node")
    return ServerTrust(Path(str(loaded["signing-key"])).expanduser(), keys, nodes)
