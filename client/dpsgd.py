"""DP-SGD for one federated round: Opacus does sampling, noise and accounting.

Three clipping engines compute the same clipped sum ``sum_i min(1, C/||g_i||) g_i``
(:class:`ClippingMode`): privfed's one-backward book-keeping engine
(:mod:`kernels.per_sample`), and Opacus' ``hooks`` and ``ghost`` modes for comparison.
In every mode:

* batches come from Opacus' ``DPDataLoader`` (Poisson sampling, rate ``1 / len(loader)``);
* Gaussian noise of std ``noise_multiplier * max_grad_norm`` is added by an Opacus
  optimizer (``DPOptimizer`` or ``DPOptimizerFastGradientClipping``) to the clipped sum,
  which is then divided by the expected batch size; the noise itself comes from an
  injectable :data:`NoiseFn` (default: :func:`default_noise_fn`);
* every noisy step calls the optimizer's step hook, so an Opacus accountant passed in
  sees it (``accountant.get_epsilon(delta)`` works) and :attr:`PrivateRound.steps` counts it;
* the model is never wrapped: hooks go on the plain module and :meth:`PrivateRound.finish`
  removes all of them (and Opacus' parameter attributes), so making the same model private
  again next round never stacks hooks.

Usage (one round)::

    preflight(model)
    rnd = make_private_round(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             train_set, batch_size=32, noise_multiplier=1.1,
                             max_grad_norm=1.0, accountant=site_accountant)
    for x, y in rnd.data_loader:
        rnd.optimizer.zero_grad()
        rnd.criterion(rnd.model(x), y).backward()
        rnd.optimizer.step()
    state = rnd.finish()     # plain state dict; rnd.sample_rate, rnd.steps for the ledger
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from opacus.accountants import IAccountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kernels.keys import MaskKey
from kernels.noise import gaussian_noise
from kernels.per_sample import BookKeepingClipper, LossReduction, UnsupportedLayerError

#: ``(shape, std, device) -> Tensor`` of i.i.d. N(0, std^2) float32 samples: a fresh tensor
#: of its own (the optimizer adds the clipped sum into it in place).
NoiseFn = Callable[[tuple[int, ...], float, torch.device], torch.Tensor]

#: Attributes Opacus' optimizers and hooks set on parameters; removed by ``finish``.
_PARAM_ATTRS = (*OPACUS_PARAM_MONKEYPATCH_ATTRS, "summed_grad", "_processed")


class ClippingMode(Enum):
    """Which engine computes the per-sample clipped gradient sum."""

    PRIVFED = "privfed"  #: one forward, one backward book-keeping (kernels.per_sample)
    HOOKS = "hooks"  #: Opacus GradSampleHooks + DPOptimizer (materialises per-sample grads)
    GHOST = "ghost"  #: Opacus ghost clipping (two backward passes)


class PreflightError(ValueError):
    """The model cannot be trained with DP-SGD as it is; the message says how to fix it."""


def preflight(model: nn.Module, mode: ClippingMode = ClippingMode.PRIVFED) -> None:
    """Check a model for DP-SGD before any training.

    Runs ``ModuleValidator.validate(model, strict=False)`` and, for ``PRIVFED``, the
    book-keeping engine's layer check.

    Raises:
        PreflightError: one error listing every offending layer by qualified name and
            type, each with its fix (e.g. "replace BatchNorm2d at features.1 with
            GroupNorm; ModuleValidator.fix(model) does it").
    """
    if not isinstance(model, nn.Module):
        raise PreflightError(f"expected an nn.Module, got {type(model).__name__}")
    lines = []
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        lines = _named_problems(model) or [" ".join(str(e).split()) for e in errors]
    if ClippingMode(mode) is ClippingMode.PRIVFED:
        try:
            BookKeepingClipper(model, 1.0).remove()
        except UnsupportedLayerError as e:
            lines.append(str(e))
    if lines:
        raise PreflightError(
            f"model is not DP-SGD compatible ({len(lines)} problem(s)):\n"
            + "\n".join(f"  - {line}" for line in lines)
        )


def _named_problems(model: nn.Module) -> list[str]:
    """ModuleValidator's per-layer findings, with the layer's name and the fix."""
    lines = [] if model.training else ["model is in eval mode; call model.train() first"]
    for name, sub in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(sub))
        for err in validator(sub) if validator else ():
            lines.append(_describe(name or "<root>", sub, err))
    return lines


def _describe(name: str, module: nn.Module, error: Exception) -> str:
    kind = type(module).__name__
    fix = _FIXES.get(kind.rstrip("123d").rstrip("_"))
    if fix is None:
        first = " ".join(str(error).split()).split(". ")[0]
        return f"{kind} at {name}: {first}"
    return f"replace {kind} at {name} with {fix}; ModuleValidator.fix(model) does it"


#: Layer family -> what ModuleValidator.fix substitutes (for the message only).
_FIXES = {
    "BatchNorm": "GroupNorm (BatchNorm mixes samples in a batch)",
    "SyncBatchNorm": "GroupNorm (BatchNorm mixes samples in a batch)",
    "InstanceNorm": "InstanceNorm(track_running_stats=False) or GroupNorm",
    "LSTM": "opacus.layers.DPLSTM",
    "GRU": "opacus.layers.DPGRU",
    "RNN": "opacus.layers.DPRNN",
    "MultiheadAttention": "opacus.layers.DPMultiheadAttention",
}


def default_noise_fn() -> NoiseFn:
    """The noise source used when none is injected: a CSPRNG Gaussian.

    Each draw is :func:`kernels.gaussian_noise` (ChaCha20 stream, Box-Muller with a 63-bit
    radius: tails to 9.4 sigma) under a fresh key and nonce from ``secrets`` (the OS
    CSPRNG), so no key is ever reused and the noise is unpredictable to anyone who sees the
    model.
    """

    def noise(shape: tuple[int, ...], std: float, device: torch.device) -> torch.Tensor:
        key = MaskKey(secrets.token_bytes(32), secrets.token_bytes(12))
        return gaussian_noise(math.prod(shape), std, key, device=device).view(shape)

    return noise


def torch_noise_fn(generator: torch.Generator | None = None) -> NoiseFn:
    """``torch.normal`` noise (what Opacus uses outside ``secure_mode``).

    No faster than :func:`default_noise_fn` on CPU any more (both ~0.6 ms for 215k floats,
    1 thread), and its float32 draws are cut at 5.8 sigma (24-bit uniforms).

    Mersenne Twister is *not* a CSPRNG: for tests and benchmarks; production keeps
    :func:`default_noise_fn`. Default generator: seeded with 63 bits from ``secrets``. The
    draw is made on the generator's device, then moved to the parameters' device.
    """
    gen = generator or torch.Generator().manual_seed(secrets.randbits(63))

    def noise(shape: tuple[int, ...], std: float, device: torch.device) -> torch.Tensor:
        return torch.normal(0.0, std, size=tuple(shape), generator=gen,
                            device=gen.device).to(device)

    return noise


def _tiled_base(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D contiguous tensor whose whole length ``tensors`` tile, in order, as contiguous
    views (the per-step gradient buffer of :class:`~kernels.per_sample.BookKeepingClipper`),
    else ``None``. An elementwise op on it is then that op on every tensor, in one kernel."""
    base = tensors[0]._base if tensors else None
    if base is None or base.dim() != 1 or not base.is_contiguous():
        return None
    end = base.storage_offset()
    for t in tensors:
        if t._base is not base or t.storage_offset() != end or not t.is_contiguous():
            return None
        end += t.numel()
    return base if end == base.storage_offset() + base.numel() else None


class _InjectedNoise:
    """Mixin for Opacus optimizers: draw the Gaussian noise from ``self.noise_fn``.

    One call per step for all parameters (one flat draw, split per parameter); the std is
    Opacus' ``noise_multiplier * max_grad_norm``; std 0 adds nothing. ``p.grad`` becomes a
    new tensor (a view of that step's fresh draw, the sum added in place; ``summed_grad`` is
    left as it was), as in Opacus. When the summed grads are views tiling one flat buffer
    (the book-keeping engine writes them so), the sum is added and the grads scaled with one
    op each instead of one per parameter: the same values.
    """

    noise_fn: NoiseFn

    def add_noise(self) -> None:
        nm = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = float(nm * self.max_grad_norm)
        params = self.params
        summed = [p.summed_grad for p in params]
        for g in summed:
            _check_processed_flag(g)
        sizes = [g.numel() for g in summed]
        if std > 0 and sum(sizes):
            flat = self.noise_fn((sum(sizes),), std, params[0].device)
            base = _tiled_base(summed)
            if base is not None:
                flat = (flat if flat.dtype == base.dtype else flat.to(base.dtype)).add_(base)
                noisy = [n.view(g.shape)
                         for n, g in zip(flat.split_with_sizes(sizes), summed, strict=True)]
            else:
                noisy = [n.view_as(g) if n.dtype == g.dtype else n.view_as(g).to(g.dtype)
                         for n, g in zip(flat.split(sizes), summed, strict=True)]
                torch._foreach_add_(noisy, summed)  # in place: the grads are views of the draw
        else:
            noisy = [g.clone() for g in summed]
        for p, g in zip(params, noisy, strict=True):
            p.grad = g if g.shape == p.shape else g.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Divide by the expected batch size (``loss_reduction="mean"``): one op on the flat
        noise draw when the grads tile it, else one fused call."""
        if self.loss_reduction == "mean":
            grads = [p.grad for p in self.params]
            divisor = self.expected_batch_size * self.accumulated_iterations
            base = _tiled_base(grads)
            if base is not None:
                base.div_(divisor)
            else:
                torch._foreach_div_(grads, divisor)


class _NoisyFastOptimizer(_InjectedNoise, DPOptimizerFastGradientClipping):
    """Opacus ``DPOptimizerFastGradientClipping`` (``p.grad`` = clipped sum) with injected noise.

    ``accumulate`` takes over ``p.grad`` as ``summed_grad`` instead of deep-copying it (and
    clears ``p.grad``, so ``zero_grad(set_to_none=False)`` cannot zero the sum of a skipped
    step); later backward passes before a step add into it, as in Opacus. The very tensor is
    taken (detached only if it has autograd history), so views of one flat buffer stay views.
    """

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Opacus' ``zero_grad``, but ``set_to_none`` defaults to ``True`` as in torch: the next
        backward then assigns the clipped sums instead of adding them to zeros."""
        super().zero_grad(set_to_none)

    def accumulate(self) -> None:
        for p in self.params:
            if p.grad is None:
                raise RuntimeError("a trainable parameter got no gradient before step()")
            g = p.grad.detach() if p.grad.requires_grad else p.grad
            if p.summed_grad is None:
                p.summed_grad = g
            else:
                p.summed_grad.add_(g)
            p.grad = None


class _NoisyDPOptimizer(_InjectedNoise, DPOptimizer):
    """Opacus ``DPOptimizer`` (clips materialised per-sample grads) with injected noise."""


@dataclass
class PrivateRound:
    """The objects to run one DP-SGD round with, and what the ledger needs afterwards.

    Attributes:
        model: the plain module to call (the very object passed in; never wrapped).
        optimizer: Opacus optimizer: ``zero_grad()``, ``step()`` as usual.
        criterion: the loss to call as ``criterion(output, target)`` (wrapped in GHOST mode).
        data_loader: Poisson-sampled ``DPDataLoader`` (batches may be empty).
        sample_rate: Poisson sampling rate ``q`` used for accounting.
        expected_batch_size: ``q * len(dataset)`` (rounded down, as Opacus); the divisor.
        noise_multiplier, max_grad_norm, mode: as requested.
    """

    model: nn.Module
    optimizer: DPOptimizer
    criterion: Callable[..., Any]
    data_loader: DataLoader
    sample_rate: float
    expected_batch_size: int
    noise_multiplier: float
    max_grad_norm: float
    mode: ClippingMode
    _detach: Callable[[], None] = field(repr=False)
    _steps: list[int] = field(default_factory=lambda: [0], repr=False)
    _finished: bool = field(default=False, repr=False)

    @property
    def steps(self) -> int:
        """Noisy optimizer steps taken so far (skipped steps are not counted)."""
        return self._steps[0]

    def finish(self) -> dict[str, torch.Tensor]:
        """End the round: remove every hook and Opacus attribute; return a plain state dict.

        Idempotent. The returned tensors are detached copies whose keys equal
        ``model.state_dict()`` of the plain model (no ``_module.`` prefix).
        """
        if not self._finished:
            self._detach()
            _strip_param_attrs(self.model)
            self._finished = True
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def __enter__(self) -> PrivateRound:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def _strip_param_attrs(model: nn.Module) -> None:
    for p in model.parameters():
        for attr in _PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and value == value and value < float("inf")
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _as_loader(data: DataLoader | Dataset, batch_size: int | None) -> DataLoader:
    if isinstance(data, DataLoader):
        if batch_size is not None:
            raise ValueError("batch_size is taken from the DataLoader; do not pass it too")
        return data
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a DataLoader or a Dataset, got {type(data).__name__}")
    if not (isinstance(batch_size, int) and 0 < batch_size <= len(data)):
        raise ValueError(f"batch_size must be an int in [1, {len(data)}], got {batch_size!r}")
    return DataLoader(data, batch_size=batch_size)


def make_private_round(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DataLoader | Dataset,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    mode: ClippingMode = ClippingMode.PRIVFED,
    batch_size: int | None = None,
    criterion: Callable[..., Any] | None = None,
    noise_fn: NoiseFn | None = None,
    accountant: IAccountant | None = None,
    sampling_generator: torch.Generator | None = None,
) -> PrivateRound:
    """Make ``model``/``optimizer``/``data`` private for one round (see module docstring).

    Args:
        model: plain module (run :func:`preflight` first); stays unwrapped.
        optimizer: torch optimizer over ``model``'s parameters (wrapped by Opacus).
        data: a ``DataLoader`` (its batch size sets the sample rate ``1 / len(loader)``), or
            a ``Dataset`` with ``batch_size``.
        noise_multiplier: noise std over ``max_grad_norm`` (>= 0; calibrated elsewhere).
        max_grad_norm: per-sample L2 clipping bound (> 0).
        mode: clipping engine; all modes give the same clipped sums.
        criterion: loss with ``reduction="mean"`` (default ``nn.CrossEntropyLoss()``).
        noise_fn: Gaussian source; default :func:`default_noise_fn`.
        accountant: Opacus accountant to record every step (its hook gets ``sample_rate``).
        sampling_generator: generator for Poisson sampling (default: seeded from ``secrets``).

    Raises:
        PreflightError: the model fails Opacus' validator (only HOOKS/GHOST check here;
            call :func:`preflight` yourself before any training).
        kernels.per_sample.UnsupportedLayerError: PRIVFED mode and an unsupported layer.
        ValueError, TypeError: invalid arguments (the message names the argument).
    """
    noise_multiplier = _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    max_grad_norm = _check_positive("max_grad_norm", max_grad_norm)
    mode = ClippingMode(mode)
    _check_optimizer(model, optimizer)
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    if getattr(criterion, "reduction", "mean") != "mean":
        raise ValueError(f"criterion.reduction must be 'mean', got {criterion.reduction!r}")
    loader = _as_loader(data, batch_size)
    if sampling_generator is None:
        sampling_generator = torch.Generator().manual_seed(secrets.randbits(63))
    dp_loader = DPDataLoader.from_data_loader(loader, generator=sampling_generator)
    sample_rate = 1 / len(loader)
    expected = int(len(loader.dataset) * sample_rate)
    detach, opt_cls, hooks = _attach(model, mode, max_grad_norm)
    dp_opt = opt_cls(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                     expected_batch_size=expected, loss_reduction="mean")
    dp_opt.noise_fn = noise_fn if noise_fn is not None else default_noise_fn()
    steps = [0]
    dp_opt.attach_step_hook(_step_hook(steps, accountant, sample_rate))
    if mode is ClippingMode.GHOST:
        criterion = DPLossFastGradientClipping(hooks, dp_opt, criterion, "mean")
    return PrivateRound(model, dp_opt, criterion, dp_loader, sample_rate, expected,
                        noise_multiplier, max_grad_norm, mode, _detach=detach, _steps=steps)


def _check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if isinstance(optimizer, DPOptimizer):
        raise TypeError("pass the plain torch optimizer, not an Opacus DPOptimizer")
    owned = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        if any(id(p) not in owned for p in group["params"]):
            raise ValueError("optimizer holds parameters that are not the model's")


def _attach(model: nn.Module, mode: ClippingMode, max_grad_norm: float):
    """Install the mode's hooks; return (remover, optimizer class, hooks object)."""
    if mode is ClippingMode.PRIVFED:
        clipper = BookKeepingClipper(model, max_grad_norm, LossReduction.MEAN)
        return clipper.remove, _NoisyFastOptimizer, clipper
    if ModuleValidator.validate(model, strict=False):
        preflight(model, mode)
    if mode is ClippingMode.HOOKS:
        hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean")
        return hooks.cleanup, _NoisyDPOptimizer, hooks
    hooks = GradSampleHooksFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm)
    return hooks.cleanup, _NoisyFastOptimizer, hooks


def _step_hook(steps: list[int], accountant: IAccountant | None, sample_rate: float):
    account = None if accountant is None else accountant.get_optimizer_hook_fn(sample_rate)

    def hook(optim: DPOptimizer) -> None:
        steps[0] += 1
        if account is not None:
            account(optim)

    return hook
