"""Per-sample gradients of ``nn.Conv1d`` / ``nn.Conv2d`` (CPU fast path, any device).

Ghost norms are a poor fit for convolutions at small-image sizes (Gram matrices over
all output positions), so the per-sample weight gradients are materialised, in
one of two ways measured fastest on CPU here:

* many input channels: one *grouped* convolution weight gradient with the batch
  folded into the channel dimension (``groups = B * groups``), which runs on
  oneDNN's convolution kernels instead of small batched GEMMs;
* a single input channel (first layers): im2col through a strided *view* of the
  padded input (no ``F.unfold``) and one batched matmul, in chunks of samples so the
  column buffer stays in cache.

Both give ``sum_p g[i, o, p] * x_pad[i, c, p * stride + k * dilation]`` exactly (up to
float rounding order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: Samples per im2col chunk (keeps the column buffer of a 28x28 layer in L2).
IM2COL_CHUNK = 16
#: Samples per grouped-convolution call (bounds the temporary buffers).
GROUPED_CHUNK = 64


def conv_per_sample_grads(
    x: torch.Tensor,
    g: torch.Tensor,
    weight_shape: Sequence[int],
    *,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample weight (and bias) gradients of a zero-padded N-d convolution.

    Args:
        x: layer input ``(B, C_in, *spatial)``, any memory format.
        g: gradient w.r.t. the layer output ``(B, C_out, *out_spatial)``.
        weight_shape: ``(C_out, C_in // groups, *kernel)``.
        stride, padding, dilation: per spatial dimension (symmetric zero padding).
        groups: convolution groups.
        bias: also return the bias gradients ``g`` summed over positions.

    Returns:
        ``(B, *weight_shape)`` and ``(B, C_out)`` (or ``None``); empty for ``B = 0``.
    """
    b = x.shape[0]
    gb = g.sum(dim=tuple(range(2, g.dim()))) if bias else None
    if b == 0:
        return x.new_zeros((0, *weight_shape)), gb
    if groups == 1 and weight_shape[1] == 1:
        gw = _im2col_grads(x, g, weight_shape, stride, padding, dilation)
    else:
        gw = _grouped_grads(x, g, weight_shape, stride, padding, dilation, groups)
    return gw, gb


def _channels_last_view(g: torch.Tensor) -> torch.Tensor | None:
    """``(B, P, C)`` view of a channels-last ``(B, C, *sp)`` tensor, else ``None``."""
    perm = g.permute(0, *range(2, g.dim()), 1)
    if g.shape[1] > 1 and perm.is_contiguous():
        return perm.reshape(g.shape[0], -1, g.shape[1])
    return None


def _im2col_grads(x, g, weight_shape, stride, padding, dilation) -> torch.Tensor:
    """Per-sample grads via a strided im2col view and a batched matmul, in chunks."""
    nd = len(weight_shape) - 2
    kernel, out_sp = list(weight_shape[2:]), list(g.shape[2:])
    pads = [p for d in reversed(range(nd)) for p in (padding[d], padding[d])]
    xp = (F.pad(x, pads) if any(pads) else x).contiguous()
    b, c_out = x.shape[0], weight_shape[0]
    k_len, p_len = weight_shape[1] * math.prod(kernel), math.prod(out_sp)
    g_pc = _channels_last_view(g)  # (B, P, C_out) when g is channels-last: no transpose copy
    g3 = g.reshape(b, c_out, p_len) if g_pc is None else None
    out = x.new_empty((b, c_out, k_len) if g_pc is None else (b, k_len, c_out))
    for s in range(0, b, IM2COL_CHUNK):
        xs = xp[s : s + IM2COL_CHUNK]
        sp = xs.stride()[2:]
        size = (xs.shape[0], xs.shape[1], *kernel, *out_sp)
        strides = (xs.stride(0), xs.stride(1), *(sp[d] * dilation[d] for d in range(nd)),
                   *(sp[d] * stride[d] for d in range(nd)))
        cols = xs.as_strided(size, strides).reshape(xs.shape[0], k_len, p_len)
        sl = slice(s, s + IM2COL_CHUNK)
        if g_pc is None:
            torch.bmm(g3[sl], cols.transpose(1, 2), out=out[sl])
        else:
            torch.bmm(cols, g_pc[sl], out=out[sl])
    if g_pc is not None:
        out = out.transpose(1, 2)
    return out.reshape(b, *weight_shape)


def _grouped_grads(x, g, weight_shape, stride, padding, dilation, groups) -> torch.Tensor:
    """Per-sample grads as one grouped-convolution weight gradient (batch in channels)."""
    b = x.shape[0]
    parts = []
    for s in range(0, b, GROUPED_CHUNK):
        xs, gs = x[s : s + GROUPED_CHUNK], g[s : s + GROUPED_CHUNK]
        n = xs.shape[0]
        xf = xs.reshape(1, n * xs.shape[1], *xs.shape[2:])
        gf = gs.reshape(1, n * gs.shape[1], *gs.shape[2:])
        w = x.new_empty((n * weight_shape[0], *weight_shape[1:]))
        gw = torch.ops.aten.convolution_backward(
            gf, xf, w, None, list(stride), list(padding), list(dilation), False,
            [0] * len(stride), n * groups, [False, True, False],
        )[1]
        parts.append(gw.reshape(n, *weight_shape))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
