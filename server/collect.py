"""Sending a round's messages and collecting each reply as soon as it arrives, one at a time.

Flower's ``Grid.send_and_receive`` sleeps 3 s between pulls in a deployment (``flwr-serverapp``'s grid) and pulls
every reply of a message in one call, which decodes them all: one corrupt reply raises there and takes the others
with it. ``send_and_collect`` pushes the messages, then pulls each outstanding reply by its own id at an interval
that starts at ``FIRST_POLL_S`` and grows by ``BACKOFF`` to ``LAST_POLL_S`` while nothing arrives (back to the
first after each reply). A reply waits on average half of ``LAST_POLL_S`` once a site trains longer than a few
polls; a pull of one message is one in-memory lookup in a simulation and one loopback call to the SuperLink in a
deployment, so 20 pulls per second and pending reply cost nothing measurable. A reply that cannot be pulled or decoded becomes an error reply of its site, which the
strategy counts as that site's failure for the round; the other replies still count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

FIRST_POLL_S = 0.005
LAST_POLL_S = 0.05
BACKOFF = 1.5


def send_and_collect(grid: Grid, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
    """Push ``messages`` and return the replies that arrived within ``timeout`` seconds (None: wait for all), in
    the order they arrived; a reply that failed to decode is returned as an error reply of its message."""
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    sent = {i: m for i, m in zip(ids, messages, strict=True) if i}
    pending = set(sent)
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    interval = FIRST_POLL_S
    while pending:
        arrived = False
        for message_id in sorted(pending):
            try:
                pulled = list(grid.pull_messages([message_id]))
            except Exception as e:  # noqa: BLE001 - a reply that cannot be decoded is its site's failure only
                log.warning("the reply to message %s could not be read: %s", message_id, type(e).__name__)
                pulled = [Message(Error(ErrorCode.MESSAGE_UNAVAILABLE, f"reply could not be decoded "
                                                                       f"({type(e).__name__})"),
                                  reply_to=sent[message_id])]
            for reply in pulled:
                if reply.metadata.reply_to_message_id in pending:
                    pending.discard(reply.metadata.reply_to_message_id)
                    replies.append(reply)
                    arrived = True
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        interval = FIRST_POLL_S if arrived else min(interval * BACKOFF, LAST_POLL_S)
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
    return replies
