"""Canonical order of sites and replies, so a simulation's result never depends on timing.

Flower's FedAvg samples ``random.sample(list(grid.get_node_ids()), k)`` and sums the replies
in the order the grid returns them; float sums depend on that order. Both simulation backends
therefore list nodes in partition order and return replies ordered by the partition of the
site that sent them:

* :class:`InOrderReplies`: the bookkeeping both grids use;
* :class:`SamplingStream`: the strategy's draws from Python's global ``random`` start from
  ``federation.seed`` and continue from where the ServerApp left them, whatever other threads
  of the process draw in between (Ray's driver threads do);
* :class:`CanonicalGrid`: wraps the ``InMemoryGrid`` of Flower's Simulation Engine (Ray
  backend); :func:`canonical_server_app` hands it to the unchanged ServerApp.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run


class SamplingStream:
    """Python's global ``random`` as the ServerApp's node sampling sees it.

    Flower's strategies call ``grid.get_node_ids()`` and then draw with the process-wide
    ``random``. A grid calls :meth:`before_sampling` from ``get_node_ids`` and
    :meth:`after_sampling` when messages are next pushed: the first sampling starts from
    ``random.seed(federation.seed)`` and each later one from the state the previous one
    left, so draws by other threads in between (Ray's pubsub ids, a data generator that
    reseeds) do not move it. The ServerApp's own ``random.seed`` is the same seed.
    """

    def __init__(self, run_config: Mapping[str, Any]) -> None:
        self._seed = int(run_config.get("federation.seed", 0))
        self._state: Any = None
        self._open = False  # get_node_ids was called since the last push

    def before_sampling(self) -> None:
        if self._state is None:
            random.seed(self._seed)
        else:
            random.setstate(self._state)
        self._open = True

    def after_sampling(self) -> None:
        if self._open:
            self._state = random.getstate()
            self._open = False


class InOrderReplies:
    """Replies awaited by message id, each ranked by (its site's partition, push order)."""

    def __init__(self) -> None:
        self._rank: dict[str, tuple[int, int]] = {}
        self._arrived: dict[str, Message] = {}
        self._pushed = 0

    def expect(self, msg_id: str, partition: int) -> None:
        self._rank[msg_id] = (partition, self._pushed)
        self._pushed += 1

    def arrived(self, msg_id: str, reply: Message) -> None:
        if msg_id in self._rank:
            self._arrived[msg_id] = reply

    def all_in(self, ids: Iterable[str]) -> bool:
        return all(i in self._arrived or i not in self._rank for i in ids)

    def release(self, ids: Iterable[str], *, prefix: bool) -> list[Message]:
        """Hand out the arrived replies to ``ids`` in rank order.

        With ``prefix`` stop at the first unanswered one, so that replies come out in rank
        order across calls too (a caller that folds them as they come sees one order).
        """
        out: list[Message] = []
        for msg_id in sorted((i for i in set(ids) if i in self._rank), key=self._rank.__getitem__):
            reply = self._arrived.pop(msg_id, None)
            if reply is None:
                if prefix:
                    break
                continue
            del self._rank[msg_id]
            out.append(reply)
        return out

    def forget(self, ids: Iterable[str]) -> list[str]:
        """Stop waiting for ``ids``; return those that were never answered."""
        gone = [i for i in ids if i in self._rank]
        for msg_id in gone:
            del self._rank[msg_id]
            self._arrived.pop(msg_id, None)
        return gone


class CanonicalGrid(Grid):
    """Flower's ``InMemoryGrid`` with nodes in partition order and replies sorted by it.

    The Simulation Engine registers site ``p`` as the ``p``-th node of its in-memory link
    state (flwr 1.41 ``vce_api._register_nodes``), with a random node id; the link state keeps
    nodes in registration order, which is how a node's partition is known here. Without that
    (another link state) nodes and replies are ordered by node id: still one order per run,
    but not the in-process backend's.
    """

    def __init__(self, inner: Grid, run_config: Mapping[str, Any]) -> None:
        self.inner = inner
        self._replies = InOrderReplies()
        self._sampling = SamplingStream(run_config)

    def _ranks(self) -> dict[int, int]:
        nodes = getattr(getattr(self.inner, "state", None), "nodes", None)
        order = list(nodes) if isinstance(nodes, dict) else sorted(self.inner.get_node_ids())
        return {node_id: i for i, node_id in enumerate(order)}

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # fmt: skip
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        ranks = self._ranks()
        nodes = sorted(self.inner.get_node_ids(), key=lambda n: ranks.get(n, n))
        self._sampling.before_sampling()
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._sampling.after_sampling()
        messages = list(messages)
        ids = list(self.inner.push_messages(messages))
        ranks, pushed = self._ranks(), set(ids)
        for msg in messages:
            if msg.metadata.message_id in pushed:
                dst = msg.metadata.dst_node_id
                self._replies.expect(msg.metadata.message_id, ranks.get(dst, dst))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        for reply in self.inner.pull_messages(message_ids):
            self._replies.arrived(reply.metadata.reply_to_message_id, reply)
        return self._replies.release(message_ids, prefix=True)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:  # fmt: skip
        self._sampling.after_sampling()
        messages = list(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        ranks = self._ranks()
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}

        def rank(reply: Message) -> int:
            node = dst.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            return ranks.get(node, node)

        return sorted(replies, key=rank)


def canonical_server_app(app: ServerApp) -> ServerApp:
    """A ServerApp that runs ``app`` unchanged over a :class:`CanonicalGrid`."""
    outer = ServerApp()

    @outer.main()
    def _main(grid: Grid, context: Context) -> None:
        app(grid=CanonicalGrid(grid, context.run_config), context=context)

    return outer

