"""The protocol's door to ``kernels``: mask keys, masking and folding in Z_2^32.

The protocol keeps ring vectors as numpy ``uint32`` (4 bytes per element on the wire); the
kernels work on ``torch.int32`` bit patterns. ``torch.from_numpy(x.view(np.int32))`` shares
memory, so every call here works in place on the caller's array with no copy.

Mask keys are full 256-bit ChaCha20 keys plus nonce from ``kernels.derive_mask_key`` (HKDF
over a 32-byte secret and a context naming run, round, purpose and, for pairwise masks, the
unordered pair of round-local client indices). A mask is the RFC 8439 keystream of its key.

Guarantees:
    * Both ends of a pair derive the same key from the same X25519 secret; the sign comes
      from the order of the indices (the lower index adds, the higher subtracts).
    * ``add_masks`` and ``fold`` are exact modulo 2**32 for any input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kernels import (
    MaskContext,
    MaskKey,
    MaskPurpose,
    accumulate_ring,
    derive_mask_key,
)
from kernels import (
    add_masks as _kernel_add_masks,
)
from kernels import (
    mask_sum as _kernel_mask_sum,
)


def _ring_view(x: np.ndarray) -> torch.Tensor:
    if x.dtype != np.uint32 or not x.flags.c_contiguous or not x.flags.writeable:
        raise TypeError(f"ring vectors are writable contiguous uint32, got {x.dtype}")
    return torch.from_numpy(x.view(np.int32))


def pair_mask_key(secret: bytes, run_id: int, round_: int, a: int, b: int) -> MaskKey:
    """Key of the pairwise mask between clients a != b (symmetric in a, b)."""
    context = MaskContext(str(run_id), round_, MaskPurpose.PAIRWISE_MASK, (a, b))
    return derive_mask_key(secret, context)


def pair_sign(owner: int, peer: int) -> int:
    """+1 if ``owner`` adds the pair's mask, -1 if it subtracts it."""
    return 1 if owner < peer else -1


def self_mask_key(seed: bytes, run_id: int, round_: int) -> MaskKey:
    """Key of a client's self mask, from its private 32-byte seed."""
    return derive_mask_key(seed, MaskContext(str(run_id), round_, MaskPurpose.SELF_MASK))


def add_masks(x: np.ndarray, keys: Sequence[MaskKey], signs: Sequence[int]) -> None:
    """``x += sum_i signs[i] * mask(keys[i])`` in place, mod 2**32 (one pass over x)."""
    if keys:
        _kernel_add_masks(_ring_view(x), list(keys), list(signs))


def mask_sum(n: int, keys: Sequence[MaskKey], signs: Sequence[int]) -> np.ndarray:
    """A fresh uint32 vector of ``n`` elements: ``sum_i signs[i] * mask(keys[i])`` mod 2**32."""
    out = np.empty(n, dtype=np.uint32)
    _kernel_mask_sum(_ring_view(out), list(keys), list(signs))
    return out


def fold(acc: np.ndarray, x: np.ndarray) -> None:
    """``acc += x`` in place, mod 2**32."""
    if x.dtype != np.uint32 or x.shape != acc.shape:
        raise TypeError(f"cannot fold {x.dtype} {x.shape} into uint32 {acc.shape}")
    if not x.flags.writeable:  # a view of a received record's bytes: torch would warn
        np.add(acc, x, out=acc)  # uint32 addition wraps: the same ring sum
        return
    accumulate_ring(_ring_view(acc), torch.from_numpy(np.ascontiguousarray(x).view(np.int32)))
