"""L2 clipping of an update vector, with a norm bound that survives rounding.

Policy for awkward inputs (STYLE.md, "test norm 0, inf, NaN"):

* norm 0 (all zeros, or empty): returned unchanged; nothing is divided.
* NaN or +/-inf anywhere: ``ValueError`` naming how many values are non-finite. A site must
  not send such an update, and clipping cannot give it a meaningful direction.
* float32 input cannot overflow the norm: it is accumulated in float64. float64 input whose
  squares overflow (|x| > ~1e154) is refused like a non-finite one.

One implementation in torch serves every device (a reduction plus one multiply is already
memory-bound on GPU); results can differ between devices in the last bit because the
reduction order differs, but the norm bound below holds on each.
"""

import math

import numpy as np
import torch

from kernels._ring import check_tensor

# Relative margin that absorbs rounding in the norm (float64, <= 2**-22 for 2**31 terms) and
# in the float32 scale-and-round (2 * 2**-24), so the clipped norm never exceeds max_norm.
_MARGIN = 2.0**-20
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _check_float(x: object, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor) and x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    return check_tensor(x, name, x.dtype if isinstance(x, torch.Tensor) else torch.float32)


def l2_norm(x: torch.Tensor) -> float:
    """Euclidean norm of ``x`` (any shape), accumulated in float64.

    Raises:
        TypeError: not a float32/float64 tensor.
        ValueError: ``x`` holds NaN or inf, or its squares overflow float64.
    """
    _check_float(x, "x")
    norm = float(torch.linalg.vector_norm(x.detach().reshape(-1), dtype=torch.float64))
    if not math.isfinite(norm):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"cannot take the L2 norm: {bad} of {x.numel()} values are NaN or inf"
            if bad
            else "cannot take the L2 norm: the sum of squares overflows float64"
        )
    return norm


def l2_clip(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Return ``x * min(1, max_norm / ||x||_2)`` as a new tensor of ``x``'s dtype and shape.

    Guarantees: the exact L2 norm of the returned values is <= ``max_norm`` (the scale is
    shrunk by a relative 2**-20 to absorb rounding, so vectors within that margin of the
    bound are scaled too); a vector with norm <= max_norm * (1 - 2**-30) is returned as an
    unchanged copy; a zero or empty vector is returned unchanged.

    Raises:
        TypeError: ``x`` is not a contiguous float32/float64 tensor.
        ValueError: ``max_norm`` is not finite and > 0, or ``x`` has NaN/inf values.
    """
    if not (isinstance(max_norm, int | float) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    norm = l2_norm(x)
    if norm <= max_norm * (1.0 - 2.0**-30):
        return x.detach().clone()
    return x.detach() * (max_norm / norm * (1.0 - _MARGIN))


def reference_l2_clip(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Oracle in numpy float64: the same rule with a straightforward norm."""
    flat = x.detach().cpu().reshape(-1).numpy().astype(np.float64)
    if not np.isfinite(flat).all():
        raise ValueError("x holds NaN or inf")
    norm = float(np.sqrt(np.dot(flat, flat)))
    if norm <= max_norm * (1.0 - 2.0**-30):
        return x.detach().clone()
    factor = max_norm / norm * (1.0 - _MARGIN)
    return torch.from_numpy((flat * factor).astype(flat.dtype)).to(x.dtype).reshape(x.shape)
