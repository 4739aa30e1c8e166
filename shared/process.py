"""Running Flower's daemons in the foreground: environment, log relay, signal forwarding.

Used by both ``privfed server start`` and ``privfed site start``. The daemon runs in
its own process group; SIGTERM/SIGINT sent to privfed are forwarded to that group
(a second signal, or ``grace`` seconds without exit, kills it), and the daemon gets
SIGTERM if privfed itself dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TextIO

#: Seconds a daemon gets between the forwarded SIGTERM and SIGKILL.
STOP_GRACE = 20.0


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment with this Python's script folder first on PATH.

    Flower's daemons start further Flower executables (``flower-superexec``,
    ``flwr-serverapp``, ``flwr-clientapp``) by name; they must resolve to this
    installation even when the virtual environment is not on PATH (CI runs
    ``.venv/bin/python`` directly).
    """
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            **(extra or {})}


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the supervisor dies, even by SIGKILL.

    Without it a killed supervisor leaves its daemon running unsupervised, its log pipe
    broken (a no-op outside Linux).
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def signal_group(proc: subprocess.Popen[str], signum: int) -> None:
    """Send ``signum`` to ``proc``'s process group (already gone: nothing to do)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)


def relay(proc: subprocess.Popen[str], out: TextIO,
          on_line: Callable[[str], None] | None = None) -> threading.Thread:
    """Copy ``proc``'s output to ``out`` line by line in a thread (started, returned)."""

    def run() -> None:
        for line in proc.stdout or ():
            out.write(line)
            out.flush()
            if on_line is not None:
                on_line(line)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class SignalForwarder:
    """While installed, forward SIGTERM/SIGINT to a child's process group."""

    def __init__(self, proc: subprocess.Popen[str], grace: float = STOP_GRACE) -> None:
        self.proc, self.grace, self.stopping = proc, grace, threading.Event()

    def __enter__(self) -> SignalForwarder:
        signals = (signal.SIGTERM, signal.SIGINT)
        self.previous = {s: signal.signal(s, self._forward) for s in signals}
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _forward(self, _signum: int, _frame: object) -> None:
        if self.stopping.is_set():
            signal_group(self.proc, signal.SIGKILL)
            return
        self.stopping.set()
        signal_group(self.proc, signal.SIGTERM)

    def stop(self) -> None:
        """Ask the child to stop, as a forwarded SIGTERM would."""
        self._forward(signal.SIGTERM, None)

    def wait(self) -> int:
        """The child's exit status; it is killed ``grace`` s after the first signal."""
        deadline: float | None = None
        while True:
            if deadline is None and self.stopping.is_set():
                deadline = time.monotonic() + self.grace
            try:
                return self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() > deadline:
                    signal_group(self.proc, signal.SIGKILL)
