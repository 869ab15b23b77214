"""FedAvg with a prototype bank, a cosine learning rate per round, reply validation and per-site logging."""

from __future__ import annotations

import logging
import random
from typing import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_covid import records as R
from fl_covid.engine import cosine_lr
from fl_covid.metrics import ROC_POINTS
from fl_covid.prototypes import PrototypeBank
from fl_covid.validation import check_metrics, check_num_examples, check_prototypes, check_update

log = logging.getLogger(__name__)

Row = dict[str, float | int | str]


class NotEnoughSites(RuntimeError):
    """Fewer sites answered a round than the configured minimum."""


def _mean_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of scalar metrics, without the site id and list-valued metrics."""
    mrs = [c[R.METRICS] for c in contents]
    weights = np.array([float(m[weight_key]) for m in mrs])
    keys = [k for k, v in mrs[0].items() if k not in (R.SITE_ID, weight_key) and isinstance(v, (int, float))]
    out = {k: float(np.average([float(m[k]) for m in mrs], weights=weights)) for k in keys}
    return MetricRecord({**out, weight_key: int(weights.sum())})


class PrototypeFedAvg(FedAvg):
    """FedAvg over the shared weights of every site, plus the cross-site prototype exchange (SPEC section 4).

    Sends the bank of prototypes with each train message (``fedbn-proto``), takes the sites' prototypes out of
    their replies before averaging, rejects unsound replies, sorts replies by site id so that aggregation is
    deterministic, and hands one row per site and round to ``on_row``.
    """

    def __init__(self, *, method: str, site_names: tuple[str, ...], lr: float, num_rounds: int, seed: int,
                 run_name: str, expected: dict[str, tuple[tuple[int, ...], np.dtype]], min_sites: int,
                 proj_dim: int = 128, max_update_norm: float = 0.0, compression: str = "none", weight_key: str = R.NUM_EXAMPLES,
                 on_row: Callable[[str, Row], None] | None = None) -> None:
        super().__init__(min_train_nodes=min_sites, min_evaluate_nodes=min_sites, min_available_nodes=min_sites,
                         arrayrecord_key=R.WEIGHTS, configrecord_key=R.CONFIG, weighted_by_key=R.NUM_EXAMPLES,
                         train_metrics_aggr_fn=_mean_metrics, evaluate_metrics_aggr_fn=_mean_metrics)
        self.train_weight_key = weight_key  # what FedAvg weights the shared weights by (config fedavg-weights)
        self.method, self.site_names, self.lr, self.num_rounds = method, site_names, lr, num_rounds
        self.seed, self.run_name, self.expected, self.min_sites = seed, run_name, expected, min_sites
        self.proj_dim, self.max_update_norm = proj_dim, max_update_norm
        self.compression = compression  # encoding of the weights sent to sites (config key 'compression')
        self.reference: dict[str, np.ndarray] | None = None  # weights sent this round, for max_update_norm
        self.bank = PrototypeBank.empty(proj_dim)
        self.node_sites: dict[int, str] = {}
        self.sent: list[Message] = []  # the messages of the last configure_* (the grid sets their ids on sending)
        self.on_row = on_row or (lambda kind, row: None)

    def lr_for(self, server_round: int) -> float:
        return cosine_lr(self.lr, server_round - 1, self.num_rounds)

    def _messages(self, server_round: int, make: Callable[[], Iterable[Message]], config: ConfigRecord,
                  extra: RecordDict | None = None) -> list[Message]:
        random.seed(self.seed * 100_003 + server_round)  # Flower samples nodes with Python's random
        config[R.RUN_NAME] = self.run_name
        messages = list(make())
        for m in messages:
            for key, rec in (extra or {}).items():
                m.content[key] = rec
        self.sent = messages
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        config[R.LR] = self.lr_for(server_round)
        self.reference = {k: v.numpy() for k, v in arrays.items()} if self.max_update_norm > 0 else None
        arrays = R.encode_record(arrays, self.compression)
        extra = RecordDict()
        if self.method == "fedbn-proto" and len(self.bank.vectors):
            extra[R.PROTOTYPES] = R.bank_to_record(self.bank)
        return self._messages(server_round, lambda: super(PrototypeFedAvg, self).configure_train(
            server_round, arrays, config, grid), config, extra)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        arrays = R.encode_record(arrays, self.compression)
        return self._messages(server_round, lambda: super(PrototypeFedAvg, self).configure_evaluate(
            server_round, arrays, config, grid), config)

    def _site_of(self, msg: Message) -> str:
        """The site a reply comes from, for logs: known from earlier rounds, else as the reply claims. An error
        the SuperLink returns on a node's behalf (node unavailable, message expired) names the node it was for."""
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent}
        node = sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        name = self.node_sites.get(node)
        if name is None and msg.has_content() and R.METRICS in msg.content:
            claimed = msg.content[R.METRICS].get(R.SITE_ID)
            if isinstance(claimed, int) and 0 <= claimed < len(self.site_names):
                name = self.site_names[claimed]
        return f"{name or 'unknown'} (node {node})"

    def _accepted(self, server_round: int, replies: Iterable[Message], train: bool) -> list[Message]:
        """Replies that carry no error and pass validation, sorted by site id; the rest are logged by site."""
        good: list[Message] = []
        replies = list(replies)
        answered = {msg.metadata.reply_to_message_id for msg in replies}
        for m in self.sent:
            if m.metadata.message_id not in answered:
                node = m.metadata.dst_node_id
                log.warning("round %d: site %s did not answer %s in time (config key round-timeout)", server_round,
                            f"{self.node_sites.get(node, 'unknown')} (node {node})",
                            "training" if train else "evaluation")
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: site %s failed: %s", server_round, self._site_of(msg), msg.error.reason)
                continue
            if train:
                self._decode(msg.content)
            reason = self._problem(msg.content, train)
            if not reason and msg.content[R.METRICS][R.SITE_ID] in {g.content[R.METRICS][R.SITE_ID] for g in good}:
                reason = f"site-id {msg.content[R.METRICS][R.SITE_ID]} has already answered this round"
            if reason:
                log.warning("round %d: rejected reply of site %s: %s", server_round, self._site_of(msg), reason)
                continue
            site_id = int(msg.content[R.METRICS][R.SITE_ID])
            self.node_sites[msg.metadata.src_node_id] = self.site_names[site_id]
            good.append(msg)
        good.sort(key=lambda m: int(m.content[R.METRICS][R.SITE_ID]))
        if len(good) < self.min_sites:
            raise NotEnoughSites(f"round {server_round}: only {len(good)} site(s) answered "
                                 f"{'training' if train else 'evaluation'} soundly, at least {self.min_sites} "
                                 "are required (config key min-sites)")
        return good

    @staticmethod
    def _decode(content: RecordDict) -> None:
        """Replace a reply's weights (float16 under compression=fp16) by float32, once, before the checks and the
        averaging: FedAvg would otherwise accumulate the weighted sum in float16."""
        if R.WEIGHTS in content and isinstance(content[R.WEIGHTS], ArrayRecord):
            content[R.WEIGHTS] = R.decode_record(content[R.WEIGHTS])

    def _problem(self, content: RecordDict, train: bool) -> str | None:
        if R.METRICS not in content or not isinstance(content[R.METRICS], MetricRecord):
            return "no metrics record"
        metrics = content[R.METRICS]
        site_id = metrics.get(R.SITE_ID)
        if not isinstance(site_id, int) or not 0 <= site_id < len(self.site_names):
            return f"site-id {site_id!r} is not one of 0..{len(self.site_names) - 1}"
        allowed = {R.METRICS}
        if train:
            allowed |= {R.WEIGHTS, R.PROTOTYPES} if self.method == "fedbn-proto" else {R.WEIGHTS}
        if unexpected := set(content.keys()) - allowed:
            return f"unexpected records {sorted(unexpected)} (allowed: {sorted(allowed)})"
        if reason := check_metrics(metrics, R.TRAIN_REPLY_METRICS if train else R.EVALUATE_REPLY_METRICS,
                                   {} if train else {R.ROC_TPR: ROC_POINTS}):
            return reason
        if not train:
            return check_num_examples(metrics[R.NUM_EXAMPLES])
        if R.WEIGHTS not in content or not isinstance(content[R.WEIGHTS], ArrayRecord):
            return "no weights record"
        received = {k: v.numpy() for k, v in content[R.WEIGHTS].items()}
        if reason := check_update(self.expected, received, metrics.get(R.NUM_EXAMPLES), self.max_update_norm,
                                  self.reference):
            return reason
        if self.method == "fedbn-proto":
            if R.PROTOTYPES not in content:
                return "no prototypes record"
            try:
                bank = R.bank_from_record(content[R.PROTOTYPES])
            except ValueError as e:
                return str(e)
            if reason := check_prototypes(bank.vectors.numpy(), bank.counts.numpy(), self.proj_dim):
                return reason
            if bank.labels.tolist() != list(range(len(bank.labels))) or bank.sites.ne(site_id).any():
                return f"prototype record must hold classes 0..{len(bank.labels) - 1} of site-id {site_id}"
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = self._accepted(server_round, replies, train=True)
        new_protos = {}
        for msg in good:
            if R.PROTOTYPES in msg.content:
                bank = R.bank_from_record(msg.content.pop(R.PROTOTYPES))
                new_protos[int(msg.content[R.METRICS][R.SITE_ID])] = (bank.vectors, bank.counts)
            self.on_row("train", self._row(server_round, msg.content[R.METRICS]))
        if new_protos:  # sites that did not answer keep their last prototypes
            kept = {int(s): (self.bank.vectors[self.bank.sites == s], self.bank.counts[self.bank.sites == s])
                    for s in self.bank.sites.unique().tolist()}
            self.bank = PrototypeBank.from_sites({**kept, **new_protos})
        self.weighted_by_key = self.train_weight_key
        try:
            return super().aggregate_train(server_round, good)
        finally:
            self.weighted_by_key = R.NUM_EXAMPLES

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = self._accepted(server_round, replies, train=False)
        for msg in good:
            self.on_row("evaluate", self._row(server_round, msg.content[R.METRICS]))
        return super().aggregate_evaluate(server_round, good)

    def _row(self, server_round: int, metrics: MetricRecord) -> Row:
        site_id = int(metrics[R.SITE_ID])
        return {"round": server_round, "site": self.site_names[site_id], "site_id": site_id,
                **{k: v for k, v in metrics.items() if k != R.SITE_ID}}
