"""Submit a run to a live privfed server and collect what it reports.

``privfed run --server H:P --kit DIR`` writes a TLS connection to
``FLWR_HOME/config.toml`` (root certificate: the kit's ``ca.pem``), writes the run
config overrides to ``OUT/run-config.toml``, calls ``flwr run <app> <connection>
--run-config OUT/run-config.toml --stream`` and relays the ServerApp's log.

How results reach ``OUT`` (Flower 1.41's open-source SuperLink has no artifact
transfer: ``flwr pull`` needs an enterprise artifact provider, and the ServerApp's
final ``context.state`` is emptied before it reaches the SuperLink; the log is the one
channel back, see :mod:`server.handback`):

* ``OUT/run.log``: the streamed log (without hand-back frames); ``OUT/run.json``: run
  id, server, final status (``flwr ls``), rounds completed, what was handed back.
* ``OUT/metrics.jsonl``: one row per round parsed from the ServerApp's round lines as
  they arrive, replaced by the server's full file when that is handed back.
* With ``output.return_max_bytes`` > 0 (set by :func:`handback_overrides` when the app
  declares the key), the ServerApp writes ``summary.json``, ``metrics.jsonl``,
  ``model.pt`` and ``metrics.png`` into its log as checksummed frames at the end of the
  run; they are verified (length and SHA-256) and written into ``OUT``. A file that
  fails the check is not written and the run is reported as failed; a file over the
  limit stays on the server, and ``run.json`` says where. If the stream ended before
  the last frame (Flower ends it once the run is finished), the stored log is read
  again with ``flwr log --show``.
* With ``server_output`` set, the run is told to write there, and if this machine can
  read that folder (same host or a shared file system) files that were not handed
  back are copied from it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from server.deploy import DeployError, tool_env, write_connection
from server.handback import HANDBACK_FILES, Received, ResultReceiver, is_frame

RUN_CONFIG_FILE = "run-config.toml"
SERVER_FILES = HANDBACK_FILES
#: Run-config key: most bytes of its files the ServerApp hands back through its log.
RETURN_KEY = "output.return_max_bytes"
#: What ``privfed run`` asks for unless ``--set output.return_max_bytes=...`` says otherwise.
DEFAULT_RETURN_MAX_BYTES = 32 * 2**20
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_SERVER_DIR = re.compile(r"privfed run \d+: writing to (\S.*?)\s*$")
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
    #: The run's output folder on the server host, as the ServerApp logged it.
    server_dir: str | None = None
    results: ResultReceiver = field(default_factory=ResultReceiver)

    def feed(self, line: str) -> dict[str, Any] | None:
        """Parse one log line; return a new round row if the line completes one."""
        if self.run_id is None and (m := _RUN_ID.search(line)):
            self.run_id = int(m.group(1))
        if self.server_dir is None and (m := _SERVER_DIR.search(line)):
            self.server_dir = m.group(1)
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


def handback_overrides(app_config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[
        str, Any]:
    """``overrides`` plus ``output.return_max_bytes`` = the default, when the app declares
    the key and the user did not set it (an app without it cannot hand files back)."""
    out = dict(overrides)
    if RETURN_KEY in app_config and RETURN_KEY not in out:
        out[RETURN_KEY] = DEFAULT_RETURN_MAX_BYTES
    return out


def fetch_log(run_id: int, connection: str, env: Mapping[str, str]) -> str:
    """The run's whole stored log (``flwr log --show``); empty if it cannot be read."""
    proc = subprocess.run(  # noqa: S603 - fixed executable
        ["flwr", "log", str(run_id), connection, "--show"],
        capture_output=True, text=True, env=dict(env), timeout=300,
    )
    return proc.stdout if proc.returncode == 0 else ""


def refetch_results(run_id: int, connection: str, env: Mapping[str, str], *,
                    tries: int = 5, pause: float = 2.0) -> ResultReceiver:
    """Read the stored log again until its hand-back is complete (or ``tries`` run out).

    Flower ends ``flwr run --stream`` as soon as the run is finished, which can be
    before the ServerApp's last log lines are stored; ``flwr log --show`` returns all
    that is stored.
    """
    receiver = ResultReceiver()
    for attempt in range(tries):
        receiver = ResultReceiver()
        for line in fetch_log(run_id, connection, env).splitlines():
            receiver.feed(line)
        if receiver.done is not None:
            break
        if attempt + 1 < tries:
            time.sleep(pause)
    return receiver


def _copy_server_files(server_output: Path, out: Path, skip: Mapping[str, object]) -> list[
        str]:
    copied = []
    for name in SERVER_FILES:
        if name in skip:
            continue
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
            if is_frame(line):  # megabytes of base64: collected, not shown
                if (note := progress.results.feed(line)) is not None:
                    line = f"privfed run: {note}\n"
                else:
                    continue
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
    asked = int(flat.get(RETURN_KEY, 0) or 0) > 0
    results, source = progress.results, "flwr run --stream"
    if asked and results.done is None and status == "finished:completed":
        again = refetch_results(progress.run_id, name, env)
        if again.done is not None or not results.started:
            results, source = again, "flwr log --show"
    received = results.write(out_dir)
    copied = (_copy_server_files(server_output, out_dir, received.files)
              if server_output is not None else [])
    last = progress.rounds[-1] if progress.rounds else {}
    summary = {
        "run_id": progress.run_id,
        "server": server,
        "status": status,
        "rounds_completed": len(progress.rounds),
        "final_accuracy": _finite(last.get("accuracy")),
        "server_dir": progress.server_dir,
        "server_output": str(server_output) if server_output is not None else None,
        "handed_back": received.files,
        "handed_back_via": source if received.files else None,
        "held_on_server": received.held,
        "refused": received.refused,
        "copied_from_server": copied,
        "out_dir": str(out_dir),
    }
    (out_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    _say_where(received, asked, progress.server_dir, echo)
    if status != "finished:completed":
        raise SubmitError(f"run {progress.run_id} on {server} ended as {status!r}; "
                          f"see {out_dir / 'run.log'}")
    # A file refused in transit but then copied from a readable --server-output is intact.
    broken = sorted(set(received.refused) & set(HANDBACK_FILES) - set(copied))
    if broken:
        where = f" (on the server: {progress.server_dir})" if progress.server_dir else ""
        reasons = "; ".join(f"{n}: {received.refused[n]}" for n in broken)
        raise SubmitError(f"run {progress.run_id} completed, but {', '.join(broken)} did not "
                          f"arrive intact and was not written{where}: {reasons}")
    return summary


def _finite(value: float | None) -> float | None:
    """JSON has no NaN (a round without a central evaluation): ``None`` instead."""
    return value if value is not None and math.isfinite(value) else None


def _say_where(received: Received, asked: bool, server_dir: str | None, echo: TextIO) -> None:
    """Say so when the app was asked for its files and handed none back (the files held
    on the server were announced, with their path, as their frames arrived)."""
    if asked and not received.complete and not received.files:
        echo.write("privfed run: the server's app handed no files back (is it an older "
                   f"privfed?); they are on the server host in {server_dir or 'output.dir'}\n")
    echo.flush()
