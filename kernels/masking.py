"""Masking in Z_2^32: add or subtract ChaCha20 keystreams from a ring vector, in place.

A mask for :class:`~kernels.keys.MaskKey` ``k`` over ``n`` elements is the first ``n`` words
of the ChaCha20 stream of ``(k.key, k.nonce)`` from block 0 (see
:func:`kernels.chacha20.chacha20_keystream`). On CUDA the masks of all keys are generated
and summed in registers by one Triton kernel (no mask tensor exists); on CPU they are drawn
in cache-sized chunks through OpenSSL (which releases the GIL, so masks can be drawn on one
thread while another trains).

:func:`mask_sum` writes the signed sum of masks into a buffer instead of adding it, for a
caller that draws its masks before the vector they will hide exists.
"""

from collections.abc import Sequence

import numpy as np
import torch

from kernels._ring import (
    CPU_CHUNK,
    RING_DTYPE,
    check_tensor,
    chunks,
    flat_numpy,
    is_cuda,
    ring_to_unsigned,
    wrap_to_ring,
)
from kernels.chacha20 import KeystreamReader, check_stream_args, reference_chacha20_keystream
from kernels.keys import MaskKey


def _check_mask_args(x: torch.Tensor, keys: Sequence[MaskKey], signs: Sequence[int]) -> None:
    check_tensor(x, "x", RING_DTYPE)
    if len(keys) != len(signs):
        raise ValueError(f"keys and signs must pair up, got {len(keys)} keys, {len(signs)} signs")
    for key in keys:
        if not isinstance(key, MaskKey):
            raise TypeError(f"keys must be MaskKey objects, got {type(key).__name__}")
        check_stream_args(key.key, key.nonce, 0, x.numel())
    for sign in signs:
        if sign not in (1, -1) or isinstance(sign, bool):
            raise ValueError(f"signs must be +1 or -1, got {sign!r}")


def add_masks(x: torch.Tensor, keys: Sequence[MaskKey], signs: Sequence[int]) -> torch.Tensor:
    """Add ``sum_i signs[i] * mask(keys[i])`` to ``x`` in Z_2^32, in place.

    Args:
        x: contiguous ``torch.int32`` ring vector (any shape; masks follow its flat order).
        keys: one :class:`MaskKey` per mask.
        signs: +1 to add, -1 to subtract, one per key.

    Returns:
        ``x`` itself. The result is exact mod 2**32 and identical on CPU and CUDA, so a mask
        added with +1 and the same mask added with -1 cancel bit for bit.

    Raises:
        TypeError, ValueError: wrong dtype, non-contiguous ``x``, mismatched lengths, signs
            other than +1/-1, or more than 2**32 blocks of stream per key.
    """
    _check_mask_args(x, keys, signs)
    if is_cuda(x):
        from kernels._triton import launch

        pairs = [(k.key, k.nonce) for k in keys]
        launch.add_masks(x, launch.key_rows(pairs, signs, x.device))
        return x
    _add_masks_cpu(flat_numpy(x), keys, signs)
    return x


def mask_sum(x: torch.Tensor, keys: Sequence[MaskKey], signs: Sequence[int]) -> torch.Tensor:
    """Overwrite ``x`` with ``sum_i signs[i] * mask(keys[i])`` in Z_2^32 (old values ignored).

    Equals ``add_masks(x.zero_(), keys, signs)`` bit for bit, without the zero pass on CPU
    (the first keystream is written straight into ``x``). No keys: ``x`` becomes zeros.

    Raises:
        TypeError, ValueError: as :func:`add_masks`.
    """
    _check_mask_args(x, keys, signs)
    if is_cuda(x) or not keys:
        return add_masks(x.zero_(), keys, signs)
    _add_masks_cpu(flat_numpy(x), keys, signs, overwrite=True)
    return x


def _add_masks_cpu(
    flat: np.ndarray, keys: Sequence[MaskKey], signs: Sequence[int], overwrite: bool = False
) -> None:
    readers = [KeystreamReader(k.key, k.nonce) for k in keys]
    mask = np.empty(min(flat.size, CPU_CHUNK), dtype=np.int32)
    for part in chunks(flat.size, mask.size or 1):
        target = flat[part]
        m = mask[: target.size]
        for i, (reader, sign) in enumerate(zip(readers, signs, strict=True)):
            if overwrite and i == 0:  # the first mask is written, not added
                reader.read_into(target)
                if sign == -1:
                    np.negative(target, out=target)
                continue
            reader.read_into(m)
            (np.add if sign == 1 else np.subtract)(target, m, out=target)


def reference_add_masks(
    x: torch.Tensor, keys: Sequence[MaskKey], signs: Sequence[int]
) -> torch.Tensor:
    """Out-of-place oracle: int64 arithmetic with the numpy reference keystream, then mod 2**32."""
    _check_mask_args(x, keys, signs)
    total = ring_to_unsigned(x.reshape(-1).cpu())
    for key, sign in zip(keys, signs, strict=True):
        mask = reference_chacha20_keystream(key.key, key.nonce, 0, x.numel())
        total = total + sign * ring_to_unsigned(mask)
    return wrap_to_ring(total).reshape(x.shape)
