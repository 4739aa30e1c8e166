"""Local training and evaluation loops used by sites, the server and baselines.

Plain (non-private) loops; differential privacy wraps the model, optimizer and
loader before they reach :func:`train` (see ``client/dpsgd.py``), it does not
change the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared.config import Optimizer, TrainConfig
from shared.data import ArrayDataset


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy loss and accuracy over ``num_examples`` examples."""

    loss: float
    accuracy: float
    num_examples: int


def make_loader(data: ArrayDataset, batch_size: int, *, seed: int, shuffle: bool) -> DataLoader:
    """A DataLoader over in-memory arrays; shuffling is reproducible from ``seed``."""
    dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer the run config names, over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer is Optimizer.ADAM:
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def train(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, epochs: int
) -> float:
    """Run ``epochs`` passes of cross-entropy training; return the mean batch loss.

    Returns NaN when the loader yields no batch (e.g. Poisson sampling drew none).
    """
    model.train()
    criterion = nn.CrossEntropyLoss()
    losses: list[float] = []
    for _ in range(epochs):
        for x, y in loader:
            if len(y) == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, data: ArrayDataset, batch_size: int = 1024) -> EvalResult:
    """Loss and accuracy of ``model`` on ``data`` (NaN loss and accuracy if empty)."""
    if len(data) == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size])
        y = torch.from_numpy(data.y[start : start + batch_size])
        logits = model(x)
        total_loss += float(criterion(logits, y))
        correct += int((logits.argmax(dim=1) == y).sum())
    return EvalResult(total_loss / len(data), correct / len(data), len(data))
