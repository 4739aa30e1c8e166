"""Plain-torch oracles for the per-sample gradient ops.

Every function here is written for obviousness, not speed: per-sample
gradients come from one autograd call per sample (or from the textbook
formula when that is a one-liner). Tests compare the fast paths in
:mod:`kernels.per_sample` against these, and DP-SGD tests compare whole models
against Opacus and against one-sample-at-a-time autograd.

Conventions shared with the fast paths:

* ``g`` is the gradient of the loss with respect to the layer *output*, batch first.
* A per-sample gradient of a parameter of shape ``S`` has shape ``(B, *S)``.
* Clip factors follow Opacus exactly: ``c_i = min(1, C / (||grad_i|| + 1e-6))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: Added to the per-sample norm before dividing, exactly as Opacus' ``DPOptimizer`` does.
CLIP_EPS = 1e-6

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def reference_clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``min(1, C / (norm + 1e-6))`` per sample (Opacus' formula); norm 0 gives 1."""
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def reference_clipped_sum(
    per_sample_grads: Sequence[torch.Tensor], max_grad_norm: float
) -> list[torch.Tensor]:
    """Clip every sample's full gradient (all tensors together) to ``max_grad_norm`` and sum.

    Args:
        per_sample_grads: one ``(B, *param_shape)`` tensor per parameter.
        max_grad_norm: clipping bound ``C`` (> 0).

    Returns:
        One tensor per parameter, ``sum_i c_i * grad_i``; zeros for an empty batch.
    """
    flat = torch.cat([g.reshape(g.shape[0], math.prod(g.shape[1:])) for g in per_sample_grads], 1)
    coef = reference_clip_factors(flat.norm(dim=1), max_grad_norm)
    return [torch.einsum("i,i...->...", coef, g) for g in per_sample_grads]


def reference_linear_per_sample_grads(
    a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weight and bias gradients of ``y = a @ W.T + b``.

    ``a`` is ``(B, ..., in)`` and ``g`` ``(B, ..., out)``; extra (sequence) dimensions are
    summed over. Returns ``(B, out, in)`` and ``(B, out)``.
    """
    t = math.prod(a.shape[1:-1])
    a3 = a.reshape(a.shape[0], t, a.shape[-1])
    g3 = g.reshape(g.shape[0], t, g.shape[-1])
    return torch.einsum("bto,bti->boi", g3, a3), g3.sum(1)


def reference_conv_per_sample_grads(
    x: torch.Tensor,
    g: torch.Tensor,
    weight_shape: Sequence[int],
    *,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample conv weight and bias gradients, by autograd on one sample at a time.

    Returns ``(B, *weight_shape)`` and ``(B, out_channels)``.
    """
    conv = _CONV[len(weight_shape) - 2]
    grads = []
    for i in range(x.shape[0]):
        w = torch.zeros(weight_shape, dtype=x.dtype, device=x.device, requires_grad=True)
        out = conv(x[i : i + 1], w, None, tuple(stride), tuple(padding), tuple(dilation), groups)
        (gw,) = torch.autograd.grad(out, w, g[i : i + 1])
        grads.append(gw)
    gw = torch.stack(grads) if grads else x.new_zeros((0, *weight_shape))
    return gw, g.reshape(g.shape[0], g.shape[1], -1).sum(-1)


def reference_group_norm_per_sample_grads(
    x: torch.Tensor, g: torch.Tensor, num_groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample GroupNorm weight and bias gradients, by autograd on one sample at a time.

    Returns two ``(B, C)`` tensors.
    """
    c = x.shape[1]
    gws, gbs = [], []
    for i in range(x.shape[0]):
        w = torch.ones(c, dtype=x.dtype, device=x.device, requires_grad=True)
        b = torch.zeros(c, dtype=x.dtype, device=x.device, requires_grad=True)
        out = F.group_norm(x[i : i + 1], num_groups, w, b, eps)
        gw, gb = torch.autograd.grad(out, (w, b), g[i : i + 1])
        gws.append(gw)
        gbs.append(gb)
    if not gws:
        return x.new_zeros((0, c)), x.new_zeros((0, c))
    return torch.stack(gws), torch.stack(gbs)


def reference_embedding_per_sample_grads(
    idx: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx: int | None
) -> torch.Tensor:
    """Dense per-sample gradient ``(B, V, D)`` of ``F.embedding(idx, W, padding_idx)``."""
    b = idx.shape[0]
    out = g.new_zeros((b, num_embeddings, g.shape[-1]))
    for i in range(b):
        rows = idx[i].reshape(-1)
        vals = g[i].reshape(rows.numel(), g.shape[-1])
        if padding_idx is not None:
            keep = rows != padding_idx
            rows, vals = rows[keep], vals[keep]
        out[i].index_add_(0, rows, vals)
    return out
