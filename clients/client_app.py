"""Flower ClientApp: one hospital. Checks the run against the site's policy and what the server sent against what
it expects, restores its own BN and optimizer state from its state folder, trains with the shared engine and
replies with shared weights, example count, prototypes and metrics. BN never leaves the site; neither does the
text of an error, which stays in the site's log (the server learns only that the site refused or failed).
The ClientApp keeps nothing in memory between messages: a restarted SuperNode continues from the same files."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_covid import records as R
from fl_covid.checkpoint import (
    PREDICTIONS_CSV,
    RECEIVED,
    SITE_MODEL,
    SITE_STATE,
    VAL_PREDICTIONS_CSV,
    prune_site_states,
    site_folder,
)
from fl_covid.config import Config, NodeConfig, federated_config, parse_node_config
from fl_covid.data import load_configured_site
from fl_covid.engine import select_device
from fl_covid.federated import LocalState, Received, SiteRunner
from fl_covid.privacy import BudgetExceeded, check_run_budget, release_noise
from fl_covid.prototypes import PrototypeBank
from fl_covid.reporting import write_predictions
from fl_covid.shift import shift_profile
from fl_covid.site_model import model_card, save_site_model
from fl_covid.trust import (
    Instruction,
    InstructionLog,
    NotTrusted,
    Reply,
    load_private_key,
    parse_public_key,
    sign,
    verify,
)
from fl_covid.validation import check_bank, check_instruction, max_prototype_rows

app = ClientApp()
log = logging.getLogger(__name__)


class RunRefused(RuntimeError):
    """The run breaks the site's policy; the reasons are in the site's log only."""


class SiteFailure(RuntimeError):
    """The site could not complete the request; the reason is in the site's log only."""


class InstructionRefused(RuntimeError):
    """The instruction is not one the operator signed for this site, in order; the reason is in the site's log."""


def _authenticate(msg: Message, context: Context, node: NodeConfig) -> Ed25519PrivateKey:
    """A deployed site runs only what the operator signed for it, in order (``fl_covid.trust``): NotTrusted for
    an unsigned, mis-signed, replayed or reordered instruction, checked before any data is read. Returns the
    site's own key, which signs the reply."""
    if not node.policy.operator_key:
        raise NotTrusted("the site policy has no operator-key: a deployed site runs only instructions the "
                         "operator signed (deploy/make_signing_key.sh)")
    if not node.signing_key:
        raise NotTrusted("the node config has no signing-key: the site cannot sign its replies "
                         "(deploy/start_supernode.sh --signing-key)")
    key = load_private_key(Path(node.signing_key))
    signature, origin = R.read_signature(msg.content)
    config = msg.content.get(R.CONFIG) if R.CONFIG in msg.content else None
    server_round = config.get(R.ROUND) if isinstance(config, ConfigRecord) else None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (origin, server_round)):
        raise NotTrusted("the instruction is not signed (no signature record with its run and round)")
    instruction = Instruction(context.run_id, int(origin), int(server_round), msg.metadata.message_type, node.site,
                              R.content_digest(msg.content))
    verify(parse_public_key(node.policy.operator_key, "site policy key 'operator-key'"), instruction, signature)
    InstructionLog(Path(node.state_dir) / f".instructions-{node.site}.json").accept(instruction)
    return key


def guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Run a handler so that the server never learns more than 'refused' or 'failed': the details (which could
    reveal the site's files or data) go to the site's own log."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            node = parse_node_config(context.node_config)
            key = _authenticate(msg, context, node) if node.deployed else None
            reply = handler(msg, context)
            if key is not None:  # the reply in this site's name: the instruction it answers, its content
                reply.content[R.SIGNATURE] = R.signature_record(sign(key, Reply(
                    context.run_id, msg.metadata.message_id, node.site, R.content_digest(reply.content))))
            return reply
        except NotTrusted as e:
            log.error("instruction refused before reading any data: %s", e)
            raise InstructionRefused("instruction refused: not signed by the operator for this site in order "
                                     "(reasons in the site's log)") from None
        except (RunRefused, BudgetExceeded) as e:
            log.error("run refused by this site's policy: %s", e)
            raise RunRefused("run refused by the site's policy (reasons in the site's log)") from None
        except Exception:
            log.exception("the site could not complete a %s request", msg.metadata.message_type)
            raise SiteFailure("the site could not complete this request (details in the site's log)") from None

    return run


@lru_cache(maxsize=4)
def _site_runner(config: Config, index: int, folder: str) -> SiteRunner:
    """The site's decoded images, split and model skeleton, built once per process (a Ray actor serves many
    messages); every message loads all of the model's tensors, so nothing of one message reaches the next."""
    site, split = load_configured_site(config, index, folder)
    return SiteRunner(config, index, site, split, select_device(config.device))


@lru_cache(maxsize=4)
def _run_config(items: tuple[tuple[str, Any], ...]) -> Config:
    """The run's config as this site reads it (its own copy of the app's configs), parsed once per run."""
    return federated_config(dict(items), at_site=True)


def _setup(context: Context, msg: Message) -> tuple[Config, NodeConfig, SiteRunner, Path, int]:
    """Config (checked against the site's policy), node config, this node's site, its folder for this run and the
    server round. The folder ``<state-dir, or output-dir in simulation>/<run name>/site-<name>`` stays on the site."""
    node = parse_node_config(context.node_config)
    config = _run_config(tuple(sorted(context.run_config.items())))
    if reasons := node.policy.violations(config):
        raise RunRefused("; ".join(reasons))
    instruction = msg.content.get(R.CONFIG)
    if not isinstance(instruction, ConfigRecord):
        raise ValueError("the message has no config record")
    train = msg.metadata.message_type == "train"
    if reason := check_instruction(instruction.get(R.ROUND), instruction.get(R.LR), instruction.get(R.RUN_NAME),
                                   config.num_server_rounds + (0 if train else 1), train):
        raise ValueError(reason)
    index = node.site_index(config)
    root = node.state_root(config).resolve()
    folder = site_folder(root, str(instruction[R.RUN_NAME]), config.sites[index]).resolve()
    if not folder.is_relative_to(root):
        raise ValueError(f"run name {instruction[R.RUN_NAME]!r} leads outside the state folder {root}")
    if node.deployed:
        _check_run_identity(msg, context.run_id, config, folder)
    if (folder / SITE_MODEL).exists() and (not train and bool(instruction.get(R.FINAL)) or node.deployed):
        raise RunRefused(f"run {folder.parent.name} is finished here: its final model in {folder / SITE_MODEL} "
                         "is written once")
    check_run_budget(config, root, config.sites[index], folder.parent.name, node.policy.dp_budget)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    runner = _site_runner(config, index, str(node.data_folder(config)))
    return config, node, runner, folder, int(instruction[R.ROUND])


def _check_run_identity(msg: Message, run_id: int, config: Config, folder: Path) -> None:
    """A deployed site works in the folder of the signed run: ``<method>-run<origin>``, where origin is the run
    itself or, for a resume, the earlier run it continues, which this site must have taken part in."""
    _, origin = R.read_signature(msg.content)
    if folder.parent.name != f"{config.method}-run{origin}":
        raise RunRefused(f"run name {folder.parent.name!r} is not {config.method}-run{origin}, the folder of the "
                         f"signed run {origin}")
    if origin != run_id and not folder.is_dir():  # (run ids are random: no order between runs)
        raise RunRefused(f"run {run_id} resumes run {origin}, which this site took no part in")


def _received_weights(msg: Message, config: Config, runner: SiteRunner) -> dict[str, torch.Tensor]:
    """The shared weights the server sent, checked (one array of the right size and dtype, finite) before use."""
    flat = R.read_weights(msg.content.get(R.WEIGHTS), R.layout_size(runner.layout), config.compression)
    if not np.isfinite(flat).all():
        raise ValueError("the shared weights from the server contain NaN or Inf")
    return R.unflatten(flat, runner.layout)


def _received_bank(msg: Message, config: Config, runner: SiteRunner) -> PrototypeBank | None:
    """The prototype bank the server sent, checked (size, dimension, labels, sites, counts, unit rows)."""
    if R.PROTOTYPES not in msg.content:
        return None
    dim, rows = runner.model.proj_dim, max_prototype_rows(config, len(config.sites))
    bank = R.read_bank(msg.content[R.PROTOTYPES], dim, rows)
    if reason := check_bank(bank, config, dim, rows):
        raise ValueError(f"prototype bank from the server: {reason}")
    return bank


@app.evaluate()
@guarded
def summarise(msg: Message, context: Context) -> Message:
    """Start of a round: the received weights evaluated (when asked), summarised in prototypes, kept for training."""
    config, node, runner, folder, server_round = _setup(context, msg)
    instruction = msg.content[R.CONFIG]
    evaluate_now, final = bool(instruction.get(R.EVALUATE)), bool(instruction.get(R.FINAL))
    prototypes_due = config.prototypes_due(server_round) and not final
    if bool(instruction.get(R.PROTOTYPES_DUE)) != prototypes_due:
        raise ValueError(f"the server asked for prototypes={bool(instruction.get(R.PROTOTYPES_DUE))} in round "
                         f"{server_round}; the run's schedule (prototype-every) says {prototypes_due}")
    size = R.layout_size(runner.layout)
    if R.BASE in instruction:  # int8: the change since the weights this site kept from its last summary
        kept = Received.load(folder / RECEIVED)
        if kept is None or R.weights_digest(kept.flat) != instruction[R.BASE]:
            raise ValueError("the server sent a difference from weights this site does not hold")
        flat = kept.flat + R.read_difference(msg.content.get(R.WEIGHTS), size)
    else:
        flat = R.read_weights(msg.content.get(R.WEIGHTS), size, config.compression)
    if not np.isfinite(flat).all():
        raise ValueError("the shared weights from the server contain NaN or Inf")
    noise = None
    if config.dp_epsilon > 0 and prototypes_due:
        noise = release_noise(config, node.state_root(config).resolve(), runner.site.name, folder.parent.name,
                              server_round, R.weights_digest(flat), node.policy.dp_budget)
    summary = runner.summarise(R.unflatten(flat, runner.layout), LocalState.load(folder / SITE_STATE, server_round - 1),
                               server_round, evaluate_now, prototypes_due, noise)
    if not final:  # the train message of this round names these weights by their digest
        Received(flat, summary.bn, server_round).save(folder / RECEIVED)
    reply: dict = {R.NUM_EXAMPLES: len(runner.split.test), R.SITE_ID: runner.site_id}
    if final:  # the site keeps its complete final model: the global weights with its own BN
        images = runner.site.images
        profile = shift_profile(runner.model, images[runner.split.train], images[runner.split.val], config.image_size,
                                seed=config.seed, device=runner.device)
        save_site_model(folder / SITE_MODEL, runner.model.state_dict(), model_card(
            config, runner.site, runner.split.train, run=folder.parent.name, method=config.method,
            rounds=config.num_server_rounds, validation={k[4:]: v for k, v in (summary.metrics or {}).items()
                                                         if k.startswith("val_")}, shift=profile))
    if summary.metrics is not None:
        write_predictions(folder / PREDICTIONS_CSV, runner.site, runner.split.test, summary.probs)
        write_predictions(folder / VAL_PREDICTIONS_CSV, runner.site, runner.split.val, summary.val_probs)
        reply.update({k: v for k, v in summary.metrics.items() if k != "n"})
        reply[R.ROC_TPR] = summary.roc_tpr
    content = RecordDict({R.METRICS: MetricRecord(reply)})
    if summary.prototypes is not None:
        content[R.PROTOTYPES] = R.bank_to_record(summary.prototypes)
    return Message(content=content, reply_to=msg)


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    config, node, runner, folder, server_round = _setup(context, msg)
    instruction = msg.content[R.CONFIG]
    bn = None
    if R.WEIGHTS in msg.content:
        shared = _received_weights(msg, config, runner)
    else:  # the weights of this round's summary message, named by their digest
        received = Received.load(folder / RECEIVED)
        if received is None or received.round != server_round or \
                R.weights_digest(received.flat) != instruction.get(R.DIGEST):
            raise ValueError(f"no weights of round {server_round} with the digest the server names")
        shared, bn = R.unflatten(received.flat, runner.layout), received.bn
    start = LocalState.load(folder / SITE_STATE, server_round - 1)
    base = R.flatten(shared, runner.layout)
    algorithm = runner.algorithm
    received = R.read_payload(msg.content.get(R.PAYLOAD), algorithm.server_sends, R.layout_size(runner.layout)) \
        if algorithm.server_sends else {}
    shared, stats, local, sent = runner.train(shared, bn, start, float(instruction[R.LR]), server_round,
                                              _received_bank(msg, config, runner), received)
    trained = R.flatten(shared, runner.layout)
    if config.compression == "int8":  # the change training made, with last round's quantisation error added
        change = trained - base + (start.residual if start is not None and start.residual is not None else 0.0)
        q, scales = R.quantize(change)
        local.residual = change - R.dequantize(q, scales)
        weights = R.difference_record(q, scales)
    else:
        weights = R.weights_record(trained, config.compression)
    local.save(folder / SITE_STATE, started_from=(start or LocalState()).provenance())
    prune_site_states(node.state_root(config), runner.site.name, node.policy.keep_runs)
    content = RecordDict({
        R.WEIGHTS: weights,
        R.METRICS: MetricRecord({R.NUM_EXAMPLES: len(runner.split.train), R.SITE_ID: runner.site_id, **stats}),
    })
    if sent:  # what the method's algorithm sends besides the weights (fl_covid.algorithms)
        content[R.PAYLOAD] = R.payload_record(sent)
    return Message(content=content, reply_to=msg)
