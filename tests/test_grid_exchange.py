"""server.grid_exchange.exchange: every reply handed over once, waits on a grid that can."""

import time

import pytest

from server import grid_exchange
from server.grid_exchange import exchange


class _Reply:
    def __init__(self, message_id: str) -> None:
        self.metadata = type("Metadata", (), {"reply_to_message_id": message_id})()


class _Grid:
    """Answers one pending message per pull; records waits."""

    def __init__(self, *, can_wait: bool) -> None:
        self.waits: list[float] = []
        if can_wait:
            self.wait_replies = self.waits.append

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        return [_Reply(sorted(ids)[0])] if ids else []


def _no_sleep(seconds):
    raise AssertionError(f"exchange slept {seconds} s although the grid can wait")


def test_a_grid_with_wait_replies_is_waited_on_not_polled(monkeypatch):
    monkeypatch.setattr(grid_exchange.time, "sleep", _no_sleep)
    grid, seen = _Grid(can_wait=True), []
    assert exchange(grid, ["a", "b", "c"], seen.append, timeout=5.0, poll_interval=0.01) == 0
    assert [r.metadata.reply_to_message_id for r in seen] == ["m0", "m1", "m2"]
    assert len(grid.waits) == 2 and all(0 < w <= 0.1 for w in grid.waits)


@pytest.mark.parametrize("can_wait", [False, True])
def test_unanswered_messages_are_counted_at_the_deadline(can_wait):
    grid = _Grid(can_wait=can_wait)
    grid.pull_messages = lambda ids: []
    start = time.monotonic()
    assert exchange(grid, ["a", "b"], lambda r: None, timeout=0.05, poll_interval=0.01) == 2
    assert time.monotonic() - start < 2.0
