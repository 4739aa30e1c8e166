"""Clip factors, per-sample norms and weighted per-sample sums shared by every layer type.

The ``*_into`` helpers write into a caller's tensor (a row of the engine's norm buffer, a
view of a step's flat gradient buffer): one kernel each, no temporary.
"""

from __future__ import annotations

import math

import torch

from .reference import CLIP_EPS


def clip_factors(sq_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus' per-sample clip factors from *squared* norms.

    Returns ``min(1, C / (sqrt(sq) + 1e-6))``: exactly 1 for a zero gradient (never a
    division by zero), ``C / norm`` (up to the 1e-6) above the bound, so every clipped
    gradient has norm <= ``C``. NaN norms give NaN factors (a NaN loss stays visible).
    """
    return clip_factors_from_norms(sq_norms.sqrt(), max_grad_norm)


def clip_factors_from_norms(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """:func:`clip_factors` from the norms themselves: ``min(1, C / (norm + 1e-6))``, computed
    as Opacus' ``C / t`` is (``t.reciprocal() * C``), in place on one fresh tensor."""
    return (norms + CLIP_EPS).reciprocal_().mul_(max_grad_norm).clamp_(max=1.0)


def per_sample_sq_norms(per_sample: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` -> ``(B,)`` squared L2 norm of each sample's slice.

    One reduction pass without a ``(B, ...)`` temporary (``vecdot`` allocates one, and a
    fresh multi-MiB buffer costs page faults on every step).
    """
    if per_sample.dim() != 2:
        per_sample = per_sample.reshape(per_sample.shape[0], math.prod(per_sample.shape[1:]))
    return torch.linalg.vector_norm(per_sample, dim=1).square_()


def norms_into(out: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """``out[i] = ||per_sample[i]||`` (L2 over all but the first dimension); returns ``out``.

    One reduction written in place (any strides; no reshape copy). ``out`` may be wider than
    the input (the norm is then computed in ``out``'s dtype); a narrower ``out`` gets the
    norm cast down. A sample with no entries has norm 0.
    """
    dims = tuple(range(1, per_sample.dim()))
    if per_sample.dtype == out.dtype:
        return torch.linalg.vector_norm(per_sample, dim=dims, out=out)
    if torch.promote_types(per_sample.dtype, out.dtype) == out.dtype:
        return torch.linalg.vector_norm(per_sample, dim=dims, dtype=out.dtype, out=out)
    return out.copy_(torch.linalg.vector_norm(per_sample, dim=dims))


def weighted_sum(per_sample: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``sum_i coef_i * per_sample[i]`` (one GEMV, a fresh tensor); zeros for an empty batch."""
    b = per_sample.shape[0]
    if b == 0:
        return per_sample.new_zeros(per_sample.shape[1:])
    if coef.dtype != per_sample.dtype:
        coef = coef.to(per_sample.dtype)
    if per_sample.dim() == 2:
        return coef @ per_sample
    return (coef @ per_sample.reshape(b, -1)).view(per_sample.shape[1:])


def weighted_sum_into(out: torch.Tensor, per_sample: torch.Tensor,
                      coef: torch.Tensor) -> torch.Tensor:
    """``out = sum_i coef_i * per_sample[i]`` (one GEMV written into ``out``); returns ``out``.

    ``out`` has the shape of one sample's slice; zeros for an empty batch (the GEMV of an
    empty sum). Exactly :func:`weighted_sum`, without the fresh tensor.
    """
    b = per_sample.shape[0]
    mat = per_sample.reshape(b, math.prod(per_sample.shape[1:]))
    if coef.dtype != mat.dtype:
        coef = coef.to(mat.dtype)
    if out.dtype == mat.dtype and out.is_contiguous():
        torch.mm(coef.view(1, b), mat, out=out.view(1, mat.shape[1]))
        return out
    return out.copy_((coef @ mat).view(out.shape))


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` written into ``out`` (one GEMM; a copy only if dtypes or layout differ)."""
    if out.dtype == a.dtype == b.dtype and out.is_contiguous():
        return torch.mm(a, b, out=out)
    return out.copy_(a @ b)
