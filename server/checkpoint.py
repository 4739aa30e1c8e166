"""Server checkpoints: everything needed to continue a run after a crash, checked on load.

After every completed round the server writes one file,
``<run dir>/checkpoints/round-000042.ckpt``, atomically (temp file, fsync, rename,
directory fsync), and deletes all but the newest ``keep``. A file is::

    b"PRIVFED-CKPT 1\\n" + sha256(payload).hexdigest() + b"\\n" + payload

where ``payload`` is a ``torch.save`` of plain types and tensors only (loaded with
``weights_only=True``, so a checkpoint cannot execute code). :meth:`CheckpointStore.latest`
returns the newest file whose hash and structure check out; a truncated or edited
file is refused with a logged reason and the one before it is used.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.atomic import atomic_write_bytes

log = logging.getLogger("flwr.privfed.server")

MAGIC = b"PRIVFED-CKPT 1\n"
VERSION = 1
_NAME = re.compile(r"^round-(\d{6})\.ckpt$")


class CheckpointError(Exception):
    """A checkpoint is missing, damaged or from another run configuration."""


@dataclass(frozen=True)
class Checkpoint:
    """The server's state after ``round`` completed rounds."""

    round: int
    model: dict[str, torch.Tensor]
    run_config: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)  # metrics rows so far
    site_epsilon: dict[str, float] = field(default_factory=dict)
    strategy_state: dict[str, Any] = field(default_factory=dict)
    python_rng: list[Any] = field(default_factory=list)
    torch_rng: torch.Tensor | None = None

    @staticmethod
    def capture_rng() -> tuple[list[Any], torch.Tensor]:
        """The server process' RNG states (Python's ``random``, torch's CPU generator)."""
        version, state, gauss = random.getstate()
        return [version, list(state), gauss], torch.get_rng_state()

    def restore_rng(self) -> None:
        """Put the RNG states back as they were when the checkpoint was taken."""
        if self.python_rng:
            version, state, gauss = self.python_rng
            random.setstate((version, tuple(state), gauss))
        if self.torch_rng is not None:
            torch.set_rng_state(self.torch_rng)


def encode(checkpoint: Checkpoint) -> bytes:
    """The checkpoint's file bytes (header, hash, payload)."""
    buffer = io.BytesIO()
    torch.save({"version": VERSION, **checkpoint.__dict__}, buffer)
    payload = buffer.getvalue()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def decode(data: bytes, source: str = "checkpoint") -> Checkpoint:
    """Parse and verify checkpoint bytes.

    Raises:
        CheckpointError: wrong header, hash mismatch (truncated or edited), or a
            payload that is not a version-1 checkpoint.
    """
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{source}: not a privfed checkpoint (bad header)")
    digest, _, payload = data[len(MAGIC):].partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"{source}: integrity check failed (sha256 mismatch: "
                              "truncated or modified)")
    try:
        raw = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{source}: unreadable payload ({exc})") from None
    if not isinstance(raw, dict) or raw.pop("version", None) != VERSION:
        raise CheckpointError(f"{source}: unsupported checkpoint version")
    try:
        return Checkpoint(**raw)
    except TypeError as exc:
        raise CheckpointError(f"{source}: unexpected fields ({exc})") from None


class CheckpointStore:
    """The checkpoints of one run, in ``<run dir>/checkpoints``."""

    def __init__(self, run_dir: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(run_dir) / "checkpoints"
        self.keep = keep

    def files(self) -> list[Path]:
        """Checkpoint files, oldest first (stray temp files are ignored)."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write ``checkpoint`` durably, then drop all but the newest ``keep``."""
        path = self.directory / f"round-{checkpoint.round:06d}.ckpt"
        atomic_write_bytes(path, encode(checkpoint), mode=0o600)
        for old in self.files()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies, or None if there is none at all.

        A damaged newer file is logged and skipped, never silently used.

        Raises:
            CheckpointError: checkpoints exist but none of them verifies.
        """
        files = self.files()
        errors: list[str] = []
        for path in reversed(files):
            try:
                return decode(path.read_bytes(), str(path))
            except CheckpointError as exc:
                log.warning("%s; trying the previous checkpoint", exc)
                errors.append(str(exc))
        if errors:
            raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
        return None


class CheckpointWriter:
    """Writes each round's checkpoint on a background thread while the next round runs.

    At most one write is in flight: :meth:`submit` first waits for the previous write
    (and raises its error, so a full disk stops the run), and :meth:`close` waits for the
    last. A crash can lose only a checkpoint whose write had not finished, as a crash
    during a synchronous write would; the checkpoint's contents (model copy, metrics,
    RNG and strategy state) are taken by the caller before it is submitted.
    """

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="privfed-checkpoint")
        self._pending: Future[Path] | None = None

    def submit(self, checkpoint: Checkpoint, then: Callable[[], object] | None = None) -> None:
        """Start writing ``checkpoint`` once the previous write has finished; ``then`` runs
        on the same thread right after it (e.g. the round's line in ``metrics.jsonl``)."""
        self.wait()

        def job() -> Path:
            path = self.store.save(checkpoint)
            if then is not None:
                then()
            return path

        self._pending = self._pool.submit(job)

    def wait(self) -> Path | None:
        """Wait for the write in flight; its path (None if there was none).

        Raises:
            OSError: the write failed.
        """
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        """Wait for the last write, then stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown()
