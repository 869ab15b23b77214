"""Flower ClientApp: one hospital. Checks the run against the site's policy and what the server sent against what
it expects, restores its own BN and optimizer state from its state folder, trains with the shared engine and
replies with shared weights, example count, prototypes and metrics. BN never leaves the site; neither does the
text of an error, which stays in the site's log (the server learns only that the site refused or failed).
The ClientApp keeps nothing in memory between messages: a restarted SuperNode continues from the same files."""

from __future__ import annotations

import functools
import logging
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_covid import records as R
from fl_covid.checkpoint import PREDICTIONS_CSV, SITE_STATE, prune_site_states, site_folder
from fl_covid.config import Config, NodeConfig, federated_config, parse_node_config
from fl_covid.data import Site, Split, load_configured_site
from fl_covid.engine import select_device
from fl_covid.federated import LocalState, SiteRunner
from fl_covid.privacy import noise_generator, site_secret
from fl_covid.reporting import write_csv
from fl_covid.validation import check_instruction, check_prototypes

app = ClientApp()
log = logging.getLogger(__name__)


class RunRefused(RuntimeError):
    """The run breaks the site's policy; the reasons are in the site's log only."""


class SiteFailure(RuntimeError):
    """The site could not complete the request; the reason is in the site's log only."""


def guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Run a handler so that the server never learns more than 'refused' or 'failed': the details (which could
    reveal the site's files or data) go to the site's own log."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except RunRefused as e:
            log.error("run refused by this site's policy: %s", e)
            raise RunRefused("run refused by the site's policy (reasons in the site's log)") from None
        except Exception:
            log.exception("the site could not complete a %s request", msg.metadata.message_type)
            raise SiteFailure("the site could not complete this request (details in the site's log)") from None

    return run


@lru_cache(maxsize=4)
def _site_data(config: Config, index: int, folder: str) -> tuple[Site, Split]:
    """Decode a site once per process (Ray actors serve many rounds)."""
    return load_configured_site(config, index, folder)


def _setup(context: Context, msg: Message) -> tuple[Config, NodeConfig, SiteRunner, Path, int]:
    """Config (checked against the site's policy), node config, this node's site, its folder for this run and the
    server round. The folder ``<state-dir, or output-dir in simulation>/<run name>/site-<name>`` stays on the site."""
    node = parse_node_config(context.node_config)
    config = federated_config(context.run_config, at_site=True)
    if reasons := node.policy.violations(config):
        raise RunRefused("; ".join(reasons))
    instruction = msg.content.get(R.CONFIG)
    if not isinstance(instruction, ConfigRecord):
        raise ValueError("the message has no config record")
    if reason := check_instruction(instruction.get(R.ROUND), instruction.get(R.LR), instruction.get(R.RUN_NAME),
                                   config.num_server_rounds, msg.metadata.message_type == "train"):
        raise ValueError(reason)
    index = node.site_index(config)
    root = node.state_root(config).resolve()
    folder = site_folder(root, str(instruction[R.RUN_NAME]), config.sites[index]).resolve()
    if not folder.is_relative_to(root):
        raise ValueError(f"run name {instruction[R.RUN_NAME]!r} leads outside the state folder {root}")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    site, split = _site_data(config, index, str(node.data_folder(config)))
    runner = SiteRunner(config, index, site, split, select_device(config.device))
    return config, node, runner, folder, int(instruction[R.ROUND])


def _received_weights(msg: Message, config: Config, runner: SiteRunner) -> dict[str, torch.Tensor]:
    """The shared weights the server sent, checked (one array of the right size and dtype, finite) before use."""
    flat = R.read_weights(msg.content.get(R.WEIGHTS), R.layout_size(runner.layout), config.compression)
    if not np.isfinite(flat).all():
        raise ValueError("the shared weights from the server contain NaN or Inf")
    return R.unflatten(flat, runner.layout)


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    config, node, runner, folder, server_round = _setup(context, msg)
    shared = _received_weights(msg, config, runner)
    bank = None
    if R.PROTOTYPES in msg.content:
        rows = len(config.sites) * 2 * config.prototypes_per_class
        bank = R.read_bank(msg.content[R.PROTOTYPES], runner.model.proj_dim, rows)
        if reason := check_prototypes(bank.vectors.numpy(), bank.labels.numpy(), bank.sites.numpy(),
                                      bank.counts.numpy(), dim=runner.model.proj_dim, num_classes=2,
                                      num_sites=len(config.sites), max_rows=rows,
                                      min_count=config.min_prototype_images):
            raise ValueError(f"prototype bank from the server: {reason}")
    start = LocalState.load(folder / SITE_STATE, server_round - 1)
    noise = noise_generator(site_secret(node.state_root(config) / f".noise-secret-{runner.site.name}"),
                            folder.parent.name, server_round) if config.dp_epsilon > 0 else None
    shared, prototypes, stats, local = runner.train(shared, start, float(msg.content[R.CONFIG][R.LR]), server_round,
                                                    bank, noise)
    local.save(folder / SITE_STATE, started_from=(start or LocalState()).provenance())
    prune_site_states(node.state_root(config), runner.site.name, node.policy.keep_runs)
    content = RecordDict({
        R.WEIGHTS: R.weights_record(R.flatten(shared, runner.layout), config.compression),
        R.METRICS: MetricRecord({R.NUM_EXAMPLES: len(runner.split.train), R.SITE_ID: runner.site_id, **stats}),
    })
    if prototypes is not None:
        content[R.PROTOTYPES] = R.bank_to_record(prototypes)
    return Message(content=content, reply_to=msg)


@app.evaluate()
@guarded
def evaluate(msg: Message, context: Context) -> Message:
    config, _, runner, folder, server_round = _setup(context, msg)
    shared = _received_weights(msg, config, runner)
    metrics, roc_tpr, probs = runner.evaluate(shared, LocalState.load(folder / SITE_STATE, server_round))
    test = runner.split.test.tolist()
    write_csv(folder / PREDICTIONS_CSV,  # per-image results stay on the site
              [{"path": runner.site.paths[i], "label": int(runner.site.labels[i]), "prob_covid": float(p)}
               for i, p in zip(test, probs)])
    reply = {R.NUM_EXAMPLES: metrics.pop("n"), R.SITE_ID: runner.site_id, **metrics, R.ROC_TPR: roc_tpr}
    return Message(content=RecordDict({R.METRICS: MetricRecord(reply)}), reply_to=msg)
