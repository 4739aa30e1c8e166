"""`flwr run .` against a local simulation federation (a detached SuperLink we stop by PID)."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations.scenario import PROJECT_DIR


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_mentioning(text):
    """PIDs whose command line contains ``text`` (a path unique to this test)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


@pytest.fixture
def flwr_home(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    yield home
    for pid in pids_mentioning(str(home)):  # the detached SuperLink `flwr run` started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGTERM)
    deadline = time.monotonic() + 20
    while pids_mentioning(str(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids_mentioning(str(home)):
        os.kill(pid, signal.SIGKILL)


def test_flwr_run_dot_on_a_local_simulation_federation(flwr_home, tmp_path):
    out = tmp_path / "run"
    bin_dir = Path(sys.executable).parent  # flwr and flower-superlink live beside python
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    run_config = f"federation.clients=3 federation.rounds=2 data.samples=500 output.dir='{out}'"
    result = subprocess.run(
        [str(bin_dir / "flwr"), "run", ".", "--stream", "--run-config", run_config,
         "--federation-config", "num-supernodes=3"],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_trained"] == 3 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
