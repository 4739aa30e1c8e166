"""Secure DP noise from ChaCha20 streams: continuous Gaussian and discrete Gaussian.

Both samplers take a :class:`~kernels.keys.MaskKey` (use ``MaskPurpose.DP_NOISE``) and read
its stream from block 0, so noise is cryptographically unpredictable without the key and
reproducible with it. Never reuse a noise key for two draws that must be independent.

Layers: :func:`gaussian_noise` (CPU fast path in float32 numpy, chunked to stay in cache;
one fused Triton kernel on CUDA, keystream and transform together; a torch path for other
devices), :func:`reference_gaussian_noise` (float64 Python math, one
pair at a time) and the discrete sampler with its own reference.
"""

import math

import numpy as np
import torch

from kernels._ring import RING_DTYPE
from kernels.chacha20 import (
    KeystreamReader,
    chacha20_keystream,
    check_stream_args,
    reference_chacha20_keystream,
)
from kernels.keys import MaskKey

MAX_DISCRETE_SIGMA = float(1 << 20)
_TWO_POW_53 = float(1 << 53)

#: Box-Muller pairs per run: a run reads ``3 * GAUSS_RUN`` stream words (see gaussian_noise).
GAUSS_RUN = 256
#: Runs per CPU chunk (64 runs: 192 KiB of stream words, so a chunk's temporaries stay in L2).
_GAUSS_CHUNK_RUNS = 64
_ANGLE_SCALE = math.pi * 2.0**-31  # signed 32-bit word -> angle in [-pi, pi)
_LOW63 = (1 << 63) - 1


def _check_noise_args(n: object, sigma: object, key: object, max_sigma: float) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and 0 < sigma <= max_sigma):
        raise ValueError(f"sigma must be a finite number in (0, {max_sigma:g}], got {sigma!r}")
    if not isinstance(key, MaskKey):
        raise TypeError(f"key must be a MaskKey, got {type(key).__name__}")


def gaussian_noise(
    n: int, sigma: float, key: MaskKey, *, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``n`` float32 draws of N(0, sigma**2): Box-Muller on ChaCha20 words.

    Layout (prefix-stable: the first ``k`` outputs do not depend on ``n``): the stream is
    cut into runs of ``3 * R`` 32-bit words, ``R = GAUSS_RUN``. In run ``j``, words
    ``2k, 2k + 1`` form a little-endian 64-bit integer whose low 63 bits are ``M_k``, and
    word ``2R + k`` is the signed 32-bit integer ``T_k``. Pair ``k`` is
    ``u = (M_k + 1/2) / 2**63`` (in (0, 1)), ``r = sigma * sqrt(-2 ln u)``,
    ``theta = T_k * pi / 2**31`` (in [-pi, pi)); it gives output ``2R j + k = r cos(theta)``
    and output ``2R j + R + k = r sin(theta)``. 95 of 96 stream bits per pair are used
    (6 stream bytes per output).

    Guarantees:
        * Box-Muller, exact up to the grids of the uniforms: the radius uses 63 bits, so
          ``|z| <= 9.42 sigma``, and N(0, 1) has mass 4.5e-21 beyond that (float32
          ``torch.normal`` uses 24-bit uniforms: cut at 5.77 sigma, mass 8e-9). The angle
          grid is ``2 pi / 2**32``. Mean 0, variance ``sigma**2``, symmetry and the
          independence of the two outputs of a pair hold up to those grids. Never inf or NaN
          (for ``sigma < 1e18``).
        * ``ln u`` is taken in float64 (no loss near ``u = 1``, i.e. at small radii), the
          rest in float32: every output is within ``2e-6 * (sigma + |z|)`` of the float64
          :func:`reference_gaussian_noise` (rounding and numpy's or torch's float32
          sin/cos; the last bit may differ between CPU and CUDA).
        * The same values on every run for a key.

    Cost on CPU: the keystream (OpenSSL, ~6 GB/s) plus a vectorised float32 transform in
    chunks that stay in L2; about as fast as ``torch.normal`` (``noise`` in benchmarks.dpsgd).

    This is floating-point noise (as in Opacus): use :func:`discrete_gaussian_noise` where
    the privacy proof needs an exact distribution.

    Raises:
        TypeError, ValueError: bad ``n``, ``sigma`` or ``key``.
    """
    _check_noise_args(n, sigma, key, math.inf)
    runs = -(-n // (2 * GAUSS_RUN))
    check_stream_args(key.key, key.nonce, 0, 3 * GAUSS_RUN * runs)
    device = torch.device(device)
    if device.type == "cuda":
        from kernels._triton import launch

        return launch.gaussian(n, -2.0 * sigma * sigma, key.key, key.nonce, GAUSS_RUN,
                               float(np.float32(_ANGLE_SCALE)), device=device)
    if device.type != "cpu":
        words = chacha20_keystream(key.key, key.nonce, 0, 3 * GAUSS_RUN * runs, device=device)
        return _gaussian_torch(words.view(runs, 3 * GAUSS_RUN), float(sigma)).view(-1)[:n]
    out = np.empty((runs, 2, GAUSS_RUN), dtype=np.float32)
    reader = KeystreamReader(key.key, key.nonce)
    scratch = _GaussScratch(min(runs, _GAUSS_CHUNK_RUNS))
    for start in range(0, runs, _GAUSS_CHUNK_RUNS):
        chunk = out[start : start + _GAUSS_CHUNK_RUNS]
        words = scratch.words[: chunk.shape[0]]
        reader.read_into(words)
        _gaussian_numpy(words, float(sigma), chunk, scratch)
    return torch.from_numpy(out.reshape(-1)[:n])


class _GaussScratch:
    """Reusable per-chunk buffers of the CPU path."""

    def __init__(self, runs: int) -> None:
        self.words = np.empty((runs, 3 * GAUSS_RUN), dtype=np.uint32)
        self.u = np.empty((runs, GAUSS_RUN), dtype=np.float64)
        self.r = np.empty((runs, GAUSS_RUN), dtype=np.float32)
        self.theta = np.empty((runs, GAUSS_RUN), dtype=np.float32)


def _gaussian_numpy(words: np.ndarray, sigma: float, out: np.ndarray,
                    s: _GaussScratch) -> None:
    """Fill ``out`` (``(m, 2, R)`` float32) from ``words`` (``(m, 3R)`` uint32, clobbered)."""
    m, half = out.shape[0], 2 * GAUSS_RUN
    u, r, theta = s.u[:m], s.r[:m], s.theta[:m]
    big = words[:, :half].view(np.int64)
    np.bitwise_and(big, _LOW63, out=big)  # int64 -> float64 is fast; uint64 with bit 63 is not
    np.copyto(u, big, casting="unsafe")
    u *= 2.0**-63
    u += 2.0**-64
    np.log(u, out=u)
    u *= -2.0 * sigma * sigma
    np.copyto(r, u, casting="unsafe")
    np.sqrt(r, out=r)
    np.copyto(theta, words[:, half:].view(np.int32), casting="unsafe")
    theta *= np.float32(_ANGLE_SCALE)
    np.cos(theta, out=out[:, 0])
    np.sin(theta, out=out[:, 1])
    out *= r[:, None, :]


def _gaussian_torch(words: torch.Tensor, sigma: float) -> torch.Tensor:
    """The same transform with torch ops on any device: ``(m, 3R)`` int32 -> ``(m, 2, R)``."""
    half = 2 * GAUSS_RUN
    big = words[:, :half].contiguous().view(torch.int64) & _LOW63
    u = big.double().mul_(2.0**-63).add_(2.0**-64).log_().mul_(-2.0 * sigma * sigma)
    r = u.float().sqrt_()
    theta = words[:, half:].float().mul_(_ANGLE_SCALE)
    return torch.stack((theta.cos(), theta.sin_()), dim=1).mul_(r.unsqueeze(1))


def reference_gaussian_noise(n: int, sigma: float, key: MaskKey) -> torch.Tensor:
    """Oracle: the documented transform in float64 with Python's math module, pair by pair."""
    _check_noise_args(n, sigma, key, math.inf)
    runs = -(-n // (2 * GAUSS_RUN))
    words = np.frombuffer(_stream_bytes(key, 3 * GAUSS_RUN * runs), dtype="<u4").astype(np.int64)
    out = []
    for run in words.reshape(runs, 3 * GAUSS_RUN).tolist():
        cos, sin = [], []
        for k in range(GAUSS_RUN):
            big = (run[2 * k] + (run[2 * k + 1] << 32)) & _LOW63
            angle = run[2 * GAUSS_RUN + k]
            angle -= (angle >> 31) << 32  # two's complement
            radius = sigma * math.sqrt(-2.0 * math.log((2 * big + 1) / 2**64))
            cos.append(radius * math.cos(angle * _ANGLE_SCALE))
            sin.append(radius * math.sin(angle * _ANGLE_SCALE))
        out += cos + sin
    return torch.tensor(out[:n], dtype=torch.float64).to(torch.float32)


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
