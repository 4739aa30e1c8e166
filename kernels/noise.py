"""Secure DP noise from ChaCha20 streams: continuous Gaussian and discrete Gaussian.

Both samplers take a :class:`~kernels.keys.MaskKey` (use ``MaskPurpose.DP_NOISE``) and read
its stream from block 0, so noise is cryptographically unpredictable without the key and
reproducible with it. Never reuse a noise key for two draws that must be independent.

Uniforms: a 53-bit uniform ``k / 2**53`` is built from two consecutive stream words
``(a, b)`` as ``k = (a >> 6) * 2**27 + (b >> 5)``.
"""

import math

import numpy as np
import torch

from kernels._ring import RING_DTYPE, ring_to_unsigned
from kernels.chacha20 import (
    KeystreamReader,
    chacha20_keystream,
    check_stream_args,
    reference_chacha20_keystream,
)
from kernels.keys import MaskKey

MAX_DISCRETE_SIGMA = float(1 << 20)
_TWO_POW_53 = float(1 << 53)


def _check_noise_args(n: object, sigma: object, key: object, max_sigma: float) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and 0 < sigma <= max_sigma):
        raise ValueError(f"sigma must be a finite number in (0, {max_sigma:g}], got {sigma!r}")
    if not isinstance(key, MaskKey):
        raise TypeError(f"key must be a MaskKey, got {type(key).__name__}")


def uniforms53(words: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in [0, 1) from pairs of stream words (an even-length int32 tensor)."""
    pairs = ring_to_unsigned(words).view(-1, 2)
    k = (pairs[:, 0] >> 6) * (1 << 27) + (pairs[:, 1] >> 5)
    return k.to(torch.float64) / _TWO_POW_53


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Two standard normals per (u1, u2); u1 is shifted by half a step so log(u1) is finite."""
    radius = torch.sqrt(-2.0 * torch.log(u1 + 0.5 / _TWO_POW_53))
    theta = (2.0 * math.pi) * u2
    return torch.stack((radius * torch.cos(theta), radius * torch.sin(theta)), dim=1).view(-1)


def gaussian_noise(
    n: int, sigma: float, key: MaskKey, *, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``n`` float32 draws of N(0, sigma**2) by Box-Muller on 53-bit ChaCha20 uniforms.

    Pair ``i`` of outputs (elements 2i, 2i+1) uses stream words 4i..4i+3. Computed in
    float64, then scaled and rounded to float32. Tails are cut at about 8.6 sigma (the
    smallest uniform is 2**-54), a mass below 1e-17.

    Guarantees: same values on every run for a key. On CUDA the words come from the Triton
    keystream and the transform runs there; CUDA and CPU math libraries may differ in the
    last bit. This is floating-point noise (as in Opacus): use
    :func:`discrete_gaussian_noise` where the privacy proof needs exact distributions.

    Raises:
        TypeError, ValueError: bad ``n``, ``sigma`` or ``key``.
    """
    _check_noise_args(n, sigma, key, math.inf)
    n_pairs = -(-n // 2)
    words = chacha20_keystream(key.key, key.nonce, 0, 4 * n_pairs, device=device)
    u = uniforms53(words).view(-1, 2)
    z = _box_muller(u[:, 0], u[:, 1])[:n]
    return (z * sigma).to(torch.float32)


def reference_gaussian_noise(n: int, sigma: float, key: MaskKey) -> torch.Tensor:
    """Oracle: the same transform with Python's math module, one pair at a time."""
    _check_noise_args(n, sigma, key, math.inf)
    n_pairs = -(-n // 2)
    words = np.frombuffer(_stream_bytes(key, 4 * n_pairs), dtype="<u4").astype(np.int64)
    out = []
    for a, b, c, d in words.reshape(-1, 4).tolist():
        u1 = ((a >> 6) * (1 << 27) + (b >> 5)) / _TWO_POW_53
        u2 = ((c >> 6) * (1 << 27) + (d >> 5)) / _TWO_POW_53
        radius = math.sqrt(-2.0 * math.log(u1 + 0.5 / _TWO_POW_53))
        out += [radius * math.cos(2.0 * math.pi * u2), radius * math.sin(2.0 * math.pi * u2)]
    return torch.tensor(out[:n], dtype=torch.float64).mul(sigma).to(torch.float32)


def _stream_bytes(key: MaskKey, n_words: int) -> bytes:
    return reference_chacha20_keystream(key.key, key.nonce, 0, n_words).numpy().tobytes()


# Discrete Gaussian ------------------------------------------------------------------------

_WORDS_PER_CANDIDATE = 6  # three 53-bit uniforms: two geometrics and one acceptance test


def _candidates(u: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Discrete-Laplace candidates and their acceptance flags (CKS 2020, Algorithm 3).

    ``u`` is [m, 3] uniforms in [0, 1). Y = G1 - G2 with G ~ Geometric(1 - e^(-1/t)) by
    inversion, t = floor(sigma) + 1; accept with probability
    exp(-(|Y| - sigma**2 / t)**2 / (2 sigma**2)).
    """
    t = math.floor(sigma) + 1
    geometric = np.floor(-t * np.log1p(-u[:, :2]))
    y = geometric[:, 0] - geometric[:, 1]
    accept = u[:, 2] < np.exp(-((np.abs(y) - sigma * sigma / t) ** 2) / (2 * sigma * sigma))
    return y, accept


def _uniform_rows(words: np.ndarray) -> np.ndarray:
    pairs = words.astype(np.int64).reshape(-1, 2)
    return (((pairs[:, 0] >> 6) << 27) + (pairs[:, 1] >> 5)).reshape(-1, 3) / _TWO_POW_53


def discrete_gaussian_noise(
    n: int, sigma: float, key: MaskKey, *, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``n`` draws of the discrete Gaussian N_Z(0, sigma**2) as ring (``torch.int32``) values.

    Candidate ``j`` uses stream words 6j..6j+5 (three 53-bit uniforms); the output is the
    first ``n`` accepted candidates in order, so it does not depend on batching.

    Approximation (documented, not exact): this is the rejection sampler of Canonne, Kamath &
    Steinke (2020, Algorithm 3) with its Bernoulli(exp(-gamma)) and geometric draws done in
    float64 (inversion of 53-bit uniforms, numpy log1p/exp) instead of exact rational
    arithmetic. Each probability is off by float64 rounding (~1e-16 relative) and the
    discrete-Laplace proposal is cut at ~37 t. Values are integers, symmetric about 0, with
    variance sigma**2 up to a relative 1e-12 for sigma >= 1.

    The int32 values are the two's-complement ring elements of the signed noise, so
    ``accumulate_ring(q, noise)`` adds it in Z_2^32. Generated on the CPU (rejection
    sampling), then moved to ``device``.

    Raises:
        TypeError, ValueError: bad ``n``, ``key`` or ``sigma`` (must be in (0, 2**20]).
    """
    _check_noise_args(n, sigma, key, MAX_DISCRETE_SIGMA)
    reader = KeystreamReader(key.key, key.nonce)
    accepted: list[np.ndarray] = []
    have, used = 0, 0
    while have < n:
        batch = int((n - have) * 2.2) + 64
        used += batch * _WORDS_PER_CANDIDATE
        check_stream_args(key.key, key.nonce, 0, used)
        words = np.empty(batch * _WORDS_PER_CANDIDATE, dtype=np.uint32)
        reader.read_into(words)
        y, accept = _candidates(_uniform_rows(words), float(sigma))
        accepted.append(y[accept][: n - have])
        have += accepted[-1].size
    values = np.concatenate(accepted) if accepted else np.zeros(0)
    out = torch.from_numpy(values.astype(np.int32))
    return out.to(device) if torch.device(device).type != "cpu" else out


def reference_discrete_gaussian_noise(n: int, sigma: float, key: MaskKey) -> torch.Tensor:
    """Oracle: the same sampler one candidate at a time with Python's math module."""
    _check_noise_args(n, sigma, key, MAX_DISCRETE_SIGMA)
    t = math.floor(sigma) + 1
    words = np.frombuffer(_stream_bytes(key, 6 * (4 * n + 64)), dtype="<u4").astype(np.int64)
    out: list[int] = []
    for a, b, c, d, e, f in words.reshape(-1, 6).tolist():
        if len(out) == n:
            break
        u = [((hi >> 6 << 27) + (lo >> 5)) / _TWO_POW_53 for hi, lo in ((a, b), (c, d), (e, f))]
        y = math.floor(-t * math.log1p(-u[0])) - math.floor(-t * math.log1p(-u[1]))
        if u[2] < math.exp(-((abs(y) - sigma * sigma / t) ** 2) / (2 * sigma * sigma)):
            out.append(y)
    if len(out) < n:  # acceptance >= 0.5 makes this astronomically unlikely
        raise RuntimeError(f"reference sampler accepted only {len(out)} of {n} candidates")
    return torch.tensor(out, dtype=RING_DTYPE)
