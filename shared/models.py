"""Model registry shared by server and clients.

Every registered model uses GroupNorm (never BatchNorm), so it passes
``opacus.validators.ModuleValidator.validate(model, strict=True)`` and per-sample
gradients are well defined. Models are built deterministically from
``torch.manual_seed`` state at construction time; callers that need identical
initial weights on every party seed before calling :func:`get_model` (the server
does, and ships its weights to the clients anyway).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class UnknownModelError(ValueError):
    """Raised for a model name that is not in the registry."""


@dataclass(frozen=True)
class InputSpec:
    """Shape of one input example (without the batch dimension) and class count."""

    shape: tuple[int, ...]
    num_classes: int


def _groups(channels: int, preferred: int = 8) -> int:
    """Largest group count <= preferred that divides ``channels``."""
    for g in range(min(preferred, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class MLP(nn.Module):
    """Fully connected network on flattened inputs."""

    def __init__(self, spec: InputSpec, hidden: tuple[int, ...] = (256, 100)) -> None:
        super().__init__()
        dims = [math.prod(spec.shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], spec.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN1D(nn.Module):
    """The MNIST-1D paper's CNN (Greydanus & Kobak) with GroupNorm.

    Three stride-2 convolutions of 25 channels and a linear head; about 6k
    parameters for length-40 signals. Accepts ``(B, L)`` or ``(B, 1, L)``.
    """

    def __init__(self, spec: InputSpec, channels: int = 25) -> None:
        super().__init__()
        length = spec.shape[-1]
        g = _groups(channels, 5)
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.GroupNorm(g, channels), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.GroupNorm(g, channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.GroupNorm(g, channels),
            nn.ReLU(),
        )
        out_len = self.features(torch.zeros(1, 1, length)).shape[-1]
        self.head = nn.Linear(channels * out_len, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))


class CNN2D(nn.Module):
    """Two 5x5 convolutions with max-pooling and a 2-layer head (the DP-SGD benchmark CNN).

    Accepts ``(B, H, W)`` or ``(B, C, H, W)``.
    """

    def __init__(self, spec: InputSpec, channels: tuple[int, int] = (16, 32), hidden: int = 128):
        super().__init__()
        c_in = spec.shape[0] if len(spec.shape) == 3 else 1
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(c_in, c1, 5, padding=2), nn.GroupNorm(_groups(c1), c1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.GroupNorm(_groups(c2), c2), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        h, w = spec.shape[-2:]
        flat = self.features(torch.zeros(1, c_in, h, w)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(),
                                  nn.Linear(hidden, spec.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.GroupNorm(_groups(c_out), c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet (3 stages of basic blocks) with GroupNorm, for 2-D inputs."""

    def __init__(self, spec: InputSpec, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        c_in = spec.shape[0] if len(spec.shape) == 3 else 1
        self.stem = nn.Sequential(nn.Conv2d(c_in, widths[0], 3, padding=1, bias=False),
                                  nn.GroupNorm(_groups(widths[0]), widths[0]), nn.ReLU())
        blocks: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            blocks.append(_BasicBlock(c, w, stride=1 if i == 0 else 2))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(c, spec.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.head(self.blocks(self.stem(x)))


class Logistic(nn.Module):
    """Multinomial logistic regression on flattened inputs."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(spec.shape), spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "logistic": Logistic,
    "mlp": MLP,
    "cnn1d": CNN1D,
    "cnn2d": CNN2D,
    "resnet": ResNet,
}

#: Example input each model is exercised with in tests and benchmarks.
DEFAULT_SPECS: dict[str, InputSpec] = {
    "logistic": InputSpec((40,), 10),
    "mlp": InputSpec((40,), 10),
    "cnn1d": InputSpec((40,), 10),
    "cnn2d": InputSpec((1, 28, 28), 10),
    "resnet": InputSpec((1, 16, 16), 10),
}


def model_names() -> tuple[str, ...]:
    """Names accepted by :func:`get_model`, sorted."""
    return tuple(sorted(_REGISTRY))


def get_model(name: str, spec: InputSpec | None = None, **kwargs: object) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`model_names`.
        spec: input shape and class count; defaults to ``DEFAULT_SPECS[name]``.
        **kwargs: architecture options of that model (e.g. ``hidden`` for ``mlp``).

    Raises:
        UnknownModelError: ``name`` is not registered; the message lists the valid names.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; expected one of: {', '.join(model_names())}"
        ) from None
    return factory(spec or DEFAULT_SPECS[name], **kwargs)
