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
* backward: each tap turns ``(input, grad_output)`` into the layer's per-sample state
  (see :mod:`kernels.per_sample.layers`), and a callback queued on the autograd engine
  runs once the whole backward pass is done: the rules write per-sample norms as rows of
  one ``(rows, B)`` buffer, one reduction over it gives the norms over *all* parameters,
  then Opacus' clip factors ``c_i = min(1, C / (||grad_i|| + 1e-6))``, and the rules write
  ``sum_i c_i * grad_i`` into one fresh flat buffer per step whose views become
  ``p.grad`` (or are added to an existing ``p.grad``).

Performance: each layer keeps a :class:`~kernels.per_sample.workspace.Workspace` of scratch
buffers across steps, and construction calls :func:`~kernels.per_sample.workspace.warm_heap`
once per process (no effect on results; see that module for why both matter on CPU). The
per-step work outside the layers' kernels is a fixed, small number of torch ops (one norm
buffer, one reduction, the clip factors, one gradient buffer): on CPU every op costs
microseconds of dispatch, more when big kernels have just evicted the caches. The
``p.grad`` views of one flat buffer also let the optimizer add noise and scale with one op
each (:mod:`client.dpsgd`). Nothing is read back to the host (a GroupNorm without saved
statistics aside: see :mod:`kernels.per_sample.group_norm`).

Guarantees, for a loss that is a sum (``"sum"``) or mean (``"mean"``) over the batch of
per-sample losses: every sample contributes at most ``max_grad_norm`` (L2, over all
parameters) to the summed ``p.grad`` of one backward pass, exactly the clipped sum of
Opacus' ``DPOptimizer`` (to float rounding). A zero gradient has factor 1; an empty
batch writes zeros. Parameters of layers that did not run, or got no gradient, get zeros,
so every trainable parameter has a ``.grad`` after backward. A model containing a layer
type with trainable parameters outside :data:`~kernels.per_sample.layers.RULES` is
refused at attach time (:class:`UnsupportedLayerError`), as is a layer run twice in one
forward (shared parameters) or on another batch size than the first layer: these would
otherwise be silently wrong.
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


@dataclass(eq=False)
class _Layer:
    name: str
    module: nn.Module
    rule: type
    names: tuple[str, ...]
    # Its rows of the step's norm buffer, and its parameters' positions in
    # BookKeepingClipper.params: one per trainable parameter, in the same order.
    index: slice | None = None
    saved: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    ws: Workspace = field(default_factory=Workspace)  # scratch reused across steps
    relaid: torch.Tensor | None = None  # the caller's input, if the layer ran on a copy


@dataclass(eq=False, slots=True)
class _Entry:
    layer: _Layer
    x: torch.Tensor | None
    out: torch.Tensor | None = None
    out_version: int = -1
    stats: Any = None
    state: Any = None  # the rule's state once the layer's gradient arrived


@dataclass(eq=False, slots=True)
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


def _fresh_grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Uninitialised tensors shaped like ``params``: views of one flat buffer when they share
    a dtype and device (one allocation; the optimizer can then treat them as one tensor)."""
    if not params:
        return []
    dtype, device = params[0].dtype, params[0].device
    if any(p.dtype != dtype or p.device != device for p in params):
        return [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]
    sizes = [p.numel() for p in params]
    flat = torch.empty(sum(sizes), dtype=dtype, device=device)
    return [v.view(p.shape) for v, p in zip(flat.split_with_sizes(sizes), params, strict=True)]


class BookKeepingClipper:
    """Per-sample clipping hooks on a plain module (see the module docstring).

    Args:
        model: the module to train; stays a plain ``nn.Module`` (nothing wrapped).
        max_grad_norm: per-sample L2 bound ``C`` (> 0, finite).
        loss_reduction: ``MEAN`` if the loss is averaged over the batch (grad_outputs are
            then scaled by the batch size, as Opacus does), ``SUM`` if summed.

    Attributes:
        per_sample_norms, clip_factors: ``(B,)`` of the last finished backward pass.

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
        rows = 0
        for layer in self.layers:
            layer.index = slice(rows, rows + len(layer.names))
            rows += len(layer.names)
        self._rows = rows
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
    def params(self) -> list[nn.Parameter]:
        """The trainable parameters whose ``.grad`` the engine writes, in model order (read
        from the layers each time: a parameter replaced after attaching is the one used)."""
        return [layer.module._parameters[n] for layer in self.layers for n in layer.names]

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
        params = module._parameters
        for n in layer.names:
            p = params[n]
            layer.saved.append((n, p))
            params[n] = p.detach()
        x = args[0] if args else None
        if (layer.rule.fuses_backward and isinstance(x, torch.Tensor) and x.requires_grad
                and not x.is_contiguous() and layer.rule.relayout_pays(x)):
            # The fused backward needs a contiguous input; the layer then runs on the copy
            # (whose autograd node is dropped with the layer's own in _capture).
            layer.relaid = x
            return (_Contiguous.apply(x), *args[1:])
        return None

    @staticmethod
    def _restore(layer: _Layer) -> None:
        params = layer.module._parameters
        for n, p in layer.saved:
            params[n] = p
        layer.saved.clear()

    def _capture(self, layer: _Layer, module, args, output):
        swapped, relaid, layer.relaid = bool(layer.saved), layer.relaid, None
        self._restore(layer)
        if not swapped:
            return None
        record = self._record
        if record is None:
            record = self._record = _Record()
        if layer.name in record.entries:
            raise PerSampleUsageError(
                f"layer {layer.name!r} ran twice in one forward pass (shared parameters); "
                "book-keeping clipping needs one call per layer per step"
            )
        x = args[0].detach()
        if record.batch_size is None:
            record.batch_size = x.shape[0]
        elif x.shape[0] != record.batch_size:
            raise PerSampleUsageError(
                f"layer {layer.name!r} got a batch of {x.shape[0]}, the first layer one of "
                f"{record.batch_size}; book-keeping clipping needs the batch first everywhere"
            )
        entry = record.entries[layer.name] = _Entry(layer, x)
        rule = layer.rule
        if rule.fuses_backward and args[0].requires_grad and x.shape[0] > 0 and x.is_contiguous():
            entry.stats = rule.saved_stats(output)
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
        if rule.keeps_output:  # after _Attach: it bumps the version counter
            entry.out, entry.out_version = output.detach(), output._version
            entry.stats = rule.saved_stats(output)
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

    def _norm_dtype(self) -> torch.dtype:
        """The parameters' widest float dtype, at least float32 (half-precision per-sample
        grads are normed in float32)."""
        dtype = torch.float32
        for layer in self.layers:
            for n in layer.names:
                t = layer.module._parameters[n].dtype
                if t != dtype:
                    dtype = torch.promote_types(dtype, t)
        return dtype

    def _on_fused_grad(self, record: _Record, entry: _Entry,
                       grad: torch.Tensor) -> torch.Tensor:
        self._start(record)
        layer = entry.layer
        dx, entry.state = layer.rule.fused_backward(layer.module, entry.x, grad, entry.stats,
                                                    layer.names, layer.ws)
        entry.x = entry.stats = None
        return dx

    def _on_grad(self, record: _Record, entry: _Entry, grad: torch.Tensor) -> None:
        self._start(record)
        layer = entry.layer
        if not layer.rule.keeps_output:
            entry.state = layer.rule.collect(layer.module, entry.x, grad, layer.names, layer.ws)
        else:  # the output may have been modified in place since: then do not use it
            y = entry.out if entry.out._version == entry.out_version else None
            entry.state = layer.rule.collect(layer.module, entry.x, grad, layer.names,
                                             layer.ws, y=y, stats=entry.stats)
        entry.x = entry.out = entry.stats = None

    def _finalize(self, record: _Record) -> None:
        record.done = True
        b = record.batch_size or 0
        scale = float(b) if self.loss_reduction is LossReduction.MEAN else 1.0
        params = self.params
        ran = [(layer, e) for layer in self.layers
               if (e := record.entries.get(layer.name)) is not None and e.state is not None]
        rows = torch.zeros((max(self._rows, 1), b), dtype=self._norm_dtype(),
                           device=params[0].device if params else None)
        for layer, e in ran:
            layer.rule.norms(layer.module, e.state, layer.names, rows[layer.index])
        norms = torch.linalg.vector_norm(rows, dim=0)
        if scale != 1.0:
            norms.mul_(scale)
        coef = clip_factors_from_norms(norms, self.max_grad_norm)
        self.per_sample_norms, self.clip_factors = norms, coef
        weights = coef if scale == 1.0 else coef * scale
        grads = _fresh_grads(params)
        if len(ran) < len(self.layers):  # layers without a gradient get zeros
            for g in grads:
                g.zero_()
        for layer, e in ran:
            layer.rule.sums(layer.module, e.state, weights,
                            dict(zip(layer.names, grads[layer.index], strict=True)))
            e.state = None
        for p, g in zip(params, grads, strict=True):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
