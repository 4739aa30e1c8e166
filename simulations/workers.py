"""Where a simulation's ClientApp calls run: inline, or in a pool of warm worker processes.

One call is what a Flower SuperNode does with one message: ``reply = app(message, context)``,
an exception becoming an error reply (the reason worded as Flower's Simulation Engine words
it), the context kept only when the call succeeds. Guarantees:

* A call is a pure function of ``(message, context)``: it runs with one torch thread (as a
  Ray actor with one CPU does) and starts from global RNG states (``random``, numpy, torch)
  seeded from (run seed, partition, round, message type); inline, the caller's RNG states
  are restored afterwards. So its result does not depend on which worker ran it, on what that
  worker ran before, or on the number of workers.
* Workers start with the ClientApp imported and warmed up (on Linux they are forked from
  this process after it imported the app, before any other thread starts; elsewhere
  spawned) and live for the whole run, so whatever the app caches per process (data sets,
  site partitions) stays warm between rounds. They hold no model between calls and no site
  state: contexts travel with each call.
* A worker that dies mid-call (segfault, out of memory, ``os._exit``) answers that call
  with an error reply naming the exit code and is replaced by a freshly spawned one; the
  run goes on. A worker that cannot load the ClientApp stops the run
  (:class:`WorkerStartError`).
"""

from __future__ import annotations

import gc
import importlib
import logging
import math
import multiprocessing as mp
import os
import pickle
import random
import select
import time
import zlib
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import Context, Error, Message
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import ErrorCode
from threadpoolctl import threadpool_limits

from shared.training import seed_torch
from shared.wire import PARTITION_ID
from simulations.callqueue import CallQueue, CallReader, widen

#: The ClientApp a simulation runs (``[tool.flwr.app.components] clientapp``).
CLIENT_APP = "client.app:app"

#: What a finished call yields: (task id, reply, the updated context or None on failure).
Done = tuple[str, Message, Context | None]

ClientAppFn = Callable[[Message, Context], Message]


def default_workers() -> int:
    """The CPU cores this process may use (the default ``--workers``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def load_app(ref: str) -> ClientAppFn:
    """``"module:attribute"`` to the object it names."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def warm_up() -> None:
    """Do once per process what a first training call would otherwise pay for (torch
    imports its compiler stack the first time an optimizer is built: ~1.5 s)."""
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def call_seed(message: Message, context: Context) -> int:
    """The seed of a call's global RNGs: (run seed, partition, round, message type)."""
    seed = int(context.run_config.get("federation.seed", 0))  # type: ignore[call-overload]
    site = int(context.node_config.get(PARTITION_ID, context.node_id))  # type: ignore[call-overload]
    meta = message.metadata
    words = [seed & 0xFFFFFFFF, site, zlib.crc32(meta.group_id.encode()),
             zlib.crc32(meta.message_type.encode())]  # fmt: skip
    return int(np.random.SeedSequence(words).generate_state(1)[0])


@contextmanager
def _isolated(seed: int, *, restore: bool = True):  # type: ignore[no-untyped-def]
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    threads = torch.get_num_threads()
    random.seed(seed)
    np.random.seed(seed)
    seed_torch(seed)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


@contextmanager
def batch_scheduling():  # type: ignore[no-untyped-def]
    """Run the calling thread (and threads it starts meanwhile) under Linux's SCHED_BATCH,
    then put its policy back; elsewhere, or if refused, change nothing.

    For a pool's parent: it wakes once per reply, and a normal thread that wakes preempts
    the running one, here a worker in mid-call; a batch thread waits for a free core or
    the end of the worker's time slice. Replies wait in the pipes meanwhile; at a round's
    end the workers are idle and the parent runs at once. (Measured on the 2-core machine
    under other users' load, 7 paired runs of the throughput benchmark: median 204 vs
    183 updates/s, 5 pairs of 7 faster.)
    """
    policy = getattr(os, "SCHED_BATCH", None)
    try:
        before = os.sched_getscheduler(0)
        os.sched_setscheduler(0, policy, os.sched_param(0))  # type: ignore[arg-type]
    except (AttributeError, TypeError, OSError):
        yield
        return
    try:
        yield
    finally:
        with suppress(OSError):
            os.sched_setscheduler(0, before, os.sched_param(0))


def error_reply(message: Message, code: int, reason: str) -> Message:
    """An error reply to ``message`` (what the server counts as a failed site)."""
    return Message(Error(code=code, reason=reason), reply_to=message)


def call_site(
    app: ClientAppFn, message: Message, context: Context, *, restore_rngs: bool = True
) -> tuple[Message, Context | None]:
    """Run one ClientApp call; an exception becomes an error reply and drops the context.

    ``restore_rngs=False`` leaves the global RNGs as the call left them (a worker
    process, whose every call seeds them afresh, has no one to restore them for).

    The error reason is the one Flower's Simulation Engine gives (the Ray actor wraps the
    exception in ``ClientAppException``), so ``failures`` read the same on both backends.
    """
    try:
        with _isolated(call_seed(message, context), restore=restore_rngs):
            reply = app(message, context)
    except Exception as exc:  # noqa: BLE001 - a site's failure is reported, never raised
        wrapped = ClientAppException(str(exc))
        reason = str(type(wrapped)) + ":<'" + str(wrapped) + "'>"
        return error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), None
    return reply, context


class SiteExecutor(Protocol):
    """Runs ClientApp calls; :class:`InlineSites` or :class:`SitePool`."""

    def submit(self, task_id: str, message: Message, context: Context) -> None:
        """Queue a call; it is under way by the time :meth:`wait` returns."""
        ...

    def wait(self, timeout: float | None) -> list[Done]:
        """Finished calls not yet handed out; blocks up to ``timeout`` for at least one
        while calls are outstanding (returns ``[]`` at once when none are)."""
        ...

    def close(self) -> None: ...


def _copy(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


#: A picklable call that fills the ClientApp's per-process caches (e.g. loads the run's data).
WarmUp = Callable[[], object]


class InlineSites:
    """Calls run in the calling thread, one at a time (``--workers 0``: tests, debugging).

    The message, context and reply are copied as a pool's pipe copies them, so a site that
    changes what it received (or a failed call that changed its state) changes nothing
    on the server's side, exactly as with workers.
    """

    def __init__(self, app_ref: str = CLIENT_APP, *, preload: WarmUp | None = None) -> None:
        self._app = load_app(app_ref)
        warm_up()
        if preload is not None:
            preload()
        self._done: list[Done] = []

    def submit(self, task_id: str, message: Message, context: Context) -> None:
        reply, updated = call_site(self._app, _copy(message), _copy(context))
        self._done.append((task_id, _copy(reply), updated))

    def wait(self, timeout: float | None) -> list[Done]:
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        self._done.clear()


#: Seconds between looks for room in the call queue's pipe while calls wait to go in
#: (the pipe holds ~4 calls of a 52k-parameter model; workers drain it in ~2 calls' time).
_REFILL = 0.001

#: A worker's ``running`` slot when it runs no call.
_IDLE = -1

def _serve(tasks: CallReader, conn: Connection, running: Any, app_ref: str, log_level: int,
           preload: WarmUp | None) -> None:  # fmt: skip
    """A worker: import the ClientApp once, then take calls (``(sequence number, message,
    context)``) off the shared queue and answer them until it takes a None. ``running``
    names the call in progress (for the parent, should this process die in it)."""
    logging.getLogger("flwr").setLevel(log_level)
    torch.set_num_threads(1)
    threadpool_limits(limits=1)  # BLAS and OpenMP: one worker, one core
    try:
        try:
            app = load_app(app_ref)
            warm_up()
            if preload is not None:
                preload()
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
            conn.send((_FAILED, f"{type(exc).__name__}: {exc}"))
            return
        conn.send((_READY, None))
        while (task := tasks.get()) is not None:
            seq, message, context = task
            running.value = seq
            conn.send((_DONE, (seq, *call_site(app, message, context, restore_rngs=False))))
            running.value = _IDLE
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        return


_READY, _FAILED, _DONE = "ready", "failed", "done"


class WorkerStartError(RuntimeError):
    """A worker process could not load the ClientApp (the run cannot go on)."""


@dataclass
class _Worker:
    process: Any  # multiprocessing.context.SpawnProcess
    conn: Connection  # its replies
    running: Any  # shared int: the sequence number of its call in progress, or _IDLE
    ready: bool = False


class SitePool:
    """``size`` worker processes taking calls off one shared queue.

    ``submit`` puts a call on the queue (:class:`simulations.callqueue.CallQueue`) and
    returns; :meth:`wait` writes the queued calls to the pipe as far as it has room, the
    rest while it waits (so call ``wait``, if only with timeout 0, after a batch of
    submits); whichever worker is free takes the next call itself, so a worker never waits
    for this process to hand it one (on a loaded machine the parent may not be scheduled
    for milliseconds), and a slow call holds up no other. Each worker answers on a pipe of
    its own. Create the pool before starting threads in this process (forked workers
    inherit only the creating thread).
    """

    def __init__(self, size: int, app_ref: str = CLIENT_APP, *, verbose: bool = False,
                 start_method: str | None = None,
                 preload: WarmUp | None = None) -> None:  # fmt: skip
        if size < 1:
            raise ValueError(f"a worker pool needs >= 1 worker, got {size}")
        if start_method is None:
            start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        if start_method == "fork":  # children inherit the imported, warmed-up app
            # On one thread: an OpenMP pool started here would be unusable in the children.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with threadpool_limits(limits=1):
                    load_app(app_ref)
                    warm_up()
                    if preload is not None:
                        preload()  # once, here, for every forked child
            finally:
                torch.set_num_threads(threads)
        self._preload = preload
        self._ctx = mp.get_context(start_method)
        self._respawn_ctx = mp.get_context("spawn")  # threads may run by then
        self._app_ref = app_ref
        self._log_level = logging.INFO if verbose else logging.WARNING
        # Spawn-context pipe and lock: usable by forked workers and spawned replacements.
        self._tasks = CallQueue(self._respawn_ctx)
        self._pending: dict[int, tuple[str, Message]] = {}  # sequence number -> call
        self._next_seq = 0
        self._done: list[Done] = []
        # Forked children would otherwise walk (and so copy) every inherited object in
        # their garbage collections; frozen objects are left alone.
        gc.freeze()
        try:
            self._workers = [self._spawn(self._ctx) for _ in range(size)]
        finally:
            gc.unfreeze()

    def _spawn(self, ctx: Any) -> _Worker:
        replies, child = ctx.Pipe(duplex=False)
        widen(child.fileno())
        running = self._respawn_ctx.RawValue("q", _IDLE)
        preload = None if ctx.get_start_method() == "fork" else self._preload
        process = ctx.Process(target=_serve,
                              args=(self._tasks.reader, child, running, self._app_ref,
                                    self._log_level, preload),
                              daemon=True, name="privfed-site-worker")  # fmt: skip
        process.start()
        child.close()
        return _Worker(process, replies, running)

    def submit(self, task_id: str, message: Message, context: Context) -> None:
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        self._pending[seq] = (task_id, message)
        self._tasks.put((seq, message, context))  # pickled now; written by wait()
        if self._tasks.backlog == len(self._workers):  # one call each: start them now
            self._tasks.flush()

    def wait(self, timeout: float | None) -> list[Done]:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._tasks.flush()
        while not self._done and self._pending:
            self._tasks.flush()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = self._poll(left if not self._tasks.backlog else min(left or _REFILL, _REFILL))
            for worker in list(self._workers):
                if worker.conn.fileno() in ready or worker.process.sentinel in ready:
                    self._drain(worker)
            if left == 0:
                break
        done, self._done = self._done, []
        return done

    def _poll(self, timeout: float | None) -> set[int]:
        """The descriptors ready within ``timeout`` s: a worker's replies or exit, or room
        in the call queue's pipe while a call is partly written."""
        poller = select.poll()
        for worker in self._workers:
            poller.register(worker.conn.fileno(), select.POLLIN)
            poller.register(worker.process.sentinel, select.POLLIN)
        if self._tasks.writing:
            poller.register(self._tasks.writer_fd, select.POLLOUT)
        ms = None if timeout is None else math.ceil(timeout * 1000)
        return {fd for fd, _ in poller.poll(ms)}

    def _drain(self, worker: _Worker) -> None:
        """Take everything ``worker`` sent; if it died, answer its call with an error."""
        try:
            while worker.conn.poll(0):
                kind, payload = worker.conn.recv()
                if kind == _FAILED:
                    raise WorkerStartError(f"a site worker could not load the ClientApp "
                                           f"{self._app_ref}: {payload}")
                if kind == _READY:
                    worker.ready = True
                    continue
                seq, reply, updated = payload
                call = self._pending.pop(seq, None)
                if call is not None:
                    self._done.append((call[0], reply, updated))
        except (EOFError, OSError):  # the process died
            self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        if not worker.ready:
            raise WorkerStartError(f"a site worker exited with code {code} before it "
                                   f"loaded the ClientApp {self._app_ref}") from None
        call = self._pending.pop(worker.running.value, None)
        if call is not None:
            task_id, message = call
            reason = f"the site's process exited with code {code} while handling the message"
            self._done.append((task_id, error_reply(message, ErrorCode.UNKNOWN, reason), None))
        worker.conn.close()
        fresh = self._spawn(self._respawn_ctx)
        worker.process, worker.conn, worker.running = fresh.process, fresh.conn, fresh.running
        worker.ready = False

    def close(self) -> None:
        self._tasks.discard()  # calls not yet in the pipe: nobody waits for them
        for _ in self._workers:
            self._tasks.put(None)
        self._tasks.flush()
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join()
            worker.conn.close()
        self._tasks.close()


def make_executor(
    workers: int, app_ref: str = CLIENT_APP, *, verbose: bool = False,
    preload: WarmUp | None = None,
) -> SiteExecutor:
    """``workers`` = 0: inline in this process; otherwise a :class:`SitePool` of that size.

    ``preload`` runs once before the first call (in this process before workers are
    forked, so they share what it loaded; in each worker when they are spawned).
    """
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if workers == 0:
        return InlineSites(app_ref, preload=preload)
    return SitePool(workers, app_ref, verbose=verbose, preload=preload)
