"""Streaming accumulation, in place, so a server folds updates one at a time.

* :func:`accumulate_ring`: ``acc += x`` in Z_2^32 (exact, wraps mod 2**32).
* :func:`accumulate_weighted`: ``acc = fl32(acc + fl32(x * float32(w)))``, two roundings and
  no fused multiply-add, so CPU and CUDA give the same bits.

Memory stays at one accumulator plus the update being folded, for any number of updates.
"""

import math

import numpy as np
import torch

from kernels._ring import (
    CPU_CHUNK,
    RING_DTYPE,
    check_same_layout,
    check_tensor,
    chunks,
    flat_numpy,
    is_cuda,
    ring_to_unsigned,
    wrap_to_ring,
)

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_pair(acc: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> None:
    check_tensor(acc, "acc", dtype)
    check_tensor(x, "x", dtype)
    check_same_layout(acc, x, ("acc", "x"))


def accumulate_ring(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``acc += x`` mod 2**32 in place; both ``torch.int32`` ring tensors of one shape/device.

    Returns:
        ``acc``. Exact in Z_2^32 (int32 addition wraps), identical on CPU and CUDA.

    Raises:
        TypeError, ValueError: wrong dtype, non-contiguous, or mismatched shape/device.
    """
    _check_pair(acc, x, RING_DTYPE)
    if is_cuda(acc):
        from kernels._triton import launch

        launch.accumulate_ring(acc, x)
    else:
        acc.add_(x)  # torch's int32 add wraps and streams at copy speed on one thread
    return acc


def reference_accumulate_ring(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Out-of-place oracle in int64, reduced mod 2**32."""
    _check_pair(acc, x, RING_DTYPE)
    return wrap_to_ring(ring_to_unsigned(acc) + ring_to_unsigned(x))


def _check_weight(w: object) -> float:
    if not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w):
        raise ValueError(f"w must be a finite number, got {w!r}")
    if abs(w) > _FLOAT32_MAX:
        raise ValueError(f"w must fit in float32 (|w| <= {_FLOAT32_MAX:.7g}), got {w!r}")
    return float(np.float32(w))


def accumulate_weighted(acc: torch.Tensor, x: torch.Tensor, w: float) -> torch.Tensor:
    """``acc += float32(w) * x`` in place, float32, rounding the product then the sum.

    Returns:
        ``acc``. The same bits on CPU and CUDA (no fused multiply-add on either). Non-finite
        values in ``x`` propagate into ``acc`` (check updates at the boundary).

    Raises:
        TypeError, ValueError: wrong dtype, non-contiguous, mismatched shape/device, or a
            weight that is not finite in float32.
    """
    _check_pair(acc, x, torch.float32)
    w32 = _check_weight(w)
    if is_cuda(acc):
        from kernels._triton import launch

        launch.accumulate_weighted(acc, x, w32)
        return acc
    a, b = flat_numpy(acc), flat_numpy(x)
    product = np.empty(min(a.size, CPU_CHUNK), dtype=np.float32)
    for part in chunks(a.size, product.size or 1):
        p = product[: part.stop - part.start]
        np.multiply(b[part], np.float32(w32), out=p)
        np.add(a[part], p, out=a[part])
    return acc


def reference_accumulate_weighted(acc: torch.Tensor, x: torch.Tensor, w: float) -> torch.Tensor:
    """Out-of-place oracle: two separate float32 torch operations."""
    _check_pair(acc, x, torch.float32)
    product = x * torch.tensor(_check_weight(w), dtype=torch.float32)
    return acc + product
