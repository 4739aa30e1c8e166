"""Per-sample gradients of ``nn.GroupNorm``'s affine parameters.

``y = x_hat * w + b`` per channel, so the per-sample gradients are ``sum_s x_hat * g``
and ``sum_s g`` over spatial positions: ``(B, C)`` each, cheap to hold.

Four ways to get ``sum_s x_hat * g``, in order of preference:

* from the forward's saved statistics (``stats``: mean and 1/std per sample and group) and
  a contiguous (NCHW) input: one ``native_group_norm_backward`` call with the batch folded
  into the channels (``N = 1``, ``C' = B * C``; its ``B * G`` groups normalise exactly as
  the ``B`` samples did), whose "summed" affine gradients are then the per-sample ones: one
  fused pass over ``x`` and ``g``, no temporary, no division by ``w``;
* from the saved statistics and an input of another layout (channels-last):
  ``(sum_s x * g - mean * sum_s g) * rstd``, PyTorch's own formula for the weight gradient
  (``GammaBackward`` in its CPU kernel) per sample instead of summed over the batch: one
  product pass and two reductions, no host synchronisation, no division by ``w``;
* from the layer *output* ``y``: ``(sum_s y * g - b * sum_s g) / w``: one fused pass and no
  re-normalisation (group norm is slow in channels-last on CPU). Used only when every
  ``|w_c| > 0`` and ``|b_c| / |w_c| <= OUTPUT_PATH_MAX_RATIO``, where the rounding error
  stays within a small factor of the direct path, and when it pays (channels-last or at
  least ``OUTPUT_PATH_MIN_NUMEL`` elements); the check reads one value back to the host;
* otherwise by recomputing ``x_hat = group_norm(x)`` (always exact to rounding).

:func:`group_norm_fused_backward` is the first way with the input gradient asked for too:
the engine then runs it *instead of* the layer's own backward (one kernel call for both).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .workspace import Workspace, relayout_copy, scratch, scratch_like

#: Largest ``|b| / |w|`` for which the output path is used (bounds cancellation error).
OUTPUT_PATH_MAX_RATIO = 4.0
#: Below this many elements a contiguous input is re-normalised (fewer small ops).
OUTPUT_PATH_MIN_NUMEL = 1 << 16
#: Spatial positions from which a channels-last input is copied to NCHW for the fused
#: backward. Measured (batch 64, 1 thread): PyTorch's channels-last GroupNorm forward +
#: backward costs 2.4-4.8 ns per element at 28x28 (C = 8..32) but 1.1-1.4 at 14x14, NCHW
#: ~0.6; the relayout (input and gradient to NCHW, output back) ~1.1 ns per element, and a
#: contiguous input gradient slows a following channels-last conv's backward.
RELAYOUT_MIN_POSITIONS = 400


def _output_path_pays(x: torch.Tensor) -> bool:
    """The output path saves a slow channels-last ``group_norm`` or a big one; for a small
    contiguous input its weight check costs more than recomputing ``x_hat``."""
    return not x.is_contiguous() or x.numel() >= OUTPUT_PATH_MIN_NUMEL


def _output_path_ok(weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    if weight is None or bias is None:
        return False
    # |b| / |w| is inf (b != 0) or NaN (b == 0) where w == 0, and amax propagates NaN:
    # one reduction checks both w != 0 and the ratio bound.
    ratio = bias.detach().abs().div_(weight.detach().abs())
    return bool(ratio.amax() <= OUTPUT_PATH_MAX_RATIO)


def group_norm_per_sample_grads(
    x: torch.Tensor,
    g: torch.Tensor,
    num_groups: int,
    eps: float,
    *,
    y: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    workspace: Workspace | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weight and bias gradients of ``F.group_norm(x, num_groups, w, b, eps)``.

    Args:
        x: layer input ``(B, C, *spatial)``.
        g: gradient w.r.t. the layer output, same shape.
        num_groups: number of groups (divides ``C``).
        eps: the layer's epsilon (``x_hat`` is recomputed exactly as in forward).
        y: optional unmodified layer output; with ``weight`` and ``bias`` it enables the
            output path (see the module docstring).
        weight, bias: the layer's affine parameters (only read for the output path).
        workspace: reused scratch for the elementwise product (no fresh buffer per call).
        stats: the forward's ``(mean, rstd)``, each ``(B, num_groups)``, computed from this
            very ``x`` with this ``eps`` (autograd saves them); enables the folded path
            (contiguous ``x``) or the stats path (other layouts), either of which is taken
            whenever the stats fit.

    Returns:
        ``(B, C)`` weight and ``(B, C)`` bias gradients; empty for ``B = 0``.
    """
    dims = tuple(range(2, x.dim()))
    if x.shape[0] == 0:
        z = x.new_zeros((0, x.shape[1]))
        return z, z.clone()
    if stats is not None and _stats_fit(stats, x, num_groups):
        if x.is_contiguous():
            return _folded_grads(x, g, num_groups, stats)
        return _stats_grads(x, g, num_groups, stats, workspace)
    gb = g.sum(dims) if dims else g
    if y is not None and _output_path_pays(x) and _output_path_ok(weight, bias):
        yg = torch.mul(y, g, out=scratch_like(workspace, "prod", y)).sum(dims) if dims else y * g
        return (yg - bias.detach() * gb) / weight.detach(), gb
    # NCHW group_norm is several times faster than channels-last on CPU.
    x_hat = F.group_norm(x.contiguous(), num_groups, None, None, eps)
    gw = (x_hat * g.contiguous()).sum(dims) if dims else x_hat * g
    return gw, gb


def _stats_fit(stats: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, groups: int) -> bool:
    shape = (x.shape[0], groups)
    return all(t.shape == shape and t.dtype == x.dtype and t.device == x.device for t in stats)


def _stats_grads(x: torch.Tensor, g: torch.Tensor, groups: int,
                 stats: tuple[torch.Tensor, torch.Tensor],
                 ws: Workspace | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample affine grads of ``x`` in any layout from the saved ``(mean, rstd)``:
    ``((sum_s x g) - mean (sum_s g)) * rstd`` per sample and channel (PyTorch's formula)."""
    b, c = x.shape[:2]
    dims = tuple(range(2, x.dim()))
    if dims:
        ds = torch.mul(x, g, out=scratch_like(ws, "prod", x)).sum(dims)
        db = g.sum(dims)
    else:
        ds, db = x * g, g
    mean, rstd = (t.reshape(b, groups, 1) for t in stats)
    gw = (ds.reshape(b, groups, c // groups) - db.reshape(b, groups, c // groups) * mean)
    return gw.mul_(rstd).view(b, c), db


def _folded_grads(x: torch.Tensor, g: torch.Tensor, groups: int,
                  stats: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample affine grads from one ``native_group_norm_backward`` with ``N = 1``."""
    return _folded_backward(x, g.contiguous(), groups, stats, None, need_dx=False)[1:]


def _folded_backward(x, g, groups, stats, weight, *, need_dx):
    """``native_group_norm_backward`` on contiguous ``x``, ``g`` with the batch folded into
    the channels: ``(dx or None, (B, C) weight grads, (B, C) bias grads)``."""
    b, c = x.shape[:2]
    folded = (1, b * c, x.numel() // (b * c))
    mean, rstd = (t.reshape(1, b * groups) for t in stats)
    # The weight only scales the input gradient; without it (or without dx) ones will do.
    w = x.new_ones(b * c) if weight is None or not need_dx else weight.detach().repeat(b)
    dx, gw, gb = torch.ops.aten.native_group_norm_backward(
        g.view(folded), x.view(folded), mean, rstd, w, 1, b * c, folded[2], b * groups,
        [need_dx, True, True],
    )
    return (dx.view(x.shape) if need_dx else None), gw.view(b, c), gb.view(b, c)


def group_norm_fused_backward(
    x: torch.Tensor,
    g: torch.Tensor,
    num_groups: int,
    stats: tuple[torch.Tensor, torch.Tensor],
    weight: torch.Tensor | None,
    *,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm's whole backward: the input gradient *and* the per-sample affine gradients.

    One ``native_group_norm_backward`` call with the batch folded into the channels (see the
    module docstring) returns ``dx`` exactly as the layer's own backward computes it for a
    contiguous input, and per-folded-channel "summed" affine gradients that are the
    per-sample ones. The folded call needs contiguous (NCHW) ``x`` and ``g``; other layouts
    are copied into workspace buffers (PyTorch's channels-last GroupNorm backward is itself
    ~5x slower than NCHW on CPU). ``dx`` is contiguous whatever the layouts (autograd accepts
    it as the gradient of a channels-last ``x``, and it saves a relayout copy).

    Args:
        x: layer input ``(B, C, *spatial)``, ``B > 0``.
        g: gradient w.r.t. the layer output, same shape.
        num_groups: number of groups.
        stats: the forward's ``(mean, rstd)``, each ``(B, num_groups)`` (autograd saves them).
        weight: the layer's ``(C,)`` weight, or ``None`` (no affine weight: ones).

    Returns:
        ``dx`` (a fresh contiguous tensor shaped like ``x``) and ``(B, C)`` weight and bias
        gradients.
    """
    xf, gf = _nchw(x, "x_nchw", workspace), _nchw(g, "g_nchw", workspace)
    return _folded_backward(xf, gf, num_groups, stats, weight, need_dx=True)


def _nchw(t: torch.Tensor, name: str, ws: Workspace | None) -> torch.Tensor:
    """``t`` if contiguous, else a contiguous copy in a reused buffer."""
    if t.is_contiguous():
        return t
    return relayout_copy(scratch(ws, name, tuple(t.shape), t), t)


def group_norm_relayout_pays(x: torch.Tensor) -> bool:
    """Whether to run a GroupNorm on an NCHW copy of non-contiguous ``x`` (for the fused
    backward): only for large spatial sizes (see :data:`RELAYOUT_MIN_POSITIONS`)."""
    return x.shape[0] > 0 and math.prod(x.shape[2:]) >= RELAYOUT_MIN_POSITIONS
