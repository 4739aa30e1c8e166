"""Real processes for the deployment tests: started in their own process group, stopped by PID."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from shared.data import load_mnist1d

PYTHON = sys.executable
BIN = Path(sys.executable).parent
#: The smoke-sized run the issue asks for (sites hold MNIST-1D shards).
SMOKE = ["federation.rounds=2", "data.samples=500", "model.name=cnn1d"]


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def privfed(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a privfed command to completion."""
    return subprocess.run([PYTHON, "-m", "simulations.cli", *args], capture_output=True,
                          text=True, env=env(), timeout=timeout, **kwargs)


class Daemon:
    """A ``privfed server start`` / ``site start`` process, logging to a file."""

    def __init__(self, name: str, args: list[str], log: Path, flwr_home: Path | None = None):
        self.name, self.log = name, log
        self._fh = log.open("w")
        extra = {"FLWR_HOME": str(flwr_home)} if flwr_home else {}  # installed apps go there
        self.proc = subprocess.Popen([PYTHON, "-m", "simulations.cli", *args], stdout=self._fh,
                                     stderr=subprocess.STDOUT, env={**env(), **extra}, text=True,
                                     start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.text():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n"
                                     f"{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {marker!r} in {timeout} s:\n"
                                     f"{self.text()[-3000:]}")
            time.sleep(0.2)

    def children(self) -> list[int]:
        """PIDs of the daemon's direct children (the Flower process it supervises)."""
        pids = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
        return pids

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM the process group; SIGKILL it if still there after ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            code = self.proc.wait(timeout=10)
        self.signal(signal.SIGKILL)  # stragglers in the group (none expected)
        self._fh.close()
        return code


def write_site_data(path: Path, part: int, parts: int, samples: int = 500) -> Path:
    """Shard ``part`` of the MNIST-1D training split, as a site's .npz file."""
    data = load_mnist1d(samples)
    np.savez(path, x=data.train.x[part::parts], y=data.train.y[part::parts])
    return path


def fill_site_toml(kit: Path, data: Path, superlink: str, runtime_port: int,
                   epsilon: float = 8.0) -> None:
    """What a site admin does to the template: data file, address, local port."""
    text = (kit / "site.toml").read_text()
    text = text.replace(next(ln for ln in text.splitlines() if ln.startswith("path =")),
                        f'path = "{data}"')
    text = text.replace(next(ln for ln in text.splitlines() if ln.startswith("superlink =")),
                        f'superlink = "{superlink}"')
    text = text.replace("runtime_port = 9094", f"runtime_port = {runtime_port}")
    text = text.replace("epsilon = 8.0", f"epsilon = {epsilon}")
    (kit / "site.toml").write_text(text)


def online_nodes(flwr_home: Path, connection: str = "privfed-server") -> int:
    """How many SuperNodes the SuperLink reports online."""
    out = subprocess.run([str(BIN / "flwr"), "supernode", "ls", connection, "--format", "json"],
                         capture_output=True, text=True, env={**env(), "FLWR_HOME": str(flwr_home)},
                         timeout=60).stdout
    try:
        nodes = json.loads(out)["nodes"]
    except (ValueError, KeyError):
        return 0
    return sum(1 for n in nodes if n["status"] == "online")


def wait_online(flwr_home: Path, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while (n := online_nodes(flwr_home)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{n} of {count} sites online after {timeout} s")
        time.sleep(1)
