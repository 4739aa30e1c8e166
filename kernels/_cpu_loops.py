"""Fused CPU loops, compiled by numba when this module is first imported.

One pass per chunk instead of numpy's eight: each element of ``x`` is read once, rounded with
its dither and written once. The loops are private to :mod:`kernels.quantize`, which states
the rule they implement (its module docstring) and holds the pure reference they are tested
against. All arithmetic stays in float32 / uint32 as the rule says: the signatures fix the
scalar types, and numba contracts nothing into FMAs without ``fastmath``.

Signatures are explicit, so compiling happens at import (about 1 s, once per machine: the
machine code is cached on disk beside this file, or in numba's per-user cache directory
where this folder is read-only; with neither writable, once per process), never inside a
timed call. ``nogil``: the loops release the
GIL, so the threads of ``quantize(..., threads=n)`` run them side by side.
"""

import numba
import numpy as np

_DITHER_SHIFT = np.uint32(16)
_DITHER_SCALE = np.float32(1 << 16)

_OPTIONS = {"nogil": True, "boundscheck": False, "error_model": "numpy"}


def _compiled(signature: str):
    """``numba.njit(signature)`` with its machine code cached on disk where numba finds a
    writable place (beside this file, or its per-user cache); where it finds none (a
    read-only install without a writable home), compiled for this process only."""

    def wrap(fn):
        try:
            return numba.njit(signature, cache=True, **_OPTIONS)(fn)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            return numba.njit(signature, cache=False, **_OPTIONS)(fn)

    return wrap


@_compiled("int64(float32[::1], uint16[::1], int32[::1], float32, float32, boolean)")
def round_into_ring(x, dither, out, clip, scale, narrow):  # pragma: no cover - compiled
    """``y = fl32(fl32(clip(x) + c) * scale)``, rounded with the 16-bit ``dither`` into ``out``.

    ``narrow`` (bits <= 16): ``scale`` is ``s * 2**16`` (a power-of-two factor, so the same
    bits as scaling after) and ``out = (uint32(y) + dither) >> 16``. Otherwise ``scale`` is
    ``s``, ``y = floor(y) + frac`` exactly and only the fraction is rounded with the dither.
    The flag is loop-invariant: LLVM compiles one vector loop per branch.

    Returns how many elements of ``x`` were NaN (their outputs are meaningless).
    """
    nans = 0
    for i in range(x.size):
        v = x[i]
        nans += v != v
        y = (min(max(v, -clip), clip) + clip) * scale
        if narrow:
            out[i] = np.int32((np.uint32(y) + np.uint32(dither[i])) >> _DITHER_SHIFT)
        else:
            whole = np.floor(y)
            fixed = np.uint32((y - whole) * _DITHER_SCALE) + np.uint32(dither[i])
            out[i] = np.int32(whole) + np.int32(fixed >> _DITHER_SHIFT)
    return nans
