"""Local training and evaluation loops used by sites, the server and baselines.

Plain (non-private) loops; differential privacy wraps the model, optimizer and
loader before they reach :func:`train` (see ``client/dpsgd.py``), it does not
change the loop.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared.config import Optimizer, TrainConfig
from shared.data import ArrayDataset

#: Node-config key naming where a site trains and evaluates (see :func:`resolve_device`).
DEVICE_KEY = "device"
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def resolve_device(raw: object, *, key: str = DEVICE_KEY) -> torch.device:
    """Where a site computes: ``cpu``, ``cuda`` or ``cuda:N`` (a GPU torch must see), or
    ``auto`` (the first GPU if torch sees one, else the CPU).

    Raises:
        ValueError: one line naming ``key``: an unknown name, or a GPU torch cannot see
            (a CPU build of torch, no driver, or no such index).
    """
    text = str(raw).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _DEVICE.fullmatch(text):
        raise ValueError(f"{key}: unknown device {raw!r}; expected cpu, cuda, cuda:N or auto")
    device = torch.device(text)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{key}: {raw!r} asked for, but torch sees no CUDA device "
                             f"(torch {torch.__version__}; a CPU build, or no driver)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{key}: {raw!r} asked for, but torch sees {count} CUDA "
                             f"device(s) (0..{count - 1})")
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without any)."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy loss and accuracy over ``num_examples`` examples."""

    loss: float
    accuracy: float
    num_examples: int


def seed_torch(seed: int) -> None:
    """Seed torch's CPU generator (and the GPUs' where CUDA is already in use).

    ``torch.manual_seed`` does the same, but on a build with CUDA it also queues a lazy
    seeding call per accelerator type, each with a formatted stack trace (~0.6 ms a
    call, and the queue grows for as long as no GPU is initialised): a simulation that
    seeds once per site call paid that on every call.
    """
    torch.random.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


class Batches:
    """Mini-batches of in-memory arrays, re-iterable once per epoch.

    What ``DataLoader(TensorDataset(x, y), batch_size, shuffle=shuffle, generator=g)``
    yields in substance: each epoch visits every example once, in the order of one
    ``torch.randperm`` drawn from a generator seeded with ``seed`` (so epochs differ and
    the whole sequence is reproducible), and the last batch may be short. Batches are
    gathered with one index per batch instead of one ``__getitem__`` per example and a
    collate (the DataLoader path cost ~1 ms per epoch of 200 examples).
    """

    def __init__(self, data: ArrayDataset, batch_size: int, *, seed: int, shuffle: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = torch.from_numpy(data.x), torch.from_numpy(data.y)
        self.batch_size, self.shuffle = batch_size, shuffle
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, size = len(self.y), self.batch_size
        if not self.shuffle:
            for start in range(0, n, size):
                yield self.x[start : start + size], self.y[start : start + size]
            return
        order = torch.randperm(n, generator=self._generator)
        for start in range(0, n, size):
            index = order[start : start + size]
            yield self.x[index], self.y[index]


def make_loader(data: ArrayDataset, batch_size: int, *, seed: int, shuffle: bool) -> DataLoader:
    """A DataLoader over in-memory arrays; shuffling is reproducible from ``seed``.

    For Opacus, which turns a DataLoader into its Poisson-sampling loader; plain training
    takes the faster :class:`Batches`.
    """
    dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer the run config names, over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer is Optimizer.ADAM:
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def _plain_sgd_step(optimizer: torch.optim.Optimizer) -> Callable[[], None] | None:
    """An exact stand-in for ``optimizer.step()`` where ``optimizer`` is torch's own SGD
    with no momentum, weight decay, ``maximize`` or hooks, else None.

    It does what SGD's single-tensor path does on CPU, ``p.add_(p.grad, alpha=-lr)`` for
    every parameter with a gradient, so the weights come out bit for bit the same, without
    ``Optimizer.step``'s per-call Python (profiling hook, grad-mode switches, group scans:
    ~60 us a step, a tenth of a small model's step).
    """
    from torch.optim import optimizer as optim_module

    if type(optimizer) is not torch.optim.SGD:  # DP-SGD's optimizers wrap one: never here
        return None
    hooks = (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks,
             optim_module._global_optimizer_pre_hooks, optim_module._global_optimizer_post_hooks)
    if any(hooks):
        return None
    groups = optimizer.param_groups
    for group in groups:
        if (group["momentum"] != 0 or group["weight_decay"] != 0 or group["maximize"]
                or group["differentiable"] or group.get("fused") or group.get("foreach")
                or not isinstance(group["lr"], float)):  # fmt: skip
            return None
        if any(p.is_sparse or p.device.type != "cpu" for p in group["params"]):
            return None
    plan = [(group["params"], -group["lr"]) for group in groups]

    @torch.no_grad()
    def step() -> None:
        for params, alpha in plan:
            for param in params:
                if param.grad is not None:
                    param.add_(param.grad, alpha=alpha)

    return step


def train(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    *,
    criterion: Callable[..., torch.Tensor] | None = None,
    step_on_empty: bool = False,
) -> float:
    """Run ``epochs`` passes of cross-entropy training; return the mean batch loss.

    An empty batch is skipped unless ``step_on_empty``: DP-SGD with Poisson
    sampling must take its (noise-only) step on an empty batch too, or the skip
    itself would reveal that no example was sampled. Returns NaN when no batch
    had examples. Torch's plain SGD steps through :func:`_plain_sgd_step` (the same
    weights, bit for bit). Batches go to the model's device; the losses stay there until
    the end (no host sync per step on a GPU).
    """
    model.train()
    criterion = criterion if criterion is not None else nn.functional.cross_entropy
    losses: list[torch.Tensor] = []
    device = model_device(model)
    on_cpu = device.type == "cpu"
    step = _plain_sgd_step(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(epochs):
        for x, y in loader:
            if len(y) == 0 and not step_on_empty:
                continue
            if not on_cpu:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if step is None:
                optimizer.zero_grad(set_to_none=True)
            else:  # what zero_grad(set_to_none=True) does, without its profiling hook
                for param in params:
                    param.grad = None
            loss = criterion(model(x), y)
            loss.backward()
            if step is None:
                optimizer.step()
            else:
                step()
            if len(y):
                losses.append(loss.detach())
    if not losses:
        return float("nan")
    return float(np.mean(torch.stack(losses).double().cpu().numpy()))


@torch.no_grad()
def evaluate(model: nn.Module, data: ArrayDataset, batch_size: int = 1024) -> EvalResult:
    """Loss and accuracy of ``model`` on ``data`` (NaN loss and accuracy if empty)."""
    if len(data) == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    device = model_device(model)
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(data.y[start : start + batch_size]).to(device)
        logits = model(x)
        total_loss += float(criterion(logits, y))
        correct += int((logits.argmax(dim=1) == y).sum())
    return EvalResult(total_loss / len(data), correct / len(data), len(data))
