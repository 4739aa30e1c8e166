"""Encoding of a weighted client input into Z_2^32, and decoding of the secure sum.

Layout of one client's vector (``n_params + 1 + n_metrics`` uint32 ring elements):

    [ w * q(update_1..d) | w | w * q(metric_1..m) ]

where ``w`` is the client's example count (``1 <= w <= max_weight``) and ``q`` is
``kernels.quantize``: clip to ``[-c, c]``, scale to ``[0, 2**bits - 1]`` and round
stochastically with a ChaCha20 dither stream (``|q - y| < 1``, unbiased to 2**-16 of a step).
The weight and the weighted metrics never travel in the clear: they are slots of the masked
vector.

Ring capacity: every slot of one client is at most ``max_weight * (2**bits - 1)``, so the sum
over n clients is at most ``n * max_weight * (2**bits - 1)``, which ``SecAggParams`` requires to
be ``<= 2**32 - 1``. The ring sum therefore equals the integer sum ``S``, and with
``W = sum_i w_i <= n * max_weight`` the quantised slots hold ``sum_i w_i q_i``, i.e. the sum
of W unit-weight quantised vectors: ``kernels.dequantize(S, n_summands=W)`` gives
``sum_i w_i clip(x_i)`` (within ``W`` quantisation steps), and the server divides by ``W``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kernels import MaskContext, MaskPurpose, dequantize, derive_mask_key, quantize
from shared.secagg.params import SecAggParams

RandBytes = Callable[[int], bytes]
_DITHER_CONTEXT = MaskContext("privfed.secagg.encode", 0, MaskPurpose.QUANTIZE_DITHER)


def vector_length(n_params: int, n_metrics: int = 0) -> int:
    """Ring elements per client: weighted update, weight, weighted metrics."""
    return n_params + 1 + n_metrics


def _quantize_into(out: np.ndarray, x: object, clip_range: float, bits: int, rb: RandBytes):
    flat = torch.as_tensor(x, dtype=torch.float32).reshape(-1).contiguous()
    if flat.numel() != out.shape[0]:
        raise ValueError(f"expected {out.shape[0]} values, got {flat.numel()}")
    key = derive_mask_key(rb(32), _DITHER_CONTEXT)  # fresh CSPRNG secret per vector
    quantize(flat, clip_range=clip_range, bits=bits, key=key,
             out=torch.from_numpy(out.view(np.int32)))  # fmt: skip


def encode(
    update: np.ndarray | torch.Tensor,
    weight: int,
    params: SecAggParams,
    metrics: np.ndarray | torch.Tensor | None = None,
    randbytes: RandBytes = secrets.token_bytes,
) -> np.ndarray:
    """Encode one client's weighted input as uint32 ring elements (layout in module doc).

    Args:
        update: model update, any shape (flattened), float.
        weight: example count, ``1 <= weight <= params.max_weight``.
        params: round parameters (clip ranges, bits).
        metrics: values to average with the same weights (e.g. train loss), or None.
        randbytes: CSPRNG byte source for the dither secrets.

    Raises:
        ValueError: weight out of range, or NaN in update or metrics (infinities clip).
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)):
        raise ValueError(f"weight must be an int example count, got {weight!r}")
    if not 1 <= weight <= params.max_weight:
        raise ValueError(f"weight must be in [1, max_weight={params.max_weight}], got {weight}")
    d = int(torch.as_tensor(update).numel())
    m = 0 if metrics is None else int(torch.as_tensor(metrics).numel())
    out = np.empty(vector_length(d, m), dtype=np.uint32)
    _quantize_into(out[:d], update, params.clip_range, params.bits, randbytes)
    out[d] = 1
    if m:
        _quantize_into(out[d + 1 :], metrics, params.metric_clip_range, params.bits, randbytes)
    np.multiply(out, np.uint32(weight), out=out)  # <= max_weight * (2**bits - 1) < 2**32
    return out


@dataclass(frozen=True, eq=False)
class Aggregate:
    """Decoded secure sum: weighted means and the total weight ``sum_i w_i``."""

    mean_update: np.ndarray
    total_weight: int
    mean_metrics: np.ndarray


def _mean(s: np.ndarray, total_weight: int, clip_range: float, bits: int) -> np.ndarray:
    ring = torch.from_numpy(np.ascontiguousarray(s).view(np.int32))
    weighted_sum = dequantize(ring, clip_range=clip_range, bits=bits, n_summands=total_weight)
    return weighted_sum.numpy().astype(np.float64) / total_weight


def decode(total: np.ndarray, params: SecAggParams, n_params: int, n_metrics: int = 0) -> Aggregate:
    """Weighted means ``sum_i w_i x_i / sum_i w_i`` from the ring sum of encoded inputs.

    Raises:
        ValueError: wrong length, or a total weight outside ``[1, n * max_weight]`` (which
            no honest set of at most n clients can produce).
    """
    total = np.asarray(total, dtype=np.uint32)
    if total.shape != (vector_length(n_params, n_metrics),):
        raise ValueError(
            f"sum must have {vector_length(n_params, n_metrics)} elements, got {total.shape}"
        )
    w = int(total[n_params])
    if not 1 <= w <= params.n * params.max_weight:
        raise ValueError(f"total weight must be in [1, {params.n * params.max_weight}], got {w}")
    update = _mean(total[:n_params], w, params.clip_range, params.bits)
    metrics = _mean(total[n_params + 1 :], w, params.metric_clip_range, params.bits)
    return Aggregate(mean_update=update, total_weight=w, mean_metrics=metrics)
