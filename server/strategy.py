"""The server's strategy: one of Flower's (FedAvg, FedProx, FedAdam, FedYogi, FedAvgM) with the sites' rules on top.

A round starts with a *summary* message (Flower's evaluate message type) carrying the global weights: every site
evaluates them when an evaluation is due and returns its prototypes in that network. The *train* message then
carries the cosine learning rate, the prototype bank and, instead of the same weights again, their digest.
``SitesMixin`` checks every reply inside one guard (anything malformed rejects that reply, never the run), pins
each node to one site, weights the average by what the server computes (never by what a site claims), and hands
one row per site and phase to ``on_row``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from fl_covid import records as R
from fl_covid.algorithms import algorithm_for
from fl_covid.config import Config
from fl_covid.engine import cosine_lr
from fl_covid.metrics import ROC_POINTS
from fl_covid.prototypes import PrototypeBank
from fl_covid.transport import SitesCopy, sends_differences, weights_digest
from fl_covid.validation import (
    check_bank,
    check_metrics,
    check_num_examples,
    check_update,
    max_prototype_rows,
    remote_text,
)
from server.signing import Signing

log = logging.getLogger(__name__)

Row = dict[str, float | int | str]


class NotEnoughSites(RuntimeError):
    """Fewer sites answered a round than the configured minimum."""


def _without_metrics(content: RecordDict) -> str | None:
    """Why a reply has no metric record (where its site id and example count must be)."""
    return None if isinstance(content.get(R.METRICS), MetricRecord) else "no metrics record"


def _unsound_metrics(metrics: MetricRecord, train: bool, evaluated: bool, final: bool = False) -> str | None:
    """Why a reply's metrics are not those of its kind (training; a summary, with an evaluation when one was asked
    for; the final evaluation with the site's operating point or, when its validation split cannot choose one,
    without), each a finite number, with a sound example count."""
    expected = R.TRAIN_REPLY_METRICS if train else R.SUMMARY_REPLY_METRICS + (R.EVALUATION_METRICS if evaluated
                                                                              else ())
    if evaluated and final and any(k in metrics for k in R.OPERATING_METRICS):
        expected += R.OPERATING_METRICS  # all of them
    return (check_metrics(metrics, expected, {R.ROC_TPR: ROC_POINTS} if evaluated else {})
            or check_num_examples(metrics[R.NUM_EXAMPLES]))


def _mean_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of scalar metrics over the accepted replies, without the site id and list-valued metrics."""
    mrs = [c[R.METRICS] for c in contents]
    weights = np.array([float(m[weight_key]) for m in mrs])
    keys = [k for k, v in mrs[0].items() if k not in (R.SITE_ID, weight_key) and isinstance(v, (int, float))]
    return MetricRecord({k: float(np.average([float(m[k]) for m in mrs], weights=weights)) for k in keys})


class SitesMixin:
    """What the federation adds to a Flower strategy; placed before it in the class's bases (``build_strategy``).

    Every node is sent every round (no sampling, so no randomness); replies are sorted by site id before Flower
    aggregates them, which makes aggregation deterministic.
    """

    def __init__(self, *, config: Config, run_name: str, size: int, proj_dim: int,
                 on_row: Callable[[str, Row], None] | None = None,
                 on_aggregated: Callable[[int, SitesMixin], None] | None = None, signing: Signing | None = None,
                 **flower: object) -> None:
        need = config.min_sites_required
        super().__init__(min_train_nodes=need, min_evaluate_nodes=need, min_available_nodes=need,  # type: ignore[call-arg]
                         arrayrecord_key=R.WEIGHTS, configrecord_key=R.CONFIG, weighted_by_key=R.WEIGHT,
                         train_metrics_aggr_fn=_mean_metrics, evaluate_metrics_aggr_fn=_mean_metrics, **flower)
        self.config, self.run_name = config, run_name
        self.size, self.proj_dim = size, proj_dim  # values in the flat shared weights; projection width
        self.bank = PrototypeBank.empty(proj_dim)
        self.algorithm = algorithm_for(config, size)  # the method's own payload and server state
        self.signing = signing  # deployment: instructions signed, replies verified (server/signing.py)
        pins = signing.pins if signing is not None else config.pinned_nodes  # the trust file's pins win
        self.site_of_node: dict[int, int] = {node: site for site, node in pins.items()}
        self.dataset_sizes: dict[int, int] = {}  # site id -> num-examples of its first accepted training reply
        self.sites_copy = SitesCopy(config.compression)  # the weights the sites hold and train from
        self.summary = (0, "")  # (round, digest of the weights as the sites hold them) of the last summary message
        self.sent: list[Message] = []  # messages of the last configure_* (the grid sets their ids on sending)
        self.on_row = on_row or (lambda kind, row: None)
        self.on_aggregated = on_aggregated or (lambda server_round, strategy: None)

    def lr_for(self, server_round: int) -> float:
        """The local learning rate of ``server_round``: cosine over the rounds from ``lr`` (Adam), or from
        ``sgd-lr`` for an algorithm that trains with SGD."""
        return cosine_lr(self.algorithm.base_lr, server_round - 1, self.config.num_server_rounds)

    def restore(self, bank: PrototypeBank, optimizer: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint's prototype bank and server optimizer state (resume)."""
        self.bank = bank
        for name in ("m_t", "v_t"):  # FedAdam / FedYogi: moments by array name
            moments = {k.split(".", 1)[1]: v.numpy() for k, v in optimizer.items() if k.startswith(f"{name}.")}
            if moments:
                setattr(self, name, moments)
        momentum = sorted((int(k.split(".", 1)[1]), v.numpy()) for k, v in optimizer.items()
                          if k.startswith("momentum_vector."))
        if momentum:  # FedAvgM: one array per array of the record, in order
            self.momentum_vector = [v for _, v in momentum]
        self.algorithm.restore({k.split(".", 1)[1]: v for k, v in optimizer.items() if k.startswith("algorithm.")})

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The server optimizer's state Flower keeps in the strategy and the method's algorithm's state (saved with
        every checkpoint)."""
        out = {f"{name}.{k}": torch.from_numpy(np.ascontiguousarray(v))
               for name in ("m_t", "v_t") for k, v in (getattr(self, name, None) or {}).items()}
        for i, v in enumerate(getattr(self, "momentum_vector", None) or []):
            out[f"momentum_vector.{i}"] = torch.from_numpy(np.ascontiguousarray(v))
        out.update({f"algorithm.{k}": v for k, v in self.algorithm.state().items()})
        return out

    # -- messages ------------------------------------------------------------------------------------------------

    def evaluation_due(self, server_round: int) -> bool:
        """Whether the weights after round ``server_round`` are evaluated: every ``eval-every`` rounds and after
        the last round."""
        return 1 <= server_round and (server_round % self.config.eval_every == 0
                                      or server_round == self.config.num_server_rounds)

    def summary_needed(self, server_round: int) -> bool:
        """Whether round ``server_round`` starts with a summary message: the prototypes are due (every
        ``prototype-every`` rounds), the weights of the round before are to be evaluated, or the weights travel
        as int8 differences (every round). BN statistics are re-estimated only there: training runs BN on batch
        statistics, only evaluation and prototypes use the running ones."""
        return (self.config.prototypes_due(server_round) or self.config.compression == "int8"
                or self.evaluation_due(server_round - 1))

    def _finish_messages(self, messages: Iterable[Message], weights: ArrayRecord | None, bank: bool,
                         payload: dict[str, np.ndarray] | None = None) -> list[Message]:
        """Set the (encoded) weights or remove them, attach the prototype bank and the method's own payload
        (``fl_covid.algorithms``); the same content for every site, signed in a deployment."""
        messages = list(messages)
        record = R.bank_to_record(self.bank) if bank and len(self.bank.vectors) else None
        extra = R.payload_record(payload) if payload else None
        for m in messages:
            m.content.pop(R.WEIGHTS, None)
            if weights is not None:
                m.content[R.WEIGHTS] = weights
            if record is not None:
                m.content[R.PROTOTYPES] = record
            if extra is not None:
                m.content[R.PAYLOAD] = extra
        if self.signing is not None:
            messages = self.signing.sign(messages)
        self.sent = messages
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        """The summary message at the start of round ``server_round`` (num-server-rounds + 1: the final one)."""
        final = server_round > self.config.num_server_rounds
        config[R.RUN_NAME], config[R.FINAL] = self.run_name, final
        config[R.EVALUATE] = self.evaluation_due(server_round - 1)
        config[R.PROTOTYPES_DUE] = self.config.prototypes_due(server_round)
        flat = arrays[R.FLAT].numpy().astype(np.float32)  # server optimizers may hand back float64
        transfer, base = self.sites_copy.summary(flat)
        if base is not None:  # int8: the change since the copy the sites hold, with this digest
            config[R.BASE] = base
        self.summary = (server_round, weights_digest(self.sites_copy.held))
        messages = super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]
        return self._finish_messages(messages, R.transfer_record(transfer), bank=False)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        """The train message: lr, run name, prototype bank, and the weights (or their digest after a summary)."""
        config[R.LR], config[R.RUN_NAME] = self.lr_for(server_round), self.run_name
        flat = arrays[R.FLAT].numpy().astype(np.float32)  # FedOpt keeps what it sent: float32
        arrays = R.weights_record(flat)
        summarised = self.summary[0] == server_round
        if summarised:  # the sites train from the summary's weights, named by their digest
            config[R.DIGEST] = self.summary[1]
        transfer = self.sites_copy.train(None if summarised else flat)
        messages = super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]
        weights = R.transfer_record(transfer) if transfer is not None else None
        return self._finish_messages(messages, weights, bank=self.config.spec.prototypes,
                                     payload=self.algorithm.server_payload())

    # -- replies -------------------------------------------------------------------------------------------------

    def _site_of(self, msg: Message) -> str:
        """The site a reply comes from, for logs: the node's pinned site, else as the reply claims. An error the
        SuperLink returns on a node's behalf (node unavailable, message expired) names the node it was for."""
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent}
        node = sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        site = self.site_of_node.get(node)
        if site is None and msg.has_content() and isinstance(msg.content.get(R.METRICS), MetricRecord):
            claimed = msg.content[R.METRICS].get(R.SITE_ID)
            if isinstance(claimed, int) and 0 <= claimed < len(self.config.sites):
                site = claimed
        return f"{self.config.sites[site] if site is not None else 'unknown'} (node {node})"

    def _verdict(self, msg: Message, server_round: int, train: bool, evaluated: bool = False
                 ) -> tuple[str | None, dict]:
        """(why the reply must be rejected or None, what was decoded: weights and payload, or prototypes). The
        identity and the records are judged before anything is decoded."""
        if msg.has_error():
            return f"failed: {remote_text(msg.error.reason)}", {}
        content = msg.content
        prototypes = not train and self.config.prototypes_due(server_round)
        final = not train and server_round > self.config.num_server_rounds
        if reason := (self._unsigned(msg) or _without_metrics(content) or self._not_its_site(msg)
                      or self._unexpected_records(content, train, prototypes)
                      or _unsound_metrics(content[R.METRICS], train, evaluated, final)):
            return reason, {}
        if train:
            return self._decoded_training(content)
        if prototypes:
            return self._decoded_prototypes(content)
        return None, {}

    def _unsigned(self, msg: Message) -> str | None:
        """Why a deployment's reply is not the signed answer of the site to the instruction it names."""
        if self.signing is None:
            return None
        instruction = next((m for m in self.sent if m.metadata.message_id == msg.metadata.reply_to_message_id), None)
        return self.signing.check_reply(msg, instruction)

    def _not_its_site(self, msg: Message) -> str | None:
        """Why the site id a reply claims is not its node's: out of range, another site than the node is pinned
        to, or the site of another node."""
        site_id = msg.content[R.METRICS].get(R.SITE_ID)
        if not isinstance(site_id, int) or isinstance(site_id, bool) or not 0 <= site_id < len(self.config.sites):
            return f"site-id {remote_text(site_id)} is not one of 0..{len(self.config.sites) - 1}"
        node = msg.metadata.src_node_id
        pinned = self.site_of_node.get(node)
        if pinned is not None and pinned != site_id:
            return f"node {node} is site {self.config.sites[pinned]} but claims site-id {site_id}"
        if pinned is None and site_id in self.site_of_node.values():
            return f"site-id {site_id} belongs to another node"
        return None

    def _unexpected_records(self, content: RecordDict, train: bool, prototypes: bool) -> str | None:
        """Why a reply holds records other than those of its kind (metrics; weights and the method's payload after
        training; prototypes when due; the signature in a deployment)."""
        allowed = {R.METRICS} | ({R.WEIGHTS} if train else set()) | ({R.PROTOTYPES} if prototypes else set()) | (
            {R.SIGNATURE} if self.signing is not None else set()) | (
            {R.PAYLOAD} if train and self.algorithm.site_sends else set())
        if unexpected := set(content.keys()) - allowed:
            return f"unexpected records {[remote_text(k) for k in sorted(unexpected)][:3]} (allowed: {sorted(allowed)})"
        return None

    def _decoded_training(self, content: RecordDict) -> tuple[str | None, dict]:
        """A training reply's weights (float32 (N,), whatever the transfer) and the method's payload, or why they
        are rejected: a dataset size that changed within the run, a missing or malformed record, NaN or Inf, an
        update beyond max-update-norm."""
        metrics = content[R.METRICS]
        known = self.dataset_sizes.get(int(metrics[R.SITE_ID]))
        if known is not None and known != metrics[R.NUM_EXAMPLES]:
            return f"num-examples changed from {known} to {metrics[R.NUM_EXAMPLES]} within the run", {}
        if R.WEIGHTS not in content:
            return "no weights record", {}
        compression = self.config.compression
        try:
            flat = self.sites_copy.reply(R.read_transfer(content[R.WEIGHTS], self.size, compression,
                                                         difference=sends_differences(compression)))
        except ValueError as e:
            return str(e), {}
        if reason := check_update(flat, self.config.max_update_norm, self.sites_copy.trained_from):
            return reason, {}
        if not self.algorithm.site_sends:
            return None, {"weights": flat}
        try:
            payload = R.read_payload(content.get(R.PAYLOAD), self.algorithm.site_sends, self.size)
        except ValueError as e:
            return str(e), {}
        return None, {"weights": flat, "payload": payload}

    def _decoded_prototypes(self, content: RecordDict) -> tuple[str | None, dict]:
        """A summary reply's prototypes, or why they are rejected: a missing or malformed record, rows that fail
        ``check_bank``, rows of another site than the reply's."""
        if R.PROTOTYPES not in content:
            return "no prototypes record", {}
        rows = max_prototype_rows(self.config)
        try:
            bank = R.read_bank(content[R.PROTOTYPES], self.proj_dim, rows)
        except ValueError as e:
            return str(e), {}
        if reason := check_bank(bank, self.config, self.proj_dim, rows):
            return reason, {}
        site_id = int(content[R.METRICS][R.SITE_ID])
        if bank.sites.ne(site_id).any():
            return f"prototype record must hold prototypes of site-id {site_id} only", {}
        return None, {"bank": bank}

    def _accepted(self, server_round: int, replies: Iterable[Message], train: bool, evaluated: bool = False
                  ) -> list[tuple[Message, dict]]:
        """Replies that carry no error and pass every check, with what was decoded, sorted by site id; the rest
        are logged by site. Any exception while judging a reply rejects that reply only."""
        good: list[tuple[Message, dict]] = []
        replies = list(replies)
        what = "training" if train else "summary"
        answered = {msg.metadata.reply_to_message_id for msg in replies}
        for m in self.sent:
            if m.metadata.message_id not in answered:
                node = m.metadata.dst_node_id
                site = self.site_of_node.get(node)
                log.warning("round %d: site %s did not answer %s in time (config key round-timeout)", server_round,
                            f"{self.config.sites[site] if site is not None else 'unknown'} (node {node})", what)
        for msg in replies:
            try:
                reason, decoded = self._verdict(msg, server_round, train, evaluated)
                site_id = None if reason else int(msg.content[R.METRICS][R.SITE_ID])
                if site_id is not None and site_id in {int(g.content[R.METRICS][R.SITE_ID]) for g, _ in good}:
                    reason = f"site-id {site_id} has already answered this round"
            except Exception as e:  # noqa: BLE001 - whatever a reply holds, it can only get itself rejected
                reason, site_id = f"malformed reply ({type(e).__name__})", None
            if reason or site_id is None:
                log.warning("round %d: rejected %s reply of site %s: %s", server_round, what, self._site_of(msg),
                            reason)
                continue
            self.site_of_node[msg.metadata.src_node_id] = site_id
            if train:
                self.dataset_sizes.setdefault(site_id, int(msg.content[R.METRICS][R.NUM_EXAMPLES]))
            good.append((msg, decoded))
        good.sort(key=lambda g: int(g[0].content[R.METRICS][R.SITE_ID]))
        if len(good) < self.config.min_sites_required:
            raise NotEnoughSites(f"round {server_round}: only {len(good)} site(s) answered {what} soundly, at least "
                                 f"{self.config.min_sites_required} are required (config key min-sites)")
        return good

    def _weight(self, site_id: int) -> float:
        """A site's weight in the average, computed by the server (config key fedavg-weights)."""
        if self.config.fedavg_weights == "dataset":
            return float(self.dataset_sizes[site_id])
        return float(self.config.local_steps * self.config.batch_size)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = self._accepted(server_round, replies, train=True)
        for msg, decoded in good:
            metrics = msg.content[R.METRICS]
            self.on_row("train", self._row(server_round, metrics))
            metrics[R.WEIGHT] = self._weight(int(metrics[R.SITE_ID]))
            msg.content[R.WEIGHTS] = R.weights_record(decoded["weights"])  # float32, whatever the transfer
            msg.content.pop(R.PAYLOAD, None)  # Flower averages every array record: the algorithm takes its own
        if self.algorithm.site_sends:
            self.algorithm.server_update({int(m.content[R.METRICS][R.SITE_ID]): d["payload"] for m, d in good})
        result = super().aggregate_train(server_round, [m for m, _ in good])  # type: ignore[misc]
        self.on_aggregated(server_round, self)
        return result

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The summary replies at the start of ``server_round``: evaluation rows of the weights after round
        ``server_round - 1`` (when asked for) and the prototypes of the round's bank."""
        evaluated = self.evaluation_due(server_round - 1)
        good = self._accepted(server_round, replies, train=False, evaluated=evaluated)
        for msg, decoded in good:
            if evaluated:
                self.on_row("evaluate", self._row(server_round - 1, msg.content[R.METRICS]))
            if "bank" in decoded:  # sites that did not answer keep their last prototypes
                self.bank = self.bank.merge(decoded["bank"])
            msg.content.pop(R.PROTOTYPES, None)
            for key in R.OPERATING_METRICS:  # each site's own, not averaged (and not every site may have one)
                msg.content[R.METRICS].pop(key, None)
            msg.content[R.METRICS][R.WEIGHT] = 1.0  # the logged mean of the sites' metrics is unweighted
        return super().aggregate_evaluate(server_round, [m for m, _ in good])  # type: ignore[misc]

    def _row(self, server_round: int, metrics: MetricRecord) -> Row:
        site_id = int(metrics[R.SITE_ID])
        return {"round": server_round, "site": self.config.sites[site_id], "site_id": site_id,
                **{k: v for k, v in metrics.items() if k != R.SITE_ID}}


def build_strategy(config: Config, run_name: str, size: int, proj_dim: int,
                   on_row: Callable[[str, Row], None] | None = None,
                   on_aggregated: Callable[[int, SitesMixin], None] | None = None,
                   signing: Signing | None = None) -> SitesMixin:
    """The strategy of ``config.method``: Flower's FedProx when the method has a proximal term, else the Flower
    strategy of its server optimizer (FedAvgM without momentum for a FedAvg method with ``server-lr`` other than 1),
    with ``SitesMixin`` on top."""
    spec = config.spec
    base: type
    extra: dict[str, object] = {}
    if spec.proximal:
        base, extra = FedProx, {"proximal_mu": config.proximal_mu}
    elif spec.server_optimizer in ("fedadam", "fedyogi"):
        base = FedAdam if spec.server_optimizer == "fedadam" else FedYogi
        extra = {"eta": config.effective_server_lr, "eta_l": config.lr, "beta_1": config.server_momentum, "tau": config.server_tau}
    elif spec.server_optimizer == "fedavgm" or config.effective_server_lr != 1.0:  # a FedAvg step other than 1:
        momentum = config.server_momentum if spec.server_optimizer == "fedavgm" else 0.0  # FedAvgM, no momentum
        base, extra = FedAvgM, {"server_learning_rate": config.effective_server_lr, "server_momentum": momentum}
    else:
        base = FedAvg
    cls = type(f"Sites{base.__name__}", (SitesMixin, base), {})
    return cls(config=config, run_name=run_name, size=size, proj_dim=proj_dim, on_row=on_row,
               on_aggregated=on_aggregated, signing=signing, **extra)
