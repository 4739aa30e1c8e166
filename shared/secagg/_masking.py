"""Mask streams in Z_2^32 for SecAgg+: the one place the protocol touches a PRG.

A mask is the RFC 8439 ChaCha20 keystream (read as little-endian uint32 words, block counter
from 0) under a full 256-bit key that HKDF derives from a 32-byte secret and a context naming
(purpose, run, round, pair). This adapter uses ``cryptography``'s ChaCha20 directly and has
exactly the semantics of ``kernels.chacha20_keystream``; it is replaced by the kernels when
they are available, without changing a single mask.

Guarantees:
    * Equal (secret, purpose, run, round, unordered pair) give equal masks on every party;
      any difference gives an independent mask.
    * ``apply_mask`` works in place modulo 2**32 (uint32 wrap-around), exact for any input.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from shared.secagg.crypto import Purpose, derive_key

_ZERO_NONCE = bytes(12)


def mask_key(secret: bytes, *, purpose: Purpose, run_id: int, round_: int, a: int, b: int) -> bytes:
    """256-bit ChaCha20 key of one mask (pairwise: ``a, b`` unordered; self: ``a == b``)."""
    return derive_key(secret, purpose=purpose, run_id=run_id, round_=round_, a=a, b=b)


def keystream_u32(key: bytes, n_words: int) -> np.ndarray:
    """First ``n_words`` little-endian uint32 words of ChaCha20(key, nonce=0, counter=0)."""
    enc = Cipher(algorithms.ChaCha20(key, bytes(4) + _ZERO_NONCE), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(4 * n_words)), dtype="<u4").astype(np.uint32, copy=False)


def apply_mask(x: np.ndarray, key: bytes, sign: int) -> None:
    """``x += sign * keystream(key)`` in place, modulo 2**32 (``sign`` is +1 or -1)."""
    if x.dtype != np.uint32:
        raise TypeError(f"masked vectors are uint32, got {x.dtype}")
    stream = keystream_u32(key, x.shape[0])
    if sign == 1:
        np.add(x, stream, out=x)
    elif sign == -1:
        np.subtract(x, stream, out=x)
    else:
        raise ValueError(f"sign must be +1 or -1, got {sign}")
