"""Hand a deployed run's files back to its submitter through the ServerApp's log.

In Flower 1.41's open-source SuperLink the only data path from a ServerApp to the
researcher who ran ``flwr run`` is the ServerApp's log (``flwr run --stream``, ``flwr
log``): ``flwr pull`` needs an enterprise artifact provider, and ``flwr-serverapp``
empties the ServerApp's final ``context.state`` before it pushes the context. So the
ServerApp, when the run config asks for it, writes its output files into its log as
framed lines, and ``privfed run`` (:mod:`server.submit`) reassembles and verifies them.

Frames, one log line each::

    privfed-result/1 file {"name": "model.pt", "bytes": 25771, "sha256": "…", "chunks": 1}
    privfed-result/1 chunk model.pt 0 <base64 of bytes [0, 49152)>
    privfed-result/1 held {"name": "model.pt", "bytes": …, "sha256": …, "path": …, "reason": …}
    privfed-result/1 done {"sent": ["summary.json", …], "held": ["model.pt"], "bytes": …}

Guarantees:

* Sender (:func:`send_results`): files go in :data:`HANDBACK_FILES` order while their
  total size stays within ``max_bytes``; a file that does not fit (or is missing) is
  announced as ``held`` with its path on the server host and its SHA-256, so the
  submitter can fetch it by other means and check it. Every frame is written with a
  single ``write`` call, so a log line of another thread cannot split it.
* Receiver (:class:`ResultReceiver`): a file is written only if every chunk arrived and
  its length and SHA-256 equal the header's; otherwise it is refused with the reason.
  Only names in :data:`HANDBACK_FILES` are accepted: the log is text from the server,
  never a path to write to.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from shared.atomic import atomic_write_bytes

MARK = "privfed-result/1"
#: What is handed back, most wanted first (the budget is spent in this order).
HANDBACK_FILES = ("summary.json", "metrics.jsonl", "model.pt", "metrics.png")
#: Raw bytes per chunk line (64 KiB of base64).
CHUNK_BYTES = 49152


def _frame(kind: str, body: str) -> str:
    return f"{MARK} {kind} {body}\n"


def send_results(out_dir: str | Path, max_bytes: int, stream: TextIO | None = None) -> dict[
        str, Any]:
    """Write the run's files in ``out_dir`` into the log as frames (see module doc).

    ``max_bytes`` <= 0 sends nothing and writes no frame (simulations, and apps whose
    submitter did not ask). Returns the ``done`` frame's content.
    """
    if max_bytes <= 0:
        return {"sent": [], "held": [], "bytes": 0}
    stream = stream if stream is not None else sys.stdout
    out_dir = Path(out_dir).resolve()
    sent: list[str] = []
    held: list[str] = []
    total = 0
    for name in HANDBACK_FILES:
        path = out_dir / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if total + len(data) > max_bytes:
            reason = (f"{len(data)} bytes would take the hand-back past its limit of "
                      f"{max_bytes} bytes (output.return_max_bytes)")
            stream.write(_frame("held", json.dumps({"name": name, "bytes": len(data),
                                                    "sha256": digest, "path": str(path),
                                                    "reason": reason})))
            held.append(name)
            continue
        chunks = max(1, -(-len(data) // CHUNK_BYTES))
        stream.write(_frame("file", json.dumps({"name": name, "bytes": len(data),
                                                "sha256": digest, "chunks": chunks})))
        for i in range(chunks):
            piece = base64.b64encode(data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES]).decode()
            stream.write(_frame("chunk", f"{name} {i} {piece}"))
        sent.append(name)
        total += len(data)
    done = {"sent": sent, "held": held, "bytes": total}
    stream.write(_frame("done", json.dumps(done)))
    stream.flush()
    return done


def is_frame(line: str) -> bool:
    """Whether a log line is a hand-back frame."""
    return MARK in line


@dataclass
class _Incoming:
    size: int
    sha256: str
    chunks: int
    parts: dict[int, bytes] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Received:
    """What a finished hand-back left: files written, files held on the server, refusals."""

    files: dict[str, dict[str, Any]]
    held: dict[str, dict[str, Any]]
    refused: dict[str, str]
    complete: bool


class ResultReceiver:
    """Collects frames from log lines; :meth:`write` verifies and writes the files."""

    def __init__(self) -> None:
        self._incoming: dict[str, _Incoming] = {}
        self._held: dict[str, dict[str, Any]] = {}
        self._refused: dict[str, str] = {}
        self.done: dict[str, Any] | None = None

    @property
    def started(self) -> bool:
        return bool(self._incoming or self._held or self.done is not None)

    def feed(self, line: str) -> str | None:
        """Take one log line; return a note for the user when a file is announced.

        Lines that are not frames are ignored (returns ``None``).
        """
        at = line.find(MARK)
        if at < 0:
            return None
        kind, _, body = line[at + len(MARK):].strip().partition(" ")
        try:
            if kind == "chunk":
                return self._chunk(body)
            info = json.loads(body)
            if not isinstance(info, dict):
                raise ValueError("not an object")
            if kind == "done":
                self.done = info
                return None
            name = self._name(info.get("name"))
            if name is None:
                return None
            if kind == "file":
                self._incoming[name] = _Incoming(int(info["bytes"]), str(info["sha256"]),
                                                 int(info["chunks"]))
                return f"receiving {name} ({info['bytes']} bytes, {info['chunks']} chunks)"
            if kind == "held":
                self._held[name] = info
                return (f"{name} stays on the server: {info.get('path')} "
                        f"({info.get('reason')}; sha256 {info.get('sha256')})")
        except (ValueError, KeyError, TypeError) as exc:
            self._refused.setdefault("frames", f"unreadable {kind!r} frame ({exc})")
        return None

    def _name(self, name: object) -> str | None:
        if name in HANDBACK_FILES:
            return str(name)
        self._refused[str(name)[:80]] = "not a file privfed hands back; ignored"
        return None

    def _chunk(self, body: str) -> None:
        name, index, *data = body.split(" ", 2)  # an empty file's one chunk has no data
        incoming = self._incoming.get(name)
        if incoming is None:
            self._refused.setdefault(name[:80], "a chunk arrived without its header")
            return None
        try:
            incoming.parts[int(index)] = base64.b64decode("".join(data).strip(), validate=True)
        except (ValueError, binascii.Error):
            incoming.error = f"chunk {index} is not valid base64"
        return None

    def write(self, out_dir: Path) -> Received:
        """Verify every announced file and write those that check out into ``out_dir``."""
        files: dict[str, dict[str, Any]] = {}
        refused = dict(self._refused)
        for name, inc in self._incoming.items():
            missing = [i for i in range(inc.chunks) if i not in inc.parts]
            data = b"".join(inc.parts[i] for i in sorted(inc.parts))
            digest = hashlib.sha256(data).hexdigest()
            if inc.error:
                refused[name] = inc.error
            elif missing:
                refused[name] = f"{len(missing)} of {inc.chunks} chunks did not arrive"
            elif len(data) != inc.size:
                refused[name] = f"{len(data)} bytes arrived, the server sent {inc.size}"
            elif digest != inc.sha256:
                refused[name] = f"SHA-256 {digest} differs from the server's {inc.sha256}"
            else:
                atomic_write_bytes(out_dir / name, data)
                files[name] = {"bytes": inc.size, "sha256": digest}
        return Received(files, dict(self._held), refused, complete=self.done is not None)
