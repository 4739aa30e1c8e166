"""The in-process simulation backend: a Flower ``Grid`` that hands messages to the ClientApp.

:class:`InProcessGrid` delivers each message straight to the ClientApp (inline or in a pool of
warm worker processes, see :mod:`simulations.workers`): no Ray, no link state, no polling.
The unchanged ``server.app:app`` drives it as it drives Flower's own ``InMemoryGrid``.

Virtual sites are kept as Flower's Simulation Engine keeps them (:class:`VirtualSites`): site
``p`` of ``n`` has node config ``{"partition-id": p, "num-partitions": n}``, the run's config,
and a persistent ``state`` carried from call to call. Only the contexts of sites that have
been contacted exist, and no model is kept for any site: memory is O(sites' states).

Canonical order (what makes results independent of timing, worker count and backend):

* ``get_node_ids()`` lists sites in partition order, so a strategy sampling with a seeded
  ``random`` picks the same partitions on every run and on both backends
  (:class:`simulations.ordering.CanonicalGrid` gives the Ray backend the same order, and
  both keep the sampling's ``random`` stream apart, see ``SamplingStream``);
* replies come back ordered by their site's partition id, never in arrival order, so a
  float sum over them is the same sum every time.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import sys
import time
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from threadpoolctl import threadpool_limits

from shared.wire import NUM_PARTITIONS, PARTITION_ID
from simulations.ordering import InOrderReplies, SamplingStream
from simulations.workers import SiteExecutor, SitePool, batch_scheduling

log = logging.getLogger("flwr.privfed.simulation")

#: Seconds a thread of the server may hold the GIL while another waits for it (Python's
#: default is 5 ms), while a run is in progress.
SWITCH_INTERVAL = 0.0005

#: Node id of partition ``p`` is ``NODE_ID_BASE + p`` (Flower reserves 0 and 1).
NODE_ID_BASE = 1000


class VirtualSites:
    """The ``num_sites`` virtual sites of one run and the contexts of those contacted."""

    def __init__(self, num_sites: int, run_id: int, run_config: Mapping[str, Any]) -> None:
        if num_sites < 1:
            raise ValueError(f"a simulation needs >= 1 site, got {num_sites}")
        self.num_sites, self.run_id = num_sites, run_id
        self._run_config = dict(run_config)
        self._contexts: dict[int, Context] = {}

    def node_ids(self) -> list[int]:
        """Every site's node id, in partition order."""
        return list(range(NODE_ID_BASE, NODE_ID_BASE + self.num_sites))

    def partition(self, node_id: int) -> int:
        """The partition id of ``node_id``.

        Raises:
            KeyError: no site has this node id.
        """
        pid = node_id - NODE_ID_BASE
        if not 0 <= pid < self.num_sites:
            raise KeyError(f"no virtual site has node id {node_id}")
        return pid

    def context(self, node_id: int) -> Context:
        """The site's context as it was after its last successful call (fresh if none)."""
        found = self._contexts.get(node_id)
        if found is not None:
            return found
        return Context(
            run_id=self.run_id,
            node_id=node_id,
            node_config={PARTITION_ID: self.partition(node_id), NUM_PARTITIONS: self.num_sites},
            state=RecordDict(),
            run_config=dict(self._run_config),
        )

    def update(self, node_id: int, context: Context) -> None:
        """Keep the context a successful call returned (Flower's ``update_context``)."""
        if context.run_config == self._run_config:  # share one copy, not one per site
            context.run_config = self._run_config
        self._contexts[node_id] = context

    @property
    def run_config(self) -> Mapping[str, Any]:
        return self._run_config

    def contacted(self) -> int:
        """How many sites have a stored context."""
        return len(self._contexts)


class InProcessGrid(Grid):
    """A ``Grid`` over :class:`VirtualSites` whose calls run on a :class:`SiteExecutor`."""

    def __init__(self, sites: VirtualSites, executor: SiteExecutor) -> None:
        self.sites, self.executor = sites, executor
        self._run: Run | None = None
        self._dst: dict[str, int] = {}  # message id -> destination node (unanswered)
        self._replies = InOrderReplies()
        self._sampling = SamplingStream(sites.run_config)
        # Message ids: unique per grid, uuid-sized; uuid4 asks the OS for 16 random bytes
        # per id (~0.1 ms a call on this VM, two ids per site call).
        prefix = secrets.token_hex(8)
        self._ids = (f"{prefix}{n:016x}" for n in itertools.count())

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        if self._run is None:
            raise RuntimeError("the grid has no run; call set_run first")
        return Run(**vars(self._run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # fmt: skip
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        self._sampling.before_sampling()
        return self.sites.node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Hand each message to its site; a message to an unknown node gets no id."""
        self._sampling.after_sampling()
        ids: list[str] = []
        for msg in messages:
            meta = msg.metadata
            if meta.reply_to_message_id or meta.ttl <= 0:
                raise ValueError(f"Invalid message: {msg}")
            try:
                context = self.sites.context(meta.dst_node_id)
            except KeyError as exc:
                log.error("message not delivered: %s", exc)
                continue
            msg_id = next(self._ids)
            meta.__dict__["_message_id"] = msg_id
            self._dst[msg_id] = meta.dst_node_id
            self._replies.expect(msg_id, self.sites.partition(meta.dst_node_id))
            self.executor.submit(msg_id, msg, context)
            ids.append(msg_id)
        self._collect(timeout=0)  # a pool sends the batch now, in one write
        return ids

    def _collect(self, timeout: float | None) -> None:
        for msg_id, reply, context in self.executor.wait(timeout):
            node_id = self._dst.pop(msg_id, None)
            if node_id is None:  # its sender stopped waiting (timed out)
                continue
            if context is not None:
                self.sites.update(node_id, context)
            reply.metadata.__dict__["_message_id"] = next(self._ids)
            self._replies.arrived(msg_id, reply)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies to ``message_ids`` that are in, released in partition order.

        A reply is released only once every requested message to a lower partition is
        answered, so replies come out in the same order however the calls interleave.
        """
        self._collect(timeout=0)
        return self._replies.release(message_ids, prefix=True)

    def wait_replies(self, timeout: float) -> None:
        """Block until at least one call finished or ``timeout`` seconds passed (then pull):
        for a caller that folds replies as they come, instead of sleeping between pulls."""
        self._collect(timeout=timeout)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:  # fmt: skip
        """Push ``messages``, wait for every reply (or ``timeout``); replies in partition order."""
        ids = list(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._replies.all_in(ids):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._collect(left)
        replies = self._replies.release(ids, prefix=False)
        for msg_id in self._replies.forget(ids):  # unanswered: late replies are dropped
            self._dst.pop(msg_id, None)
        return replies


def run_inprocess(
    flat_config: Mapping[str, Any],
    num_sites: int,
    executor: SiteExecutor,
    *,
    verbose: bool = False,
) -> None:
    """Run ``server.app:app`` over ``num_sites`` virtual sites of the ClientApp ``executor``
    runs (see :func:`simulations.workers.make_executor`; the caller closes it).

    The result is the same for any executor and any number of workers.
    """
    from server.app import app as server_app
    from simulations.runner import new_run

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    run = new_run(flat_config)
    sites = VirtualSites(num_sites, run.run_id, flat_config)
    # The server's own numeric work (central evaluation, reply checks, aggregation) runs
    # on one thread: the cores belong to the workers, and idle OpenMP/BLAS pools spinning
    # here would take them (measured: a 52k-element float64 dot product 12 ms vs 0.05 ms).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    limits = threadpool_limits(limits=1)
    # The server's other threads (checkpoint writer, progress display) take the GIL
    # whenever this one makes a system call (a write to the workers' pipe); by default it
    # gets it back only after 5 ms, and handing calls out waits for it (measured: 7 ms
    # between a round's first two calls).
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    policy = batch_scheduling() if isinstance(executor, SitePool) else nullcontext()
    try:
        grid = InProcessGrid(sites, executor)
        grid.set_run(run)
        context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                          run_config=dict(flat_config))  # fmt: skip
        with policy:
            server_app(grid=grid, context=context)
    finally:
        sys.setswitchinterval(switch)
        limits.restore_original_limits()
        torch.set_num_threads(threads)
