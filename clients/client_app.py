"""Flower ClientApp: one hospital. Restores its own BN and optimizer state, trains with the shared engine,
replies with shared weights, example count, prototypes and metrics. BN never leaves the site."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_covid import records as R
from fl_covid.config import Config, ConfigError, federated_config
from fl_covid.data import Site, Split, load_configured_site
from fl_covid.engine import select_device
from fl_covid.federated import LocalState, SiteRunner
from fl_covid.reporting import write_csv
from fl_covid.prototypes import PrototypeBank

app = ClientApp()
log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def _site_data(config: Config, index: int, folder: str) -> tuple[Site, Split]:
    """Decode a site once per process (Ray actors serve many rounds)."""
    return load_configured_site(config, index, folder)


def _node_path(node_config: dict, key: str) -> Path:
    """An absolute folder from the SuperNode's ``--node-config`` (deployment)."""
    value = str(node_config.get(key, ""))
    if not value or not Path(value).expanduser().is_absolute():
        raise ConfigError(f"node config key '{key}' must be an absolute folder, got {value!r}: start the SuperNode "
                          "with --node-config \"site='NAME' data-dir='/abs/data' state-dir='/abs/state'\"")
    return Path(value).expanduser()


def _setup(context: Context, msg: Message) -> tuple[Config, SiteRunner, Path]:
    """Config, this node's site (node config in deployment, partition id in simulation) and its state folder
    ``<state-dir, or output-dir in simulation>/<run name>/site-<name>``, which stays on the site."""
    config = federated_config(context.run_config)
    nc = context.node_config
    if "site" in nc:
        if nc["site"] not in config.sites:
            raise ConfigError(f"node config site {nc['site']!r} is not one of the config's sites {config.sites}")
        index = config.sites.index(str(nc["site"]))
        folder, state_root = _node_path(nc, "data-dir"), _node_path(nc, "state-dir")
    else:
        index, total = int(nc["partition-id"]), int(nc["num-partitions"])
        if total != len(config.sites):
            raise ConfigError(f"the federation has {total} nodes but config key 'sites' lists {len(config.sites)}")
        folder = config.resolved_data_root() / config.sites[index]
        state_root = config.resolved_output_dir()
    state_dir = state_root / str(msg.content[R.CONFIG][R.RUN_NAME]) / f"site-{config.sites[index]}"
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    site, split = _site_data(config, index, str(folder))
    return config, SiteRunner(config, index, site, split, select_device(config.device)), state_dir


def _local_state(context: Context, state_dir: Path, max_round: int) -> tuple[LocalState | None, str]:
    """This site's newest BN/optimizer state of a round <= ``max_round`` and where it came from: memory
    (context.state), else disk (after a SuperNode restart or a server resume, which starts a new run)."""
    if R.STATE_BN in context.state and int(context.state[R.STATE_META]["round"]) <= max_round:
        return LocalState(R.from_record(context.state[R.STATE_BN]), R.from_record(context.state[R.STATE_OPTIMIZER]),
                          int(context.state[R.STATE_META]["round"])), "memory"
    local = LocalState.load(state_dir, max_round)
    if local is not None:
        log.info("site state of round %d restored from %s", local.round, state_dir)
    return local, "disk" if local is not None else "none"


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, runner, state_dir = _setup(context, msg)
    cfg = msg.content[R.CONFIG]
    bank = R.bank_from_record(msg.content[R.PROTOTYPES]) if R.PROTOTYPES in msg.content else None
    server_round = int(cfg[R.ROUND])
    start, source = _local_state(context, state_dir, server_round - 1)
    shared, prototypes, stats, local = runner.train(
        R.decode_tensors(msg.content[R.WEIGHTS]), start, float(cfg[R.LR]), server_round, bank)
    context.state[R.STATE_BN] = R.to_record(local.bn)
    context.state[R.STATE_OPTIMIZER] = R.to_record(local.optimizer)
    context.state[R.STATE_META] = ConfigRecord({"round": local.round})
    local.save(state_dir, started_from=(start or LocalState()).provenance(source))
    content = RecordDict({
        R.WEIGHTS: R.to_record(shared, config.compression),
        R.METRICS: MetricRecord({R.NUM_EXAMPLES: len(runner.split.train), R.SITE_ID: runner.site_id, **stats}),
    })
    if prototypes is not None:
        content[R.PROTOTYPES] = R.bank_to_record(PrototypeBank.from_sites({runner.site_id: prototypes}))
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, runner, state_dir = _setup(context, msg)
    shared = R.decode_tensors(msg.content[R.WEIGHTS])
    local, _ = _local_state(context, state_dir, int(msg.content[R.CONFIG][R.ROUND]))
    metrics, roc_tpr, probs = runner.evaluate(shared, local)
    test = runner.split.test.tolist()
    write_csv(state_dir.parent / f"predictions_{runner.site.name}.csv",  # per-image results stay on the site
              [{"path": runner.site.paths[i], "label": int(runner.site.labels[i]), "prob_covid": float(p)}
               for i, p in zip(test, probs)])
    reply = {R.NUM_EXAMPLES: metrics.pop("n"), R.SITE_ID: runner.site_id, **metrics, R.ROC_TPR: roc_tpr}
    return Message(content=RecordDict({R.METRICS: MetricRecord(reply)}), reply_to=msg)
