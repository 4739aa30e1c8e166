"""Stochastic quantisation of float32 updates into Z_2^32, the ring-capacity rule, and decoding.

The rule, identical bit for bit on CPU and CUDA (``bits`` in 1..24, L = 2**bits - 1):

1. ``c = float32(clip_range)`` and ``s`` = the largest float32 <= L / (2c); ``step = 1 / s``
   (at most a relative 2**-23 above the nominal 2c / L).
2. ``t = min(max(x, -c), c)`` in float32 (+inf -> c, -inf -> -c; NaN is refused).
3. ``y = fl32(fl32(t + c) * s)``, which lies in [0, L] because ``s`` was rounded down.
4. ``r`` = 16 dither bits: element ``i`` takes the little-endian uint16 at bytes
   ``2i, 2i+1`` of the ChaCha20 stream of the dither key from block 0.
5. ``q = floor((floor(y * 2**16) + r) / 2**16)``, an integer in [0, L] stored in the ring.

So ``E[q] = floor(y * 2**16) / 2**16`` lies in ``(y - 2**-16, y]``: unbiased up to 2**-16 of
a step (exactly unbiased once ``y >= 128``), and ``|q - y| < 1``.

Summing ``n`` quantised vectors in Z_2^32 is exact if ``n * L <= 2**32 - 1`` (see
:func:`check_ring_capacity`); :func:`dequantize` then returns ``sum_q * step - n * c``,
within :func:`dequantization_error_bound` of the sum of the clipped inputs.
"""

import threading
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from kernels._ring import (
    RING_DTYPE,
    RING_MAX,
    check_tensor,
    chunks,
    empty_numpy_backed,
    flat_numpy,
    is_cuda,
    ring_to_unsigned,
)
from kernels.chacha20 import (
    WORDS_PER_BLOCK,
    KeystreamReader,
    check_stream_args,
    reference_chacha20_keystream,
)
from kernels.keys import MaskKey

MAX_BITS = 24
DITHER_BITS = 16
_DITHER_SCALE = float(1 << DITHER_BITS)
_MIN_CLIP, _MAX_CLIP = 2.0**-64, 2.0**64
# Elements per CPU chunk: the dither of one chunk (256 KiB at 128 Ki elements) is drawn into a
# buffer that stays in L2 while the fused loop reads it. 64 Ki to 256 Ki measured within
# noise of each other on the 2-core dev machine; 32 Ki was slower (per-call costs).
QUANTIZE_CHUNK = 1 << 17  # must be even: a chunk boundary must not split a dither word
# Dither elements per ChaCha20 block (64 bytes, 2 per element): a thread that starts at a
# multiple of this starts its own keystream reader at a block counter.
ELEMENTS_PER_BLOCK = 2 * WORDS_PER_BLOCK


@dataclass(frozen=True)
class QuantizationGrid:
    """The float32 constants of the rule for one (clip_range, bits); build with :func:`grid`."""

    bits: int
    clip: float  # c, a float32 value
    scale: float  # s, a float32 value, largest float32 <= (2**bits - 1) / (2c)

    @property
    def levels(self) -> int:
        """L = 2**bits - 1, the largest quantised value."""
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        """Width of one quantisation level in input units, 1 / s."""
        return 1.0 / self.scale


def grid(clip_range: float, bits: int) -> QuantizationGrid:
    """Validate ``clip_range`` and ``bits`` and compute the rule's float32 constants.

    Raises:
        ValueError: ``bits`` not an int in [1, 24] or ``clip_range`` not in [2**-64, 2**64].
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")
    if not (isinstance(clip_range, int | float) and _MIN_CLIP <= clip_range <= _MAX_CLIP):
        raise ValueError(f"clip_range must be in [2**-64, 2**64], got {clip_range!r}")
    c = float(np.float32(clip_range))
    exact = Fraction((1 << bits) - 1) / (2 * Fraction(c))
    s = np.float32(float(exact))
    if Fraction(float(s)) > exact:
        s = np.nextafter(s, np.float32(0))
    return QuantizationGrid(bits=bits, clip=c, scale=float(s))


def check_ring_capacity(n_summands: int, bits: int, max_weight: int = 1, *, headroom: int = 0):
    """Refuse parameters whose ring sum could wrap: n * max_weight * (2**bits - 1) + headroom.

    Args:
        n_summands: number of quantised vectors summed (clients).
        bits: quantisation bit width.
        max_weight: largest integer weight a summand is multiplied by.
        headroom: extra non-negative room to reserve (e.g. for integer noise).

    Raises:
        ValueError: the worst-case sum exceeds 2**32 - 1, or an argument is not a
            non-negative int (``n_summands``, ``max_weight`` >= 1); the message names the
            numbers and the largest bit width that would fit.
    """
    for name, value, low in (("n_summands", n_summands, 1), ("bits", bits, 1),
                             ("max_weight", max_weight, 1), ("headroom", headroom, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    worst = n_summands * max_weight * ((1 << bits) - 1) + headroom
    if worst > RING_MAX:
        room = (RING_MAX - headroom) // (n_summands * max_weight)
        fits = max(room + 1, 1).bit_length() - 1
        raise ValueError(
            f"ring Z_2^32 could wrap: n_summands={n_summands} * max_weight={max_weight} * "
            f"(2**{bits} - 1) + headroom={headroom} = {worst} > 2**32 - 1 = {RING_MAX}; "
            f"use bits <= {fits} for these summands, or fewer summands"
        )


def _check_dither_key(key: object, n: int) -> None:
    if not isinstance(key, MaskKey):
        raise TypeError(f"key must be a MaskKey, got {type(key).__name__}")
    check_stream_args(key.key, key.nonce, 0, -(-n // 2))


def quantize(
    x: torch.Tensor, *, clip_range: float, bits: int, key: MaskKey,
    out: torch.Tensor | None = None, threads: int = 1,
) -> torch.Tensor:
    """Quantise float32 ``x`` into ring elements in [0, 2**bits - 1] (rule in the module doc).

    Args:
        x: contiguous float32 tensor, any shape, on CPU or CUDA.
        clip_range: c; values are clipped to [-c, c].
        bits: 1..24 bits per coordinate.
        key: dither key (use ``MaskPurpose.QUANTIZE_DITHER``, fresh per round and site).
        out: optional ``torch.int32`` tensor of ``x``'s shape and device to write into.
        threads: CPU threads to split ``x`` over, each taking at least two chunks (a
            performance knob: the bits do not depend on it; unused on CUDA). Their compiled
            loops run side by side; OpenSSL's keystream calls hold the GIL and take turns.
            On the shared 2-core dev machine 2 threads were not faster (the other core was
            busy): use it where a core is idle, and measure (``python -m benchmarks.kernels``).

    Returns:
        ``torch.int32`` ring tensor shaped like ``x`` (``out`` if given). Same bits on every
        device; same bits again for the same ``x`` and ``key``.

    Raises:
        TypeError, ValueError: wrong dtype/layout, bad ``clip_range``/``bits``/``key``/
            ``threads``, or NaN in ``x`` (a given ``out`` may then be partly written).
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    g = grid(clip_range, bits)
    check_tensor(x, "x", torch.float32)
    _check_dither_key(key, x.numel())
    out = _output_like(x, out)
    if is_cuda(x):
        _quantize_cuda(x, out, g, key)
    else:
        _quantize_cpu(flat_numpy(x), flat_numpy(out), g, key, threads)
    return out


def _output_like(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        if x.device.type == "cpu":
            return empty_numpy_backed(x.numel(), np.dtype(np.int32), tuple(x.shape))
        return torch.empty(x.shape, dtype=RING_DTYPE, device=x.device)
    check_tensor(out, "out", RING_DTYPE)
    if out.shape != x.shape or out.device != x.device:
        raise ValueError(
            f"out must match x: shape {tuple(x.shape)} on {x.device}, "
            f"got {tuple(out.shape)} on {out.device}"
        )
    return out


def _quantize_cuda(x: torch.Tensor, out: torch.Tensor, g: QuantizationGrid, key: MaskKey):
    from kernels._triton import launch

    if bool(torch.isnan(x).any()):
        raise ValueError(_nan_message(x))
    row = launch.key_rows([(key.key, key.nonce)], [1], x.device)
    launch.quantize(x, out, row, g.clip, g.scale)


def _nan_message(x) -> str:
    count = int(torch.isnan(torch.as_tensor(x)).sum())
    return f"x holds {count} NaN value(s); clip or reject the update before quantising"


class _NaNFound(Exception):
    """A chunk held NaN; :func:`_quantize_cpu` reports the count over the whole input."""


def _quantize_cpu(
    x: np.ndarray, out: np.ndarray, g: QuantizationGrid, key: MaskKey, threads: int
) -> None:
    """CPU path: one thread walks ``x``, or ``threads`` threads walk consecutive parts."""
    starts = _split(x.size, threads)
    try:
        if len(starts) == 2:
            _quantize_range(x, out, g, key, first_block=0)
        else:
            _in_threads(x, out, g, key, starts)
    except _NaNFound:
        raise ValueError(_nan_message(x)) from None


def _split(n: int, threads: int) -> list[int]:
    """Part boundaries: whole keystream blocks, at least two chunks per part."""
    parts = max(1, min(threads, n // (2 * QUANTIZE_CHUNK)))
    step = ELEMENTS_PER_BLOCK
    return [i * n // parts // step * step for i in range(parts)] + [n]


def _in_threads(x: np.ndarray, out: np.ndarray, g: QuantizationGrid, key: MaskKey,
                starts: list[int]) -> None:
    """Part 0 on this thread, the others on helper threads, each with its own keystream
    reader from block ``start / 32``; a helper's error is re-raised here. The compiled loops
    release the GIL; only OpenSSL's keystream calls take turns."""
    errors: list[BaseException] = []

    def run(a: int, b: int) -> None:
        _quantize_range(x[a:b], out[a:b], g, key, first_block=a // ELEMENTS_PER_BLOCK)

    def helper(a: int, b: int) -> None:
        try:
            run(a, b)
        except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(error)

    helpers = [threading.Thread(target=helper, args=bounds, name="privfed-quantize", daemon=True)
               for bounds in zip(starts[1:-1], starts[2:], strict=True)]
    for thread in helpers:
        thread.start()
    try:
        run(starts[0], starts[1])
    finally:
        for thread in helpers:
            thread.join()
    if errors:
        raise errors[0]


def _quantize_range(
    x: np.ndarray, out: np.ndarray, g: QuantizationGrid, key: MaskKey, *, first_block: int
) -> None:
    """One thread over ``x``, which starts at element ``32 * first_block`` of the input: per
    chunk, draw the dither into a cache-resident buffer, then one fused pass scales, rounds
    and writes (``kernels._cpu_loops``, compiled on first use)."""
    from kernels import _cpu_loops

    reader = KeystreamReader(key.key, key.nonce, first_block)
    size = min(x.size, QUANTIZE_CHUNK)
    words = np.empty((size + 1) // 2, dtype=np.uint32)
    narrow = g.bits <= DITHER_BITS
    # Narrow widths scale straight to y * 2**16 (a power-of-two factor: the same bits).
    scale = g.scale * _DITHER_SCALE if narrow else g.scale
    for part in chunks(x.size, size or 1):
        m = part.stop - part.start
        reader.read_into(words[: (m + 1) // 2])
        dither = words.view(np.uint16)[:m]
        if _cpu_loops.round_into_ring(x[part], dither, out[part], g.clip, scale, narrow):
            raise _NaNFound


def reference_quantize(
    x: torch.Tensor, *, clip_range: float, bits: int, key: MaskKey
) -> torch.Tensor:
    """Oracle: the module-doc rule in torch float32 / int64, reference keystream, CPU."""
    g = grid(clip_range, bits)
    flat = x.detach().cpu().reshape(-1)
    if bool(torch.isnan(flat).any()):
        raise ValueError(_nan_message(flat))
    words = reference_chacha20_keystream(key.key, key.nonce, 0, -(-flat.numel() // 2))
    dither = torch.from_numpy(words.numpy().view(np.uint16)[: flat.numel()].astype(np.int64))
    c = torch.tensor(g.clip, dtype=torch.float32)
    y = (torch.minimum(torch.maximum(flat, -c), c) + c) * torch.tensor(g.scale)
    q = (torch.floor(y.double() * _DITHER_SCALE).long() + dither) // (1 << DITHER_BITS)
    return q.to(RING_DTYPE).reshape(x.shape)


def dequantization_error_bound(clip_range: float, bits: int, n_summands: int) -> float:
    """Bound on |dequantize(sum) - sum of clipped inputs| per coordinate.

    ``n * step * (1 + 2**(bits - 22)) + n * c * 2**-22``: each summand's rounding is under one
    step, float32 rounding of ``y`` adds at most 2**(bits-23) steps, and the float32 result
    adds half an ulp of a value of magnitude <= n * c.
    """
    g = grid(clip_range, bits)
    return n_summands * (g.step * (1 + 2.0 ** (bits - 22)) + g.clip * 2.0**-22)


def dequantize(
    q_sum: torch.Tensor, *, clip_range: float, bits: int, n_summands: int = 1
) -> torch.Tensor:
    """Decode a ring sum of ``n_summands`` quantised vectors to float32.

    Returns ``float32(float64(q_sum as unsigned) * step - n_summands * c)`` on ``q_sum``'s
    device (the same bits on CPU and CUDA: two correctly rounded float64 operations), within
    :func:`dequantization_error_bound` of the sum of the clipped float inputs.

    Raises:
        TypeError, ValueError: ``q_sum`` is not an int32 ring tensor, or the parameters
            fail :func:`check_ring_capacity` (the sum could have wrapped).
    """
    g = grid(clip_range, bits)
    check_ring_capacity(n_summands, bits)
    check_tensor(q_sum, "q_sum", RING_DTYPE)
    unsigned = ring_to_unsigned(q_sum).to(torch.float64)
    return (unsigned * g.step - n_summands * g.clip).to(torch.float32)


def reference_dequantize(
    q_sum: torch.Tensor, *, clip_range: float, bits: int, n_summands: int = 1
) -> torch.Tensor:
    """Oracle in numpy float64."""
    g = grid(clip_range, bits)
    unsigned = q_sum.detach().cpu().numpy().astype(np.int64) & RING_MAX
    decoded = unsigned.astype(np.float64) * g.step - n_summands * g.clip
    return torch.from_numpy(decoded.astype(np.float32))
