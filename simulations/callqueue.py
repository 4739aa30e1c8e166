"""One queue of calls from a parent process to its worker processes, with no feeder thread.

``multiprocessing.Queue`` hands each item to a feeder thread that writes it to the pipe
later: on a loaded machine a worker then waits for that thread to be scheduled as well as
for the parent (measured: up to 40 ms at the start of a round). Here the parent writes the
pickled call itself, at once, as far as the pipe has room, and never blocks:

* :meth:`CallQueue.put` pickles the item now (later changes to it are not seen);
  :meth:`CallQueue.flush` writes the items the pipe has room for, whole (a worker reading
  half an item would hold the readers' lock until this process wrote the rest), the rest
  waits in the parent for the next flush, which the parent calls when
  :attr:`CallQueue.writer_fd` is writable. An item larger than the whole pipe goes in
  pieces, each when the pipe is empty.
  Put a batch, then flush: the first write wakes a worker, and a woken worker may take
  this process' CPU before it has pickled the next item;
* a worker takes whole items with :meth:`CallReader.get`, one reader at a time (a lock
  shared by the workers); items come out in the order they were put.

A worker that dies while it holds the lock (while reading an item, not while running a
call) would leave the others waiting for it: the pool's workers die in calls, not here.
"""

from __future__ import annotations

import array
import os
import pickle
import struct
from collections import deque
from contextlib import suppress
from typing import Any

#: Bytes of pipe buffer asked for (Linux: up to /proc/sys/fs/pipe-max-size, 1 MiB by
#: default): a few model-sized items fit, so a worker rarely waits for the other end.
PIPE_BUFFER = 1 << 20

_LENGTH = struct.Struct("!Q")


#: Room kept free beyond an item's size: the pipe holds whole pages, and the pages at
#: its two ends may be partly used.
_SLACK = 2 * 4096


def widen(fd: int) -> None:
    """Ask for a :data:`PIPE_BUFFER`-byte pipe (best effort; Linux only)."""
    with suppress(OSError, AttributeError, ImportError):
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BUFFER)


def _capacity(fd: int) -> int | None:
    """The pipe's size in bytes (None where it cannot be asked)."""
    try:
        import fcntl

        return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
    except (OSError, AttributeError, ImportError):
        return None


def _unread(fd: int) -> int:
    """Bytes in the pipe not yet read."""
    import fcntl
    import termios

    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


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
        self._capacity = _capacity(self._writer.fileno())
        self._frames: deque[bytes] = deque()  # framed items not yet (wholly) in the pipe
        self._sent = 0  # bytes of the first frame already written

    @property
    def writer_fd(self) -> int:
        return self._writer.fileno()

    @property
    def backlog(self) -> int:
        """Items put but not yet wholly written to the pipe."""
        return len(self._frames)

    @property
    def writing(self) -> bool:
        """Whether an item is partly in the pipe: flush as soon as the pipe has room.
        (Otherwise the next item waits for room for all of it, which a worker makes by
        taking an item: poll for its reply, not for room, or the pipe would report room
        for less than an item over and over.)"""
        return self._sent > 0

    def put(self, item: Any) -> None:
        data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        self._frames.append(_LENGTH.pack(len(data)) + data)

    def flush(self) -> None:
        """Write the backlog's items, in order, as many as fit whole in the pipe, in one
        system call (the first item written wakes a worker, which may take this process'
        CPU before a second call)."""
        fd = self._writer.fileno()
        while self._frames:
            batch = self._fitting(fd)
            if not batch:
                return
            try:
                written = os.writev(fd, batch)
            except BlockingIOError:
                return
            self._advance(written)
            if written < sum(len(b) for b in batch):
                return

    def _fitting(self, fd: int) -> list[memoryview]:
        """The backlog's first items (the rest of a partly written one first) that fit in
        the pipe now."""
        head = memoryview(self._frames[0])[self._sent :]
        if self._capacity is None or self._sent:  # cannot tell, or must finish: what fits
            return [head]
        room = self._capacity - _SLACK - _unread(fd)
        if len(head) > self._capacity - _SLACK:  # never whole: in pieces, into an empty pipe
            return [head] if room == self._capacity - _SLACK else []
        batch: list[memoryview] = []
        for frame in self._frames:
            if len(frame) > room:
                break
            batch.append(memoryview(frame))
            room -= len(frame)
        return batch

    def _advance(self, written: int) -> None:
        while written:
            left = len(self._frames[0]) - self._sent
            if written < left:
                self._sent += written
                return
            written -= left
            self._frames.popleft()
            self._sent = 0

    def discard(self) -> None:
        """Drop the items not yet begun (calls nobody waits for any more); an item
        partly written is finished, so the pipe stays readable."""
        while len(self._frames) > (1 if self._sent else 0):
            self._frames.pop()

    def close(self) -> None:
        self._writer.close()
        self.reader._reader.close()
