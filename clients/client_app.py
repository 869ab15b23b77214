"""Flower ClientApp: one hospital. Checks the run against the site's policy and what the server sent against what
it expects, restores its own BN and optimizer state from its state folder, trains with the shared engine and
replies with shared weights, example count, prototypes and metrics. BN never leaves the site; neither does the
text of an error, which stays in the site's log (the server learns only that the site refused or failed).
The ClientApp keeps nothing in memory between messages: a restarted SuperNode continues from the same files."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fl_covid import records as R
from fl_covid.algorithms import Payload
from fl_covid.checkpoint import RECEIVED, SITE_MODEL, prune_site_states, site_folder
from fl_covid.config import Config, federated_config
from fl_covid.data import load_configured_site
from fl_covid.engine import select_device
from fl_covid.federated import Received, SiteRunner
from fl_covid.policy import NodeConfig, parse_node_config
from fl_covid.privacy import BudgetExceeded, check_run_budget, release_noise
from fl_covid.prototypes import PrototypeBank
from fl_covid.transport import site_received, weights_digest
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


@dataclass(frozen=True)
class SiteCall:
    """What a handler works with: the run's config (checked against the site's policy), the node config, this
    node's site, its state root, its folder for this run and the server round. The folder ``<state-dir, or
    output-dir in simulation>/<run name>/site-<name>`` stays on the site."""

    config: Config
    node: NodeConfig
    runner: SiteRunner
    root: Path
    folder: Path
    round: int


def _setup(context: Context, msg: Message) -> SiteCall:
    """The ``SiteCall`` of a message, after every check that needs no data: the site's policy, the instruction,
    the run's folder and identity, a finished run, the privacy budget."""
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
    return SiteCall(config, node, runner, root, folder, int(instruction[R.ROUND]))


def _check_run_identity(msg: Message, run_id: int, config: Config, folder: Path) -> None:
    """A deployed site works in the folder of the signed run: ``<method>-run<origin>``, where origin is the run
    itself or, for a resume, the earlier run it continues, which this site must have taken part in."""
    _, origin = R.read_signature(msg.content)
    if folder.parent.name != f"{config.method}-run{origin}":
        raise RunRefused(f"run name {folder.parent.name!r} is not {config.method}-run{origin}, the folder of the "
                         f"signed run {origin}")
    if origin != run_id and not folder.is_dir():  # (run ids are random: no order between runs)
        raise RunRefused(f"run {run_id} resumes run {origin}, which this site took no part in")


def _prototypes_due(site: SiteCall, instruction: ConfigRecord) -> bool:
    """Whether this summary releases prototypes: the run's schedule (``Config.prototypes_due``), never the final
    summary; ValueError when the server asks otherwise."""
    due = site.config.prototypes_due(site.round) and not bool(instruction.get(R.FINAL))
    if bool(instruction.get(R.PROTOTYPES_DUE)) != due:
        raise ValueError(f"the server asked for prototypes={bool(instruction.get(R.PROTOTYPES_DUE))} in round "
                         f"{site.round}; the run's schedule (prototype-every) says {due}")
    return due


def _summary_weights(msg: Message, site: SiteCall) -> np.ndarray:
    """The weights of a summary message as the site holds them (float32 (N,)): whole, or (int8) the change since
    the weights it kept from its last summary, which the message names by digest."""
    difference = R.BASE in msg.content[R.CONFIG]
    kept = Received.load(site.folder / RECEIVED) if difference else None
    transfer = R.read_transfer(msg.content.get(R.WEIGHTS), site.runner.size, site.config.compression, difference)
    return site_received(transfer, msg.content[R.CONFIG].get(R.BASE), kept.flat if kept is not None else None)


def _training_weights(msg: Message, site: SiteCall) -> tuple[np.ndarray, dict[str, torch.Tensor] | None]:
    """The weights to train from (float32 (N,)) and the BN to train them with: those the message carries (with the
    site's own BN), or those of this round's summary, named by their digest, with the BN re-estimated under them."""
    if R.WEIGHTS not in msg.content:
        kept = Received.of_round(site.folder / RECEIVED, site.round, msg.content[R.CONFIG].get(R.DIGEST))
        return kept.flat, kept.bn
    transfer = R.read_transfer(msg.content[R.WEIGHTS], site.runner.size, site.config.compression, difference=False)
    return site_received(transfer, None, None), None


def _received_bank(msg: Message, site: SiteCall) -> PrototypeBank | None:
    """The prototype bank the server sent, checked (size, dimension, labels, sites, counts, unit rows)."""
    if R.PROTOTYPES not in msg.content:
        return None
    dim, rows = site.runner.model.proj_dim, max_prototype_rows(site.config, len(site.config.sites))
    bank = R.read_bank(msg.content[R.PROTOTYPES], dim, rows)
    if reason := check_bank(bank, site.config, dim, rows):
        raise ValueError(f"prototype bank from the server: {reason}")
    return bank


def _received_payload(msg: Message, site: SiteCall) -> Payload:
    """What the method's algorithm sent besides the weights (``fl_covid.algorithms``), checked."""
    names = site.runner.algorithm.server_sends
    return R.read_payload(msg.content.get(R.PAYLOAD), names, site.runner.size) if names else {}


@app.evaluate()
@guarded
def summarise(msg: Message, context: Context) -> Message:
    """Start of a round: the received weights evaluated (when asked), summarised in prototypes, kept for training."""
    site = _setup(context, msg)
    config, runner, instruction = site.config, site.runner, msg.content[R.CONFIG]
    prototypes_due = _prototypes_due(site, instruction)
    flat = _summary_weights(msg, site)
    noise = None
    if config.dp_epsilon > 0 and prototypes_due:
        noise = release_noise(config, site.root, runner.site.name, site.folder.parent.name, site.round,
                              weights_digest(flat), site.node.policy.dp_budget)
    summary = runner.summary_round(site.folder, flat, site.round, bool(instruction.get(R.EVALUATE)), prototypes_due,
                                   bool(instruction.get(R.FINAL)), noise)
    metrics = {R.NUM_EXAMPLES: len(runner.split.test), R.SITE_ID: runner.site_id}
    if summary.metrics is not None:
        metrics.update({k: v for k, v in summary.metrics.items() if k != "n"})
        metrics[R.ROC_TPR] = summary.roc_tpr
    return Message(content=R.reply_content(metrics, prototypes=summary.prototypes), reply_to=msg)


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    """A round's training from the weights of its summary (or those the message carries); replies with the
    trained shared weights and what the method's algorithm sends."""
    site = _setup(context, msg)
    runner = site.runner
    flat, bn = _training_weights(msg, site)
    weights, stats, sent = runner.train_round(site.folder, flat, bn, float(msg.content[R.CONFIG][R.LR]), site.round,
                                              _received_bank(msg, site), _received_payload(msg, site))
    prune_site_states(site.root, runner.site.name, site.node.policy.keep_runs)
    metrics = {R.NUM_EXAMPLES: len(runner.split.train), R.SITE_ID: runner.site_id, **stats}
    return Message(content=R.reply_content(metrics, weights=weights, payload=sent), reply_to=msg)
