"""Per-sample norms and clipped sums for ``nn.Linear`` without per-sample gradients.

Without a sequence dimension the per-sample weight gradient is the outer product
``g_i a_i^T``, whose Frobenius norm is exactly ``||g_i|| * ||a_i||`` (no
approximation). With a sequence dimension ``T`` the norm is taken either by the
"ghost" identity ``||G^T A||^2 = <A A^T, G G^T>`` (cost ``B T^2 (in + out)``) or
from materialised per-sample gradients (cost ``B T in out``), whichever is cheaper.
The clipped sum is one matrix product ``(c * G)^T A``: the same cost as the
non-private weight gradient it replaces.
"""

from __future__ import annotations

import math

import torch


def _flat3(t: torch.Tensor) -> torch.Tensor:
    """``(B, ..., F)`` -> ``(B, T, F)`` (a view when possible)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


def linear_sq_norms(a: torch.Tensor, g: torch.Tensor, *, bias: bool) -> torch.Tensor:
    """Squared per-sample gradient norms of a Linear layer's weight (and bias).

    Args:
        a: layer input ``(B, ..., in)``.
        g: gradient w.r.t. the layer output ``(B, ..., out)``.
        bias: include the bias gradient ``sum_t g_t``.

    Returns:
        ``(B,)`` tensor of ``||dW_i||^2 (+ ||db_i||^2)``; exact (up to rounding) for any
        number of sequence positions; zero for zero gradients; empty for ``B = 0``.
    """
    if a.dim() == 2:
        g_sq = g.pow(2).sum(1)
        out = a.pow(2).sum(1) * g_sq
        return out + g_sq if bias else out
    a3, g3 = _flat3(a), _flat3(g)
    t, d_in, d_out = a3.shape[1], a3.shape[2], g3.shape[2]
    if t * (d_in + d_out) < d_in * d_out:
        aa = torch.bmm(a3, a3.transpose(1, 2))
        gg = torch.bmm(g3, g3.transpose(1, 2))
        out = (aa * gg).sum((1, 2))
    else:
        out = torch.bmm(g3.transpose(1, 2), a3).pow(2).sum((1, 2))
    return out + g3.sum(1).pow(2).sum(1) if bias else out


def linear_clipped_sum(
    a: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, *, bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sum_i coef_i * dW_i`` and ``sum_i coef_i * db_i`` for a Linear layer.

    Args:
        a: layer input ``(B, ..., in)``.
        g: gradient w.r.t. the layer output ``(B, ..., out)``.
        coef: ``(B,)`` per-sample weights (clip factors, possibly times a loss scale).
        bias: also return the bias sum (else ``None``).

    Returns:
        ``(out, in)`` weight sum and ``(out,)`` bias sum (zeros for ``B = 0``).
    """
    gc = g * coef.reshape(-1, *([1] * (g.dim() - 1)))
    g2 = gc.reshape(-1, gc.shape[-1])
    gw = g2.t().mm(a.reshape(-1, a.shape[-1]))
    return gw, (g2.sum(0) if bias else None)
