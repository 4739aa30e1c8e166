"""Submit a run to a live privfed server and collect what it reports.

``privfed run --server H:P --kit DIR`` writes a TLS connection to
``FLWR_HOME/config.toml`` (root certificate: the kit's ``ca.pem``), writes the run
config overrides to ``OUT/run-config.toml``, calls ``flwr run <app> <connection>
--run-config OUT/run-config.toml --stream`` and relays the ServerApp's log.

How results reach ``OUT`` (Flower 1.41 has no artifact transfer in its open-source
SuperLink: ``flwr pull`` needs an enterprise artifact provider):

* ``OUT/run.log``: the streamed log; ``OUT/metrics.jsonl``: one row per round
  (``round``, ``accuracy``, ``loss``, ``clients_trained``, ``clients_failed``) parsed
  from the ServerApp's round lines as they arrive; ``OUT/run.json``: run id,
  server, final status (``flwr ls``), rounds completed.
* The final model and the full metrics stay where the ServerApp writes them, on
  the server host (``output.dir``). With ``server_output`` set, the run is told to
  write there, and if this machine can read that folder (same host or a shared
  file system) ``metrics.jsonl``, ``summary.json``, ``metrics.png`` and
  ``model.pt`` are copied into ``OUT``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from server.deploy import DeployError, tool_env, write_connection

RUN_CONFIG_FILE = "run-config.toml"
SERVER_FILES = ("metrics.jsonl", "summary.json", "metrics.png", "model.pt")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
#: The round line of ``server.loop.run_rounds`` (its log format is this parser's contract).
_ROUND = re.compile(
    r"round (\d+): accuracy (\S+) loss (\S+) \((\d+) sites trained, (\d+) failed\)"
)


class SubmitError(DeployError):
    """The run could not be submitted or did not complete."""


@dataclass
class RunProgress:
    """What the stream has told us so far."""

    run_id: int | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, line: str) -> dict[str, Any] | None:
        """Parse one log line; return a new round row if the line completes one."""
        if self.run_id is None and (m := _RUN_ID.search(line)):
            self.run_id = int(m.group(1))
        if m := _ROUND.search(line):
            row = {"round": int(m.group(1)), "accuracy": float(m.group(2)),
                   "loss": float(m.group(3)), "clients_trained": int(m.group(4)),
                   "clients_failed": int(m.group(5))}
            self.rounds.append(row)
            return row
        return None


def connection_name(server: str) -> str:
    """``privfed-<host>-<port>``: one connection per server in the user's FLWR_HOME."""
    return "privfed-" + re.sub(r"[^A-Za-z0-9_-]+", "-", server).strip("-")


def write_run_config(path: Path, flat: Mapping[str, Any]) -> Path:
    """Write dotted overrides as nested TOML (Flower flattens it back; any string is safe)."""
    import tomli_w

    nested: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    path.write_text(tomli_w.dumps(nested))
    return path


def _flwr_env(flwr_home: Path) -> dict[str, str]:
    return tool_env({"FLWR_HOME": str(flwr_home.resolve())})


def run_status(run_id: int, connection: str, env: Mapping[str, str]) -> str:
    """``finished:completed`` etc. from ``flwr ls --run-id``; ``unknown`` if it cannot tell."""
    proc = subprocess.run(  # noqa: S603 - fixed executable
        ["flwr", "ls", connection, "--run-id", str(run_id), "--format", "json"],
        capture_output=True, text=True, env=dict(env), timeout=120,
    )
    try:
        return str(json.loads(proc.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError, TypeError):
        return "unknown"


def _copy_server_files(server_output: Path, out: Path) -> list[str]:
    copied = []
    for name in SERVER_FILES:
        src = server_output / name
        if src.is_file() and os.access(src, os.R_OK):
            shutil.copyfile(src, out / name)
            copied.append(name)
    return copied


def _stream(cmd: list[str], env: Mapping[str, str], out_dir: Path, echo: TextIO) -> tuple[
        int, RunProgress]:
    progress = RunProgress()
    with (out_dir / "run.log").open("w") as log, (out_dir / "metrics.jsonl").open("w") as rows:
        proc = subprocess.Popen(  # noqa: S603 - fixed executable
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(env),
        )
        for raw in proc.stdout or ():
            line = _ANSI.sub("", raw)
            log.write(line)
            log.flush()
            echo.write(line)
            echo.flush()
            if (row := progress.feed(line)) is not None:
                rows.write(json.dumps(row) + "\n")
                rows.flush()
        return proc.wait(), progress


def submit(
    server: str, ca: Path | None, app_dir: Path, overrides: Mapping[str, Any], out_dir: Path,
    flwr_home: Path, *, server_output: Path | None = None, echo: TextIO = sys.stdout,
) -> dict[str, Any]:
    """Submit the app at ``app_dir`` to ``server`` and follow it to the end (see module doc).

    ``ca`` is the federation's CA certificate (``None``: an ``--insecure`` server).

    Raises:
        SubmitError: ``flwr run`` failed, or the run did not finish as completed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    name = connection_name(server)
    write_connection(flwr_home, name, server, ca)
    flat = dict(overrides)
    if server_output is not None:
        flat["output.dir"] = str(server_output)
    run_config = write_run_config(out_dir / RUN_CONFIG_FILE, flat)
    env = _flwr_env(flwr_home)
    cmd = ["flwr", "run", str(app_dir), name, "--run-config", str(run_config.resolve()),
           "--stream"]
    code, progress = _stream(cmd, env, out_dir, echo)
    if progress.run_id is None:
        raise SubmitError(f"flwr run did not start a run on {server} (exit status {code}); "
                          f"see {out_dir / 'run.log'}")
    status = run_status(progress.run_id, name, env)
    copied = _copy_server_files(server_output, out_dir) if server_output is not None else []
    last = progress.rounds[-1] if progress.rounds else {}
    summary = {
        "run_id": progress.run_id,
        "server": server,
        "status": status,
        "rounds_completed": len(progress.rounds),
        "final_accuracy": last.get("accuracy"),
        "server_output": str(server_output) if server_output is not None else None,
        "copied_from_server": copied,
        "out_dir": str(out_dir),
    }
    (out_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    if status != "finished:completed":
        raise SubmitError(f"run {progress.run_id} on {server} ended as {status!r}; "
                          f"see {out_dir / 'run.log'}")
    return summary
