"""Per-sample norms and clipped sums for ``nn.Embedding`` without per-sample gradients.

Sample ``i``'s gradient has one row per distinct index it uses, the sum of ``g`` over
the positions holding that index. Its squared norm is the ghost sum
``sum_{t,s} [idx_t == idx_s] <g_t, g_s>`` (cost ``B T^2 D``, never ``B V D``), and the
clipped sum is a single ``index_add`` of the scaled output gradients.
Positions equal to ``padding_idx`` get no gradient, as in ``F.embedding``.
"""

from __future__ import annotations

import math

import torch


def _rows(idx: torch.Tensor, g: torch.Tensor, padding_idx: int | None):
    """``(B, T)`` indices and ``(B, T, D)`` grads with padding positions zeroed."""
    b = idx.shape[0]
    t = math.prod(idx.shape[1:])
    idx2 = idx.reshape(b, t)
    g3 = g.reshape(b, t, g.shape[-1])
    if padding_idx is not None:
        g3 = g3 * (idx2 != padding_idx).unsqueeze(-1).to(g3.dtype)
    return idx2, g3


def embedding_sq_norms(
    idx: torch.Tensor, g: torch.Tensor, *, padding_idx: int | None = None
) -> torch.Tensor:
    """Squared per-sample gradient norms of an Embedding's weight.

    Args:
        idx: integer indices ``(B, ...)``.
        g: gradient w.r.t. the layer output ``(B, ..., D)``.
        padding_idx: the layer's ``padding_idx`` (positions holding it contribute 0).

    Returns:
        ``(B,)`` exact squared norms (repeated indices within a sample are summed first).
    """
    idx2, g3 = _rows(idx, g, padding_idx)
    if idx2.shape[1] == 1:
        return g3.pow(2).sum((1, 2))
    same = (idx2.unsqueeze(2) == idx2.unsqueeze(1)).to(g3.dtype)
    return (torch.bmm(g3, g3.transpose(1, 2)) * same).sum((1, 2))


def embedding_clipped_sum(
    idx: torch.Tensor,
    g: torch.Tensor,
    coef: torch.Tensor,
    num_embeddings: int,
    *,
    padding_idx: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_i coef_i * dW_i`` for an Embedding, as a dense ``(V, D)`` tensor (written into
    ``out``, which is zeroed first, if given; else a fresh tensor)."""
    idx2, g3 = _rows(idx, g, padding_idx)
    scaled = (g3 * coef.to(g3.dtype).reshape(-1, 1, 1)).reshape(-1, g3.shape[-1])
    if out is None:
        out = g3.new_zeros((num_embeddings, g3.shape[-1]))
    else:
        out.zero_()
    return out.index_add_(0, idx2.reshape(-1), scaled.to(out.dtype))
