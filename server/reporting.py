"""What the server writes for a run: per-round metrics, a summary, a plot, the model.

Files in the run's output folder:

* ``metrics.jsonl``: one JSON object per completed round, appended and fsynced
  as the round ends (a progress display can follow it).
* ``summary.json``: written atomically when the run ends.
* ``metrics.png``: accuracy and loss per round.
* ``model.pt``: the final global weights (a torch state dict), written atomically.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.atomic import append_line_durably, atomic_write_bytes, atomic_write_text

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "metrics.png"
MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class RoundReport:
    """What one completed round produced (``accuracy``/``loss``: centralized test set)."""

    round: int
    accuracy: float
    loss: float
    train_loss: float
    federated_accuracy: float
    federated_loss: float
    clients_trained: int
    clients_failed: int
    examples_trained: int
    seconds: float
    failures: list[str] = field(default_factory=list)
    #: Each site's cumulative privacy spend as it last reported it (DP runs only).
    epsilon: dict[str, float] = field(default_factory=dict)
    #: Replies dropped by validation this round, counted by reason.
    rejected: dict[str, int] = field(default_factory=dict)


def _clean(value: Any) -> Any:
    """JSON has no NaN: write ``null`` instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class RunRecorder:
    """Writes a run's files into ``out_dir`` (created if missing)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[RoundReport] = []

    def restore_rounds(self, rows: list[dict[str, Any]]) -> None:
        """Start from a checkpoint's rounds: ``metrics.jsonl`` is rewritten to hold exactly
        them (rows a crash left after the checkpoint are dropped)."""
        self.rounds = [RoundReport(**row) for row in rows]
        text = "".join(json.dumps(_clean(row)) + "\n" for row in rows)
        atomic_write_text(self.out_dir / METRICS_FILE, text)

    def write_round(self, report: RoundReport) -> None:
        """Append ``report`` to ``metrics.jsonl`` durably (the caller keeps ``rounds``)."""
        append_line_durably(self.out_dir / METRICS_FILE, json.dumps(_clean(asdict(report))))

    def save_model(self, state_dict: dict[str, torch.Tensor]) -> Path:
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        atomic_write_bytes(self.out_dir / MODEL_FILE, buffer.getvalue())
        return self.out_dir / MODEL_FILE

    def write_summary(self, summary: dict[str, Any]) -> Path:
        atomic_write_text(self.out_dir / SUMMARY_FILE, json.dumps(_clean(summary), indent=2))
        return self.out_dir / SUMMARY_FILE

    def plot(self) -> Path | None:
        """Accuracy and loss per round as ``metrics.png`` (None if no round completed)."""
        if not self.rounds:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r.round for r in self.rounds]
        sites = sorted({name for r in self.rounds for name in r.epsilon})
        fig, axes = plt.subplots(1, 3 if sites else 2, figsize=(15 if sites else 10, 4))
        ax_acc, ax_loss = axes[0], axes[1]
        ax_acc.plot(rounds, [r.accuracy for r in self.rounds], marker="o", label="global (test)")
        ax_acc.plot(rounds, [r.federated_accuracy for r in self.rounds], marker=".",
                    label="sites (validation)")
        ax_acc.set(xlabel="round", ylabel="accuracy", title="Accuracy")
        ax_acc.legend()
        ax_loss.plot(rounds, [r.loss for r in self.rounds], marker="o", label="global (test)")
        ax_loss.plot(rounds, [r.train_loss for r in self.rounds], marker=".", label="sites (train)")
        ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
        ax_loss.legend()
        for name in sites:
            axes[2].plot(rounds, [r.epsilon.get(name, float("nan")) for r in self.rounds],
                         marker=".", label=f"site {name}")
        if sites:
            axes[2].set(xlabel="round", ylabel="epsilon spent", title="Privacy spent per site")
            axes[2].legend(fontsize="small", ncol=2)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(self.out_dir / PLOT_FILE, buffer.getvalue())
        return self.out_dir / PLOT_FILE
