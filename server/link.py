"""``fl-covid-superlink``: Flower's ``flower-superlink`` whose Fleet API accepts from a SuperNode only replies in its
own name (defence in depth under the end-to-end signatures of ``fl_covid.trust``).

Flower 1.42's Fleet API authenticates the node that calls it (signed headers, checked against the registered key
of ``request.node``) but stores the messages it pushes as they are: a message without ``reply_to`` becomes an
instruction to whatever node it names, and a reply may name another node as its sender. Here a push is refused
(HTTP 403, before anything is stored) unless every message in it is a reply whose ``src_node_id`` is the
authenticated node; the SuperLink itself then checks that the instruction it answers went to that node.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("fl-covid-superlink")


def refusal(authenticated: int, messages: list[tuple[int, str]]) -> str | None:
    """Why a push by node ``authenticated`` of messages (src_node_id, reply_to_message_id) must be refused."""
    for src, reply_to in messages:
        if src != authenticated:
            return f"node {authenticated} pushed a message in the name of node {src}"
        if not reply_to:
            return f"node {authenticated} pushed a message that answers no instruction (only the server instructs)"
    return None


def main() -> None:
    """Flower's ``flower-superlink`` with the sender check in front of the Fleet API's push handler."""
    from flwr.superlink.cli.flower_superlink import flower_superlink
    from flwr.superlink.servicer.fleet import fleet_handlers

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    push = getattr(fleet_handlers, "push_messages", None)
    if push is None:  # this Flower release routes pushes differently: fail closed
        sys.exit("fl-covid-superlink: this Flower version has no Fleet push handler to guard; refusing to run")

    def checked_push(request: Any, *args: object, **kwargs: object) -> Any:
        from fastapi import HTTPException, status

        reason = refusal(int(request.node.node_id), [(int(m.metadata.src_node_id), m.metadata.reply_to_message_id)
                                                    for m in request.messages_list])
        if reason:
            log.error("refused a Fleet push: %s", reason)
            raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="push refused: " + reason)
        return push(request, *args, **kwargs)

    fleet_handlers.push_messages = checked_push
    sys.argv[0] = "flower-superlink"
    flower_superlink()
