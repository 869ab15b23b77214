"""The operator's end of end-to-end authentication (``fl_covid.trust``): every instruction signed for the site it
goes to, every reply verified against the key of the site its instruction went to.

Only nodes pinned to a site in the trust file get instructions: an instruction names its destination site, and a
registered node that is no site of the run receives nothing (not even the global weights).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Message, RecordDict

from fl_covid import records as R
from fl_covid.config import Config
from fl_covid.policy import ServerTrust
from fl_covid.trust import Instruction, NotTrusted, Reply, load_private_key, parse_public_key, sign, verify

log = logging.getLogger(__name__)


class Signing:
    """Signs the instructions of run ``run_id``, which works in the folders of run ``origin`` (itself, or the run it
    resumes), and verifies the replies."""

    def __init__(self, trust: ServerTrust, config: Config, run_id: int, origin: int) -> None:
        trust.check(config.sites)
        self.key = load_private_key(trust.signing_key)
        self.site_keys = {s: parse_public_key(trust.keys[s], f"key of site {s!r}") for s in config.sites}
        self.node_site = {trust.nodes[s]: s for s in config.sites}
        self.pins = {i: trust.nodes[s] for i, s in enumerate(config.sites)}  # site index -> node id
        self.run_id, self.origin = run_id, origin

    def sign(self, messages: Iterable[Message]) -> list[Message]:
        """The messages to sites, each with its own content and the operator's signature; messages to nodes that
        are no site of the run are dropped (logged)."""
        out = []
        for m in messages:
            site = self.node_site.get(m.metadata.dst_node_id)
            if site is None:
                log.warning("node %d is no site of this run (trust file): it gets no instruction",
                            m.metadata.dst_node_id)
                continue
            m.content = RecordDict({k: v for k, v in m.content.items() if k != R.SIGNATURE})  # one per message
            server_round = int(m.content[R.CONFIG][R.ROUND])
            statement = Instruction(self.run_id, self.origin, server_round, m.metadata.message_type, site,
                                    R.content_digest(m.content))
            m.content[R.SIGNATURE] = R.signature_record(sign(self.key, statement), self.origin)
            out.append(m)
        return out

    def check_reply(self, reply: Message, instruction: Message | None) -> str | None:
        """Why a reply must be rejected: it answers no instruction of this round, or it is not signed by the key of
        the site that instruction went to (a reply stored in another node's name, or altered on the way)."""
        if instruction is None:
            return "it answers no instruction of this round"
        site = self.node_site[instruction.metadata.dst_node_id]
        signature, _ = R.read_signature(reply.content)
        try:
            verify(self.site_keys[site], Reply(self.run_id, instruction.metadata.message_id, site,
                                               R.content_digest(reply.content)), signature)
        except NotTrusted as e:
            return f"not signed by site {site}'s key: {e}"
        return None
