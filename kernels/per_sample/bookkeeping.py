"""Book-keeping DP clipping: one forward, one backward, clipped sums in ``p.grad``.

:class:`BookKeepingClipper` attaches removable hooks to a plain ``nn.Module``:

* forward: every supported layer runs with *detached aliases* of its trainable
  parameters, so autograd never computes (or writes) the non-private parameter
  gradient; the layer input is kept and the output gets a gradient tap;
* fused layers (``rule.fuses_backward``: GroupNorm whose input needs a gradient): the
  engine takes over the layer's backward, and one kernel call gives the input gradient
  and the per-sample grads (the layer's own autograd node is dropped unused). Such a
  layer runs on a contiguous copy of a channels-last input (its output is handed back in
  the caller's layout; its input gradient comes back contiguous);
* backward: each tap turns ``(input, grad_output)`` into squared per-sample norms
  (see :mod:`kernels.per_sample.layers`), and a callback queued on the autograd engine
  runs once the whole backward pass is done: it forms Opacus' clip factors
  ``c_i = min(1, C / (||grad_i|| + 1e-6))`` over *all* parameters and writes
  ``p.grad += sum_i c_i * grad_i`` for every trainable parameter of the model.

Performance: each layer keeps a :class:`~kernels.per_sample.workspace.Workspace` of scratch
buffers across steps, and construction calls :func:`~kernels.per_sample.workspace.warm_heap`
once per process (no effect on results; see that module for why both matter on CPU).

Guarantees, for a loss that is a sum (``"sum"``) or mean (``"mean"``) over the batch of
per-sample losses: every sample contributes at most ``max_grad_norm`` (L2, over all
parameters) to the summed ``p.grad`` of one backward pass, exactly the clipped sum of
Opacus' ``DPOptimizer`` (to float rounding). A zero gradient has factor 1; an empty
batch writes zeros. Parameters of layers that did not run, or got no gradient, get zeros,
so every trainable parameter has a ``.grad`` after backward. A model containing a layer
type with trainable parameters outside :data:`~kernels.per_sample.layers.RULES` is
refused at attach time (:class:`UnsupportedLayerError`), as is a layer run twice in one
forward (shared parameters): both would otherwise be silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any

import torch
from torch import nn

from .clip import clip_factors_from_norms
from .layers import RULES, UnsupportedLayerError, supported_layer_names
from .workspace import Workspace, relayout_copy, warm_heap


class LossReduction(StrEnum):
    """How the training loss combines per-sample losses."""

    MEAN = "mean"
    SUM = "sum"


class PerSampleUsageError(ValueError):
    """The model was driven in a way the engine cannot clip exactly (e.g. a layer ran twice)."""


@dataclass
class _Layer:
    name: str
    module: nn.Module
    rule: type
    names: tuple[str, ...]
    saved: dict[str, nn.Parameter] = field(default_factory=dict)
    ws: Workspace = field(default_factory=Workspace)  # scratch reused across steps
    relaid: torch.Tensor | None = None  # the caller's input, if the layer ran on a copy


@dataclass
class _Entry:
    layer: _Layer
    x: torch.Tensor | None
    out: torch.Tensor | None = None
    out_version: int = -1
    stats: Any = None
    sq: torch.Tensor | None = None
    state: Any = None


@dataclass
class _Record:
    entries: dict[str, _Entry] = field(default_factory=dict)
    batch_size: int | None = None
    queued: bool = False
    done: bool = False


class _Attach(torch.autograd.Function):
    """In-place identity that reports the output gradient of a layer whose output has no
    autograd history (first layer: input and detached parameters need no grad).

    The output is returned as the same tensor, marked dirty (no copy of a possibly large
    activation); it then has this node as its history, so later in-place ops are fine.
    """

    @staticmethod
    def forward(ctx, out, anchor, callback):  # noqa: ARG004 - anchor only links the graph
        ctx.callback = callback
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        ctx.callback(grad)
        return None, None, None


class _Fused(torch.autograd.Function):
    """Takes over a layer's backward: in place of the layer's own autograd node (dropped,
    never run), the rule computes the input gradient together with the per-sample norms.

    The output is returned as the same tensor, marked dirty (as in :class:`_Attach`).
    """

    @staticmethod
    def forward(ctx, out, x, backward):  # noqa: ARG004 - x only links the graph
        ctx.backward = backward
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.backward(grad), None


class _Contiguous(torch.autograd.Function):
    """``x.contiguous()`` by :func:`~kernels.per_sample.workspace.relayout_copy` (faster on
    CPU); the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, x):
        return relayout_copy(torch.empty(x.shape, dtype=x.dtype, device=x.device), x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _trainable_layers(model: nn.Module) -> list[_Layer]:
    """Supported layers that own trainable parameters; refuses unsupported ones."""
    layers, bad = [], []
    for name, m in model.named_modules():
        names = tuple(n for n, p in m.named_parameters(recurse=False) if p.requires_grad)
        if not names:
            continue
        rule = RULES.get(type(m))
        if rule is None:
            bad.append(f"{name or '<root>'} ({type(m).__name__})")
            continue
        try:
            rule.check(m)
        except UnsupportedLayerError as e:
            bad.append(f"{name or '<root>'} ({type(m).__name__}: {e})")
            continue
        layers.append(_Layer(name, m, rule, names))
    if bad:
        raise UnsupportedLayerError(
            f"book-keeping clipping cannot handle trainable layers: {'; '.join(bad)}. "
            f"Supported: {supported_layer_names()}. Freeze them, replace them, or use "
            "Opacus' hooks mode."
        )
    return layers


class BookKeepingClipper:
    """Per-sample clipping hooks on a plain module (see the module docstring).

    Args:
        model: the module to train; stays a plain ``nn.Module`` (nothing wrapped).
        max_grad_norm: per-sample L2 bound ``C`` (> 0, finite).
        loss_reduction: ``MEAN`` if the loss is averaged over the batch (grad_outputs are
            then scaled by the batch size, as Opacus does), ``SUM`` if summed.

    Raises:
        UnsupportedLayerError: a trainable layer type or configuration is not supported.
        ValueError: ``max_grad_norm`` is not a positive finite number.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float,
                 loss_reduction: LossReduction | str = LossReduction.MEAN) -> None:
        if not (isinstance(max_grad_norm, int | float) and 0 < max_grad_norm < float("inf")):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.loss_reduction = LossReduction(loss_reduction)
        self.layers = _trainable_layers(model)
        warm_heap()  # performance only: see kernels.per_sample.workspace
        self.per_sample_norms: torch.Tensor | None = None
        self.clip_factors: torch.Tensor | None = None
        self._record: _Record | None = None
        self._handles = [model.register_forward_pre_hook(self._new_record, prepend=True)]
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_pre_hook(
                partial(self._swap_in, layer)))
            self._handles.append(layer.module.register_forward_hook(
                partial(self._capture, layer), always_call=True))

    @property
    def attached(self) -> bool:
        """Whether hooks are installed."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook and restore any swapped parameter. Idempotent."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self.layers:
            self._restore(layer)
            layer.ws.clear()
        self._record = None

    # -- forward ----------------------------------------------------------------------------

    def _new_record(self, module, args) -> None:
        if torch.is_grad_enabled():
            self._record = _Record()

    def _swap_in(self, layer: _Layer, module, args):
        if not torch.is_grad_enabled():
            return None
        for n in layer.names:
            p = module._parameters[n]
            layer.saved[n] = p
            module._parameters[n] = p.detach()
        x = args[0] if args else None
        if (layer.rule.fuses_backward and isinstance(x, torch.Tensor) and x.requires_grad
                and not x.is_contiguous() and layer.rule.relayout_pays(x)):
            # The fused backward needs a contiguous input; the layer then runs on the copy
            # (whose autograd node is dropped with the layer's own in _capture).
            layer.relaid = x
            return (_Contiguous.apply(x), *args[1:])
        return None

    def _restore(self, layer: _Layer) -> None:
        for n, p in layer.saved.items():
            layer.module._parameters[n] = p
        layer.saved.clear()

    def _capture(self, layer: _Layer, module, args, output):
        swapped, relaid, layer.relaid = bool(layer.saved), layer.relaid, None
        self._restore(layer)
        if not swapped:
            return None
        record = self._record if self._record is not None else _Record()
        self._record = record
        if layer.name in record.entries:
            raise PerSampleUsageError(
                f"layer {layer.name!r} ran twice in one forward pass (shared parameters); "
                "book-keeping clipping needs one call per layer per step"
            )
        x = args[0].detach()
        entry = _Entry(layer, x)
        record.entries[layer.name] = entry
        record.batch_size = x.shape[0] if record.batch_size is None else record.batch_size
        if (layer.rule.fuses_backward and args[0].requires_grad and x.shape[0] > 0
                and x.is_contiguous()):
            entry.stats = layer.rule.saved_stats(output)
            if entry.stats is not None:
                return self._fuse(entry, record, output, relaid if relaid is not None else args[0])
        result = None
        if relaid is not None:  # not fused after all: hand back the caller's layout
            result = output = torch.empty_like(relaid).copy_(output)
        callback = partial(self._on_grad, record, entry)
        if output.requires_grad:
            output.register_hook(callback)
        else:
            result = output = _Attach.apply(output, module._parameters[layer.names[0]], callback)
        if layer.rule.keeps_output:  # after _Attach: it bumps the version counter
            entry.out, entry.out_version = output.detach(), output._version
            entry.stats = layer.rule.saved_stats(output)
        return result

    def _fuse(self, entry: _Entry, record: _Record, output: torch.Tensor,
              x: torch.Tensor) -> torch.Tensor:
        """Route the layer's backward through :meth:`_on_fused_grad`. The output keeps the
        layout of the caller's input ``x``; the input gradient comes back contiguous."""
        out = output.detach()
        if out.stride() != x.stride():
            out = relayout_copy(torch.empty_like(x), out)
        return _Fused.apply(out, x, partial(self._on_fused_grad, record, entry))

    # -- backward ---------------------------------------------------------------------------

    def _start(self, record: _Record) -> None:
        """Check that ``record`` is the live step; queue its finalisation once."""
        if record is not self._record or record.done:
            raise PerSampleUsageError(
                "backward through a forward pass that was already used (or superseded); "
                "run forward then backward exactly once per step"
            )
        if not record.queued:
            record.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(
                partial(self._finalize, record))

    def _on_fused_grad(self, record: _Record, entry: _Entry,
                       grad: torch.Tensor) -> torch.Tensor:
        self._start(record)
        layer = entry.layer
        dx, entry.sq, entry.state = layer.rule.fused_backward(layer.module, entry.x, grad,
                                                              entry.stats, layer.ws)
        entry.x = entry.stats = None
        return dx

    def _on_grad(self, record: _Record, entry: _Entry, grad: torch.Tensor) -> None:
        self._start(record)
        layer = entry.layer
        if entry.out is None:
            entry.sq, entry.state = layer.rule.norms(layer.module, entry.x, grad, layer.ws)
        else:  # the output may have been modified in place since: then do not use it
            out = entry.out if entry.out._version == entry.out_version else None
            entry.sq, entry.state = layer.rule.norms(layer.module, entry.x, grad, layer.ws,
                                                     y=out, stats=entry.stats)
        entry.x = entry.out = entry.stats = None

    def _finalize(self, record: _Record) -> None:
        record.done = True
        b = record.batch_size or 0
        scale = float(b) if self.loss_reduction is LossReduction.MEAN else 1.0
        sq = [e.sq for e in record.entries.values() if e.sq is not None]
        if not sq:
            total = next(iter(self.model.parameters())).new_zeros(b)
        else:
            total = sq[0] if len(sq) == 1 else torch.stack(sq).sum(0)
        norms = total.sqrt_() if scale == 1.0 else total.sqrt_().mul_(scale)
        coef = clip_factors_from_norms(norms, self.max_grad_norm)
        self.per_sample_norms, self.clip_factors = norms, coef
        weights = coef if scale == 1.0 else coef * scale
        for layer in self.layers:
            entry = record.entries.get(layer.name)
            sums = (layer.rule.sums(layer.module, entry.state, weights)
                    if entry is not None and entry.sq is not None else {})
            self._write(layer, sums)

    @staticmethod
    def _write(layer: _Layer, sums: dict[str, torch.Tensor]) -> None:
        """``p.grad = sum`` (fresh tensors from the rules), or ``p.grad += sum`` in place."""
        params = layer.module._parameters
        for n in layer.names:
            p = params[n]
            g = sums.get(n)
            if g is None:
                g = torch.zeros_like(p)
            else:
                if g.dtype != p.dtype:
                    g = g.to(p.dtype)
                if g.shape != p.shape:
                    g = g.view_as(p)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
