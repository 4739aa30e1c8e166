"""Encoding of a weighted client input into Z_2^32, and decoding of the secure sum.

Layout of one client's vector (``n_params + 1 + n_metrics`` uint32 ring elements):

    [ w * q(update_1..d) | w | w * q(metric_1..m) ]

where ``w`` is the client's example count (``1 <= w <= max_weight``) and ``q`` clips to
``[-c, c]`` and stochastically rounds ``(x + c) * (2**bits - 1) / (2c)`` to an integer in
``[0, 2**bits - 1]`` (unbiased: ``E[q] = (clip(x) + c) * (2**bits - 1) / (2c)``). The weight
and weighted metrics never travel in the clear: they are slots of the masked vector.

Ring capacity: every slot of one client is at most ``max_weight * (2**bits - 1)``, so the sum
over n clients is at most ``n * max_weight * (2**bits - 1)``, which ``SecAggParams`` requires to
be ``<= 2**32 - 1``. The ring sum therefore equals the integer sum, and with
``W = sum_i w_i`` the server recovers

    sum_i w_i * clip(x_i)  ~=  S * 2c / (2**bits - 1) - W * c

(exact up to the rounding), then divides by ``W`` for the weighted mean.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shared.secagg.params import SecAggParams

RandBytes = Callable[[int], bytes]


def vector_length(n_params: int, n_metrics: int = 0) -> int:
    """Ring elements per client: weighted update, weight, weighted metrics."""
    return n_params + 1 + n_metrics


def _uniform01(n: int, randbytes: RandBytes) -> np.ndarray:
    words = np.frombuffer(randbytes(8 * n), dtype="<u8") >> np.uint64(11)
    return words.astype(np.float64) * (1.0 / (1 << 53))


def quantize(x: np.ndarray, clip_range: float, bits: int, randbytes: RandBytes) -> np.ndarray:
    """Clip to [-c, c] and stochastically round to integers in [0, 2**bits - 1] (int64).

    Raises:
        ValueError: ``x`` contains NaN (infinities are clipped like any large value).
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if np.isnan(x).any():
        raise ValueError("cannot encode an input containing NaN")
    levels = (1 << bits) - 1
    scaled = (np.clip(x, -clip_range, clip_range) + clip_range) * (levels / (2.0 * clip_range))
    q = np.floor(scaled + _uniform01(x.shape[0], randbytes))
    return np.clip(q, 0, levels).astype(np.int64)


def encode(
    update: np.ndarray,
    weight: int,
    params: SecAggParams,
    metrics: np.ndarray | None = None,
    randbytes: RandBytes = secrets.token_bytes,
) -> np.ndarray:
    """Encode one client's weighted input as uint32 ring elements (layout in module doc).

    Args:
        update: model update, any shape (flattened), float.
        weight: example count, ``1 <= weight <= params.max_weight``.
        params: round parameters (clip ranges, bits).
        metrics: values to average with the same weights (e.g. train loss), or None.
        randbytes: CSPRNG byte source for the stochastic rounding.

    Raises:
        ValueError: weight out of range, or NaN in update or metrics.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)):
        raise ValueError(f"weight must be an int example count, got {weight!r}")
    if not 1 <= weight <= params.max_weight:
        raise ValueError(f"weight must be in [1, max_weight={params.max_weight}], got {weight}")
    m = np.zeros(0) if metrics is None else np.asarray(metrics, dtype=np.float64).reshape(-1)
    q_update = quantize(np.asarray(update), params.clip_range, params.bits, randbytes)
    q_metrics = quantize(m, params.metric_clip_range, params.bits, randbytes)
    out = np.concatenate([q_update, np.ones(1, dtype=np.int64), q_metrics]) * int(weight)
    return out.astype(np.uint32)


@dataclass(frozen=True, eq=False)
class Aggregate:
    """Decoded secure sum: weighted means and the total weight ``sum_i w_i``."""

    mean_update: np.ndarray
    total_weight: int
    mean_metrics: np.ndarray


def _dequantize_sum(s: np.ndarray, total_weight: int, clip_range: float, bits: int) -> np.ndarray:
    scale = 2.0 * clip_range / ((1 << bits) - 1)
    return (s.astype(np.float64) * scale - total_weight * clip_range) / total_weight


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
    update = _dequantize_sum(total[:n_params], w, params.clip_range, params.bits)
    metrics = _dequantize_sum(total[n_params + 1 :], w, params.metric_clip_range, params.bits)
    return Aggregate(mean_update=update, total_weight=w, mean_metrics=metrics)
