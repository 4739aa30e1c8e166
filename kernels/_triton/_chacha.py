"""Triton device functions for the ChaCha20 block function (RFC 8439, section 2.3).

Private to ``kernels._triton``. Every function works on vectors of ``BLOCK`` independent
ChaCha20 blocks, one lane per block, in ``tl.uint32`` arithmetic (wrapping add, xor, rotate).
"""

import triton
import triton.language as tl


@triton.jit
def _rotl(x, n: tl.constexpr):
    return (x << n) | (x >> (32 - n))


@triton.jit
def _quarter_round(a, b, c, d):
    a = a + b
    d = _rotl(d ^ a, 16)
    c = c + d
    b = _rotl(b ^ c, 12)
    a = a + b
    d = _rotl(d ^ a, 8)
    c = c + d
    b = _rotl(b ^ c, 7)
    return a, b, c, d


@triton.jit
def _word(row_ptr, i: tl.constexpr, like):
    """Scalar word ``i`` of a key row, broadcast to the shape of ``like`` as uint32."""
    w = tl.load(row_ptr + i).to(tl.uint32, bitcast=True)
    return tl.zeros_like(like) + w


@triton.jit
def chacha_block(row_ptr, ctr):
    """Keystream words 0..15 of the blocks whose counters are the uint32 vector ``ctr``.

    ``row_ptr`` points at 8 key words then 3 nonce words (little-endian words, as int32).
    """
    s0 = tl.zeros_like(ctr) + 0x61707865
    s1 = tl.zeros_like(ctr) + 0x3320646E
    s2 = tl.zeros_like(ctr) + 0x79622D32
    s3 = tl.zeros_like(ctr) + 0x6B206574
    s4 = _word(row_ptr, 0, ctr)
    s5 = _word(row_ptr, 1, ctr)
    s6 = _word(row_ptr, 2, ctr)
    s7 = _word(row_ptr, 3, ctr)
    s8 = _word(row_ptr, 4, ctr)
    s9 = _word(row_ptr, 5, ctr)
    s10 = _word(row_ptr, 6, ctr)
    s11 = _word(row_ptr, 7, ctr)
    s12 = ctr
    s13 = _word(row_ptr, 8, ctr)
    s14 = _word(row_ptr, 9, ctr)
    s15 = _word(row_ptr, 10, ctr)
    x0, x1, x2, x3, x4, x5, x6, x7 = s0, s1, s2, s3, s4, s5, s6, s7
    x8, x9, x10, x11, x12, x13, x14, x15 = s8, s9, s10, s11, s12, s13, s14, s15
    for _ in range(10):
        x0, x4, x8, x12 = _quarter_round(x0, x4, x8, x12)
        x1, x5, x9, x13 = _quarter_round(x1, x5, x9, x13)
        x2, x6, x10, x14 = _quarter_round(x2, x6, x10, x14)
        x3, x7, x11, x15 = _quarter_round(x3, x7, x11, x15)
        x0, x5, x10, x15 = _quarter_round(x0, x5, x10, x15)
        x1, x6, x11, x12 = _quarter_round(x1, x6, x11, x12)
        x2, x7, x8, x13 = _quarter_round(x2, x7, x8, x13)
        x3, x4, x9, x14 = _quarter_round(x3, x4, x9, x14)
    return (
        x0 + s0, x1 + s1, x2 + s2, x3 + s3, x4 + s4, x5 + s5, x6 + s6, x7 + s7,
        x8 + s8, x9 + s9, x10 + s10, x11 + s11, x12 + s12, x13 + s13, x14 + s14, x15 + s15,
    )


@triton.jit
def block_counters(counter, pid, BLOCK: tl.constexpr):
    """uint32 counters of the ``BLOCK`` blocks handled by program ``pid`` (wrapping)."""
    blk = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return (blk + counter).to(tl.uint32)
