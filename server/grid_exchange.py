"""One round trip over a Flower ``Grid`` that hands each reply over as it arrives.

``Grid.send_and_receive`` returns only when every reply is in (Flower's ``InMemoryGrid``
collects them in a list), so a caller that must fold replies into an accumulator would hold
all of them at once. :func:`exchange` pushes the messages, then pulls and calls ``on_reply``
for every reply the moment it is pulled; the caller keeps nothing but what ``on_reply`` keeps.
Between pulls it blocks on the grid's ``wait_replies(timeout)`` where the grid has one (the
in-process grid returns as soon as a site call finishes), else it sleeps ``poll_interval``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from flwr.app import Message
from flwr.serverapp import Grid


def exchange(
    grid: Grid,
    messages: Sequence[Message],
    on_reply: Callable[[Message], None],
    *,
    timeout: float,
    poll_interval: float = 0.01,
) -> int:
    """Push ``messages``; call ``on_reply(reply)`` per reply as it arrives.

    Returns:
        The number of messages still unanswered after ``timeout`` seconds (those sites
        count as dropped; their late replies are never read).
    """
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    wait = getattr(grid, "wait_replies", None)  # in process: block on the workers, no poll
    while pending:
        for reply in grid.pull_messages(tuple(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            on_reply(reply)
        if not pending or time.monotonic() >= deadline:
            break
        if wait is not None:
            wait(min(poll_interval * 10, max(0.0, deadline - time.monotonic())))
        else:
            time.sleep(poll_interval)
    return len(pending)
