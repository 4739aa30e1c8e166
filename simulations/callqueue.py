"""One queue of calls from a parent process to its worker processes, with no feeder thread.

``multiprocessing.Queue`` hands each item to a feeder thread that writes it to the pipe
later: on a loaded machine a worker then waits for that thread to be scheduled as well as
for the parent (measured: up to 40 ms at the start of a round). Here the parent writes the
pickled call itself, at once, as far as the pipe has room, and never blocks:

* :meth:`CallQueue.put` pickles the item now (later changes to it are not seen);
  :meth:`CallQueue.flush` writes what the pipe has room for, the rest waits in the parent
  for the next flush, which the parent calls when :attr:`CallQueue.writer_fd` is writable.
  Put a batch, then flush: the first write wakes a worker, and a woken worker may take
  this process' CPU before it has pickled the next item;
* a worker takes whole items with :meth:`CallReader.get`, one reader at a time (a lock
  shared by the workers); items come out in the order they were put.

A worker that dies while it holds the lock (while reading an item, not while running a
call) would leave the others waiting for it: the pool's workers die in calls, not here.
"""

from __future__ import annotations

import os
import pickle
import struct
from contextlib import suppress
from typing import Any

#: Bytes of pipe buffer asked for (Linux: up to /proc/sys/fs/pipe-max-size, 1 MiB by
#: default): a few model-sized items fit, so a worker rarely waits for the other end.
PIPE_BUFFER = 1 << 20

_LENGTH = struct.Struct("!Q")


def widen(fd: int) -> None:
    """Ask for a :data:`PIPE_BUFFER`-byte pipe (best effort; Linux only)."""
    with suppress(OSError, AttributeError, ImportError):
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BUFFER)


class CallReader:
    """The workers' end: picklable (for spawned workers) and shared by all of them."""

    def __init__(self, reader: Any, lock: Any) -> None:
        self._reader, self._lock = reader, lock  # a Connection (for its fd) and a Lock

    def get(self) -> Any:
        """The next item, blocking until one is there.

        Raises:
            EOFError: the pipe was closed by every writer.
        """
        fd = self._reader.fileno()
        with self._lock:
            (size,) = _LENGTH.unpack(_read_exact(fd, _LENGTH.size))
            data = _read_exact(fd, size)
        return pickle.loads(data)


def _read_exact(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            raise EOFError("the call queue was closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class CallQueue:
    """The parent's end: puts never block; see the module docstring."""

    def __init__(self, ctx: Any) -> None:
        """``ctx``: a multiprocessing context whose pipes and locks the workers can use
        (the spawn context's serve forked and spawned workers alike)."""
        reader, self._writer = ctx.Pipe(duplex=False)
        widen(self._writer.fileno())
        os.set_blocking(self._writer.fileno(), False)
        self.reader = CallReader(reader, ctx.Lock())
        self._out = bytearray()  # framed items not yet in the pipe

    @property
    def writer_fd(self) -> int:
        return self._writer.fileno()

    @property
    def backlog(self) -> int:
        """Bytes put but not yet written to the pipe."""
        return len(self._out)

    def put(self, item: Any) -> None:
        data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        self._out += _LENGTH.pack(len(data))
        self._out += data

    def flush(self) -> None:
        """Write as much of the backlog as the pipe takes now."""
        while self._out:
            try:
                written = os.write(self._writer.fileno(), self._out)
            except BlockingIOError:
                return
            del self._out[:written]

    def discard(self) -> None:
        """Drop the backlog (calls nobody waits for any more)."""
        self._out.clear()

    def close(self) -> None:
        self._writer.close()
        self.reader._reader.close()
