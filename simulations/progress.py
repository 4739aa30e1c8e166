"""A live progress display that follows a run's ``metrics.jsonl``.

The server appends one line per completed round; this reads new lines as they
land and shows round, accuracy and loss, so the same display works for a local
simulation and for a run whose server is elsewhere (given the file).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


class MetricsFollower:
    """Follows ``metrics.jsonl`` in a background thread until :meth:`stop`."""

    def __init__(self, path: Path, rounds: int, console: Console, interval: float = 0.2) -> None:
        self.path, self.rounds, self.console, self.interval = path, rounds, console, interval
        self._stop = threading.Event()
        self._offset = 0
        self._progress = Progress(
            TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.description}"), TimeElapsedColumn(),
            console=console, transient=False,
        )
        self._task = self._progress.add_task("starting sites...", total=rounds)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MetricsFollower:
        self._progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        self._progress.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open() as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            self._show(json.loads(line))

    def _show(self, row: dict[str, object]) -> None:
        text = f"accuracy {_fmt(row.get('accuracy'))}  loss {_fmt(row.get('loss'))}"
        epsilon = row.get("epsilon") or {}
        if epsilon:
            text += "  epsilon " + " ".join(f"{k}:{v:.2f}" for k, v in epsilon.items())  # type: ignore[union-attr]
        if row.get("clients_failed"):
            text += f"  [yellow]{row['clients_failed']} site(s) failed[/]"
        self._progress.console.print(f"round {row['round']:>3}/{self.rounds}  {text}")
        self._progress.update(self._task, completed=int(row["round"]), description=text)  # type: ignore[call-overload]
