"""Per-sample gradients of ``nn.GroupNorm``'s affine parameters.

``y = x_hat * w + b`` per channel, so the per-sample gradients are ``sum_s x_hat * g``
and ``sum_s g`` over spatial positions: ``(B, C)`` each, cheap to hold.

Two ways to get ``sum_s x_hat * g``:

* from the layer *output* ``y``: ``(sum_s y * g - b * sum_s g) / w``: one fused pass and no
  re-normalisation (group norm is slow in channels-last on CPU). Used only when every
  ``|w_c| > 0`` and ``|b_c| / |w_c| <= OUTPUT_PATH_MAX_RATIO``, where the rounding error
  stays within a small factor of the direct path, and when it pays (channels-last or at
  least ``OUTPUT_PATH_MIN_NUMEL`` elements);
* otherwise by recomputing ``x_hat = group_norm(x)`` (always exact to rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .workspace import Workspace, scratch_like

#: Largest ``|b| / |w|`` for which the output path is used (bounds cancellation error).
OUTPUT_PATH_MAX_RATIO = 4.0
#: Below this many elements a contiguous input is re-normalised (fewer small ops).
OUTPUT_PATH_MIN_NUMEL = 1 << 16


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

    Returns:
        ``(B, C)`` weight and ``(B, C)`` bias gradients; empty for ``B = 0``.
    """
    dims = tuple(range(2, x.dim()))
    if x.shape[0] == 0:
        z = x.new_zeros((0, x.shape[1]))
        return z, z.clone()
    gb = g.sum(dims) if dims else g
    if y is not None and _output_path_pays(x) and _output_path_ok(weight, bias):
        yg = torch.mul(y, g, out=scratch_like(workspace, "prod", y)).sum(dims) if dims else y * g
        return (yg - bias.detach() * gb) / weight.detach(), gb
    # NCHW group_norm is several times faster than channels-last on CPU.
    x_hat = F.group_norm(x.contiguous(), num_groups, None, None, eps)
    gw = (x_hat * g.contiguous()).sum(dims) if dims else x_hat * g
    return gw, gb
