"""Vectorised Shamir secret sharing over GF(p), p = 2**61 - 1 (a Mersenne prime).

Field elements are numpy ``uint64`` arrays holding canonical values in ``[0, p)``. The
product of two elements needs 122 bits, so ``mulmod`` splits each operand into 32-bit halves
and folds the partial products with ``2**61 = 1 (mod p)``; no intermediate exceeds 2**63.

Secrets are byte strings (32-byte keys and seeds) cut into 7-byte chunks, one field element
each (56 bits < 61 bits), so a 32-byte secret is 5 field elements.

Guarantees:
    * ``split`` draws every polynomial coefficient from the caller's CSPRNG byte source
      (``secrets.token_bytes`` by default), uniformly over GF(p) by rejection sampling.
    * Any t shares with distinct non-zero x reconstruct the secret exactly; any t - 1 shares
      are consistent with every secret (the coefficients are uniform), so they reveal nothing.
    * ``reconstruct`` handles many secrets with different share holders in one call: the
      Lagrange coefficients are computed once per row and applied to all chunks of the row.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

P = (1 << 61) - 1
CHUNK_BYTES = 7
_P = np.uint64(P)
_M32 = np.uint64(0xFFFFFFFF)
_M29 = np.uint64((1 << 29) - 1)

RandBytes = Callable[[int], bytes]


def _reduce_once(x: np.ndarray) -> np.ndarray:
    return x - np.where(x >= _P, _P, np.uint64(0))  # never underflows


def mulmod(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Elementwise ``a * b mod p`` for canonical uint64 inputs (broadcasting)."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    a0, a1 = a & _M32, a >> np.uint64(32)
    b0, b1 = b & _M32, b >> np.uint64(32)
    lo = a0 * b0  # < 2**64
    mid = a1 * b0 + a0 * b1  # < 2**62
    hi = a1 * b1  # < 2**58; hi * 2**64 = hi * 8 (mod p)
    r = (
        (hi << np.uint64(3))
        + (mid >> np.uint64(29))
        + ((mid & _M29) << np.uint64(32))
        + (lo & _P)
        + (lo >> np.uint64(61))
    )  # < 2**63
    return _reduce_once((r & _P) + (r >> np.uint64(61)))


def addmod(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Elementwise ``a + b mod p``."""
    return _reduce_once(np.asarray(a, dtype=np.uint64) + np.asarray(b, dtype=np.uint64))


def submod(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Elementwise ``a - b mod p``."""
    return _reduce_once(np.asarray(a, dtype=np.uint64) + (_P - np.asarray(b, dtype=np.uint64)))


def summod(a: np.ndarray, axis: int) -> np.ndarray:
    """Sum along ``axis`` mod p, exact for fewer than 2**32 terms."""
    a = np.asarray(a, dtype=np.uint64)
    lo = (a & _M32).sum(axis=axis, dtype=np.uint64)
    hi = (a >> np.uint64(32)).sum(axis=axis, dtype=np.uint64)
    lo = _reduce_once((lo & _P) + (lo >> np.uint64(61)))
    hi = _reduce_once((hi & _P) + (hi >> np.uint64(61)))
    return addmod(mulmod(hi, np.uint64(1 << 32)), lo)


def powmod(a: np.ndarray, e: int) -> np.ndarray:
    """Elementwise ``a ** e mod p`` by square-and-multiply (e >= 0)."""
    result = np.ones_like(np.asarray(a, dtype=np.uint64))
    base = np.asarray(a, dtype=np.uint64).copy()
    while e:
        if e & 1:
            result = mulmod(result, base)
        base = mulmod(base, base)
        e >>= 1
    return result


def invmod(a: np.ndarray) -> np.ndarray:
    """Elementwise inverse mod p. Raises ValueError on a zero element.

    Python's exact ``pow(x, -1, p)`` per element: a 61-bit modulus is one machine word for
    it, ~1 us per element, where Fermat's ``powmod(a, p - 2)`` takes ~120 vectorised
    ``mulmod`` calls of ~15 numpy operations each (a few ms for any small array).
    """
    a = np.asarray(a, dtype=np.uint64)
    if np.any(a == 0):
        raise ValueError("0 has no inverse mod p")
    flat = [pow(v, -1, P) for v in a.reshape(-1).tolist()]
    return np.array(flat, dtype=np.uint64).reshape(a.shape)


def random_field(shape: tuple[int, ...], randbytes: RandBytes = secrets.token_bytes) -> np.ndarray:
    """Uniform elements of GF(p) from a CSPRNG byte source (rejection of the value p)."""
    count = int(np.prod(shape, dtype=np.int64))
    out = np.frombuffer(randbytes(8 * count), dtype="<u8").astype(np.uint64) & _P
    bad = out == _P
    while bad.any():  # probability 2**-61 per element
        out[bad] = np.frombuffer(randbytes(8 * int(bad.sum())), dtype="<u8") & _P
        bad = out == _P
    return out.reshape(shape)


def secret_to_field(secret: bytes) -> np.ndarray:
    """Cut a byte string into 7-byte little-endian chunks, one field element each."""
    n_chunks = -(-len(secret) // CHUNK_BYTES)
    padded = secret.ljust(n_chunks * CHUNK_BYTES, b"\0")
    return np.array(
        [int.from_bytes(padded[i : i + CHUNK_BYTES], "little") for i in range(0, len(padded), 7)],
        dtype=np.uint64,
    )


def field_to_secret(elems: np.ndarray, length: int) -> bytes:
    """Inverse of ``secret_to_field``. Raises ValueError if an element exceeds 7 bytes."""
    if np.any(np.asarray(elems, dtype=np.uint64) >> np.uint64(8 * CHUNK_BYTES)):
        raise ValueError("field element does not encode a 7-byte chunk (wrong shares?)")
    raw = b"".join(int(e).to_bytes(CHUNK_BYTES, "little") for e in elems)
    return raw[:length]


def split(
    secret_elems: np.ndarray, xs: Sequence[int], t: int, randbytes: RandBytes = secrets.token_bytes
) -> np.ndarray:
    """Share field elements with threshold t.

    Args:
        secret_elems: shape ``(E,)`` canonical field elements (all shared with independent
            polynomials of degree t - 1).
        xs: distinct non-zero evaluation points, one per holder.
        t: threshold, 1 <= t <= len(xs).
        randbytes: CSPRNG byte source for the coefficients.

    Returns:
        uint64 array ``(len(xs), E)``: row h is holder ``xs[h]``'s share.
    """
    x = np.asarray(xs, dtype=np.uint64)
    if not 1 <= t <= len(x):
        raise ValueError(f"t must be in [1, {len(x)}] holders, got {t}")
    if np.any(x == 0) or np.any(x >= _P) or len(set(x.tolist())) != len(x):
        raise ValueError(f"share points must be distinct and in [1, p), got {list(xs)}")
    s = np.asarray(secret_elems, dtype=np.uint64)
    poly = np.concatenate([s[None, :], random_field((t - 1, s.shape[0]), randbytes)])
    acc = np.broadcast_to(poly[-1], (len(x), s.shape[0])).copy()
    for c in poly[-2::-1]:  # Horner from the highest coefficient down to the secret
        acc = addmod(mulmod(acc, x[:, None]), c[None, :])
    return acc


def lagrange_at_zero(xs: np.ndarray) -> np.ndarray:
    """Lagrange coefficients at 0 for each row of points ``xs`` of shape ``(B, t)``.

    Row b's coefficients satisfy ``f(0) = sum_j lam[b, j] * f(xs[b, j])`` for every polynomial
    f of degree < t. Points in a row must be distinct and non-zero (ValueError otherwise).
    """
    x = np.asarray(xs, dtype=np.uint64)
    b, t = x.shape
    num = np.ones((b, t), dtype=np.uint64)
    den = np.ones((b, t), dtype=np.uint64)
    eye = np.eye(t, dtype=bool)
    for m in range(t):
        xm = x[:, m : m + 1]
        num = mulmod(num, np.where(eye[m], np.uint64(1), xm))
        den = mulmod(den, np.where(eye[m], np.uint64(1), submod(xm, x)))
    if np.any(den == 0):
        raise ValueError("share points within a row must be distinct")
    return mulmod(num, invmod(den))


def reconstruct(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Reconstruct many secrets at once.

    Args:
        xs: ``(B, t)`` share points, one row per secret group.
        ys: ``(B, t, E)`` shares: ``ys[b, j]`` is holder ``xs[b, j]``'s share of group b.

    Returns:
        ``(B, E)`` the constant terms. Exact when each row holds t shares of one polynomial
        of degree < t; otherwise a value unrelated to the secret.
    """
    lam = lagrange_at_zero(xs)
    return summod(mulmod(lam[:, :, None], np.asarray(ys, dtype=np.uint64)), axis=1)


def reference_reconstruct(points: Sequence[tuple[int, int]]) -> int:
    """Scalar oracle: Lagrange interpolation at 0 with Python integers."""
    total = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * xm % P
                den = den * (xm - xj) % P
        total = (total + yj * num * pow(den, P - 2, P)) % P
    return total
