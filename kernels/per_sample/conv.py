"""Per-sample gradients of ``nn.Conv1d`` / ``nn.Conv2d`` (CPU fast path, any device).

Ghost norms are a poor fit for convolutions at small-image sizes (Gram matrices over
all output positions), so the per-sample weight gradients are materialised, in
one of two ways; :func:`use_im2col` picks one by shape and device (cost models measured on
this project's CPU and on an H100):

* many input channels, or few output positions: one *grouped* convolution weight
  gradient with the batch folded into the channel dimension (``groups = B * groups``),
  which runs on oneDNN's convolution kernels instead of small batched GEMMs;
* a single input channel and many positions (first layers on images): im2col through a
  strided *view* of the zero-padded input (no ``F.unfold``) and one batched matmul, in
  chunks of samples so the column buffer stays in cache (on CUDA, where each launch costs
  more than the cache saves, in as few chunks as :data:`CUDA_IM2COL_BYTES` allows).

Both give ``sum_p g[i, o, p] * x_pad[i, c, p * stride + k * dilation]`` exactly (up to
float rounding order), and the per-sample bias gradients ``sum_p g[i, o, p]`` from the same
kernel (oneDNN's bias gradient; a row of ones under the im2col columns), not from another
pass over ``g``. With a :class:`~kernels.per_sample.workspace.Workspace`, the padded
input, columns, re-laid-out inputs and (im2col) results live in reused buffers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .workspace import Workspace, relayout_copy, scratch

#: Samples per im2col chunk (keeps the column buffer of a 28x28 layer in L2).
IM2COL_CHUNK = 16
#: Output positions from which a single-input-channel conv uses im2col (below: grouped).
IM2COL_MIN_POSITIONS = 64
#: Bytes of input, output gradient and per-sample gradients per grouped-convolution call
#: (bounds the temporaries). Within a DP step one call is fastest: for the 16->32 5x5 layer
#: at 14x14, batch 64, 1 thread, chunks of 9/17/35/64 samples cost 4.3/4.2/4.0/3.6 ms.
GROUPED_CHUNK_BYTES = 8 << 20
#: CUDA: largest im2col column buffer (bytes) per chunk.
CUDA_IM2COL_BYTES = 256 << 20
#: CUDA: im2col from this batch size, for layers with at least this many column entries per
#: sample ((C_in * kernel + 1) * positions); below either, one grouped cuDNN call is faster.
CUDA_IM2COL_MIN_BATCH = 256
CUDA_IM2COL_MIN_ENTRIES = 512


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
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample weight (and bias) gradients of a zero-padded N-d convolution.

    Args:
        x: layer input ``(B, C_in, *spatial)``, any memory format.
        g: gradient w.r.t. the layer output ``(B, C_out, *out_spatial)``.
        weight_shape: ``(C_out, C_in // groups, *kernel)``.
        stride, padding, dilation: per spatial dimension (symmetric zero padding).
        groups: convolution groups.
        bias: also return the bias gradients ``g`` summed over positions.
        workspace: scratch buffers reused across calls; the weight and bias gradients may
            then be views into it, valid until the next call with the same workspace.

    Returns:
        ``(B, *weight_shape)`` and ``(B, C_out)`` (or ``None``); empty for ``B = 0``.
    """
    b = x.shape[0]
    if b == 0:
        return x.new_zeros((0, *weight_shape)), (x.new_zeros((0, g.shape[1])) if bias else None)
    if use_im2col(weight_shape, groups, g.shape[2:], batch=b, device_type=x.device.type):
        return _im2col_grads(x, g, weight_shape, stride, padding, dilation, bias, workspace)
    return _grouped_grads(x, g, weight_shape, stride, padding, dilation, groups, bias,
                          workspace)


def use_im2col(weight_shape: Sequence[int], groups: int, out_spatial: Sequence[int], *,
               batch: int = 0, device_type: str = "cpu") -> bool:
    """Cost model: im2col + batched matmul, or one grouped convolution weight gradient.

    CPU (batch 64, 1 thread): im2col only for one input channel and many positions. The
    28x28 1->16 5x5 layer costs 1.3 ms by im2col vs 2.7 ms grouped; the length-19 1->25 1-D
    layer 0.25 ms vs 0.10 ms; every multi-channel layer is faster grouped (16->32 5x5 at
    14x14: 3 ms vs 5-15 ms).

    CUDA (H100, float32; unchunked im2col vs grouped): at batch 64 grouped wins every layer
    measured (one cuDNN call against four launches: 1->16 5x5 at 28x28 0.08 vs 0.15 ms,
    16->32 5x5 at 14x14 0.12 vs 0.15); at batch 1024 im2col wins by 2-5x (0.15 vs 0.71,
    0.50 vs 1.57, 16->16 3x3 at 28x28 0.76 vs 2.30) except for a 1->32 5-tap 1-D layer with
    19 positions (0.21 vs 0.12; 114 column entries).
    """
    if groups != 1:
        return False
    if device_type == "cuda":
        entries = (weight_shape[1] * math.prod(weight_shape[2:]) + 1) * math.prod(out_spatial)
        return batch >= CUDA_IM2COL_MIN_BATCH and entries >= CUDA_IM2COL_MIN_ENTRIES
    return weight_shape[1] == 1 and math.prod(out_spatial) >= IM2COL_MIN_POSITIONS


def _channels_last_view(g: torch.Tensor) -> torch.Tensor | None:
    """``(B, P, C)`` view of a channels-last ``(B, C, *sp)`` tensor, else ``None``."""
    perm = g.permute(0, *range(2, g.dim()), 1)
    if g.shape[1] > 1 and perm.is_contiguous():
        return perm.reshape(g.shape[0], -1, g.shape[1])
    return None


def _padded(x: torch.Tensor, padding: Sequence[int], ws: Workspace | None) -> torch.Tensor:
    """Contiguous zero-padded copy of ``x`` (borders stay zero in a reused buffer)."""
    if not any(padding):
        return x.contiguous()
    sp = [s + 2 * p for s, p in zip(x.shape[2:], padding, strict=True)]
    xp = scratch(ws, "xpad", (*x.shape[:2], *sp), x, zero=True)
    inner = [slice(p, p + s) for p, s in zip(padding, x.shape[2:], strict=True)]
    xp[(slice(None), slice(None), *inner)].copy_(x)
    return xp


def _im2col_grads(x, g, weight_shape, stride, padding, dilation, bias, ws):
    """Per-sample grads via a strided im2col view and a batched matmul, in chunks; with
    ``bias``, a row of ones under the columns gives the bias grads from the same matmul."""
    nd = len(weight_shape) - 2
    kernel, out_sp = list(weight_shape[2:]), list(g.shape[2:])
    xp = _padded(x, padding, ws)
    b, c_out = x.shape[0], weight_shape[0]
    k_len, p_len = weight_shape[1] * math.prod(kernel), math.prod(out_sp)
    rows = k_len + 1 if bias else k_len
    # (B, P, C_out): a view when g is channels-last, else a transposed view. Either way the
    # product is cols @ g_pc -> (rows, C_out) per sample: MKL runs this orientation ~20% faster
    # than g^T @ cols^T here (1->16 5x5 layer at 28x28, batch 64: 1.07 vs 1.32 ms).
    g_pc = _channels_last_view(g)
    if g_pc is None:
        g_pc = g.reshape(b, c_out, p_len).transpose(1, 2)
    out = scratch(ws, "grads", (b, rows, c_out), x)
    chunk = IM2COL_CHUNK
    if x.device.type == "cuda":
        chunk = max(1, CUDA_IM2COL_BYTES // (rows * p_len * x.element_size()))
    for s in range(0, b, chunk):
        xs = xp[s : s + chunk]
        n, sp = xs.shape[0], xs.stride()[2:]
        size = (n, xs.shape[1], *kernel, *out_sp)
        strides = (xs.stride(0), xs.stride(1), *(sp[d] * dilation[d] for d in range(nd)),
                   *(sp[d] * stride[d] for d in range(nd)))
        cols = scratch(ws, "cols", (n, rows, p_len), x)
        cols[:, :k_len].view(size).copy_(xs.as_strided(size, strides))
        if bias:
            cols[:, k_len].fill_(1.0)
        torch.bmm(cols, g_pc[s : s + n], out=out[s : s + n])
    out = out.transpose(1, 2)  # (B, C_out, rows)
    gw = out[:, :, :k_len].reshape(b, *weight_shape)
    return gw, (out[:, :, k_len] if bias else None)


def _folded(t: torch.Tensor, name: str, ws: Workspace | None) -> torch.Tensor:
    """``(n, C, *sp)`` -> ``(1, n * C, *sp)``: a view if contiguous, else a reused copy."""
    if not t.is_contiguous():
        t = relayout_copy(scratch(ws, name, tuple(t.shape), t), t)
    return t.view(1, t.shape[0] * t.shape[1], *t.shape[2:])


def _grouped_grads(x, g, weight_shape, stride, padding, dilation, groups, bias, ws):
    """Per-sample grads as grouped-convolution weight (and bias) gradients, batch folded
    into channels, in chunks of about :data:`GROUPED_CHUNK_BYTES` (one call, and no copy,
    when the whole batch fits)."""
    b, c_out = x.shape[0], weight_shape[0]
    numel = math.prod(x.shape[1:]) + math.prod(g.shape[1:]) + math.prod(weight_shape)
    chunk = min(b, max(1, GROUPED_CHUNK_BYTES // (numel * x.element_size())))
    out = scratch(ws, "grads", (b, *weight_shape), x) if chunk < b else None
    out_b = scratch(ws, "bias_grads", (b, c_out), x) if chunk < b and bias else None
    # Only its shape is read (output_mask asks for the weight gradient alone).
    w_full = scratch(ws, "weight_shape", (chunk, *weight_shape), x)
    for s in range(0, b, chunk):
        xs, gs = x[s : s + chunk], g[s : s + chunk]
        n = xs.shape[0]
        _, gw, gb = torch.ops.aten.convolution_backward(
            _folded(gs, "g_folded", ws), _folded(xs, "x_folded", ws),
            w_full[:n].view(-1, *weight_shape[1:]), [n * c_out] if bias else None,
            list(stride), list(padding), list(dilation), False, [0] * len(stride),
            n * groups, [False, True, bias],
        )
        gw = gw.view(n, *weight_shape)
        gb = gb.view(n, c_out) if bias else None
        if out is None:
            return gw, gb
        out[s : s + n].copy_(gw)
        if bias:
            out_b[s : s + n].copy_(gb)
    return out, out_b
