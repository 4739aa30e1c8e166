"""Triton kernels (private). Launch them through :mod:`kernels._triton.launch`.

Each ChaCha20-driven program handles ``BLOCK`` consecutive 64-byte blocks (16 words each);
word ``j`` of block ``b`` is keystream word ``16 * b + j`` exactly as on the CPU path.
"""

import triton
import triton.language as tl

from kernels._triton._chacha import block_counters, chacha_block


@triton.jit
def _store_word(out_ptr, blk, j: tl.constexpr, w, n_words):
    idx = blk * 16 + j
    tl.store(out_ptr + idx, w.to(tl.int32, bitcast=True), mask=idx < n_words)


@triton.jit
def keystream_kernel(row_ptr, out_ptr, counter, n_words, BLOCK: tl.constexpr):
    """out[i] = keystream word i of the key row, from block ``counter``."""
    ctr, blk = block_counters(counter, tl.program_id(0), BLOCK)
    w = chacha_block(row_ptr, ctr)
    for j in tl.static_range(16):
        _store_word(out_ptr, blk, j, w[j], n_words)


@triton.jit
def _add_word(x_ptr, blk, j: tl.constexpr, m, n):
    idx = blk * 16 + j
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0).to(tl.uint32, bitcast=True)
    tl.store(x_ptr + idx, (x + m).to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def _signed_sum(acc, w, sign):
    # sign is 1 or 0xFFFFFFFF (= -1 mod 2**32), so w * sign is +w or -w in the ring.
    return (
        acc[0] + w[0] * sign, acc[1] + w[1] * sign, acc[2] + w[2] * sign, acc[3] + w[3] * sign,
        acc[4] + w[4] * sign, acc[5] + w[5] * sign, acc[6] + w[6] * sign, acc[7] + w[7] * sign,
        acc[8] + w[8] * sign, acc[9] + w[9] * sign, acc[10] + w[10] * sign,
        acc[11] + w[11] * sign, acc[12] + w[12] * sign, acc[13] + w[13] * sign,
        acc[14] + w[14] * sign, acc[15] + w[15] * sign,
    )


@triton.jit
def add_masks_kernel(x_ptr, rows_ptr, n_keys, n, BLOCK: tl.constexpr, ROW: tl.constexpr):
    """x += sum_k sign_k * keystream_k (mod 2**32); masks live only in registers."""
    ctr, blk = block_counters(0, tl.program_id(0), BLOCK)
    zero = tl.zeros_like(ctr)
    acc = (zero, zero, zero, zero, zero, zero, zero, zero,
           zero, zero, zero, zero, zero, zero, zero, zero)
    for k in range(n_keys):
        row = rows_ptr + k * ROW
        sign = tl.load(row + ROW - 1).to(tl.uint32, bitcast=True)
        acc = _signed_sum(acc, chacha_block(row, ctr), sign)
    for j in tl.static_range(16):
        _add_word(x_ptr, blk, j, acc[j], n)


@triton.jit
def _quantize_one(x_ptr, q_ptr, idx, r, n, c, s):
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    y = (tl.minimum(tl.maximum(x, -c), c) + c) * s
    fixed = (y * 65536.0).to(tl.int64)
    q = (fixed + r.to(tl.int64)) >> 16
    tl.store(q_ptr + idx, q.to(tl.int32), mask=mask)


@triton.jit
def quantize_kernel(x_ptr, q_ptr, row_ptr, n, c, s, BLOCK: tl.constexpr):
    """q = floor((floor(y * 2**16) + r) / 2**16), y = (clamp(x, -c, c) + c) * s.

    Element 2i takes the low 16 bits of keystream word i as r, element 2i + 1 the high.
    """
    ctr, blk = block_counters(0, tl.program_id(0), BLOCK)
    w = chacha_block(row_ptr, ctr)
    for j in tl.static_range(16):
        word = blk * 16 + j
        _quantize_one(x_ptr, q_ptr, 2 * word, w[j] & 0xFFFF, n, c, s)
        _quantize_one(x_ptr, q_ptr, 2 * word + 1, w[j] >> 16, n, c, s)


@triton.jit
def accumulate_ring_kernel(acc_ptr, x_ptr, n, BLOCK: tl.constexpr):
    """acc += x (mod 2**32)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    a = tl.load(acc_ptr + idx, mask=mask).to(tl.uint32, bitcast=True)
    x = tl.load(x_ptr + idx, mask=mask).to(tl.uint32, bitcast=True)
    tl.store(acc_ptr + idx, (a + x).to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def accumulate_weighted_kernel(acc_ptr, x_ptr, w, n, BLOCK: tl.constexpr):
    """acc = fl(acc + fl(x * w)) in float32; launch with enable_fp_fusion=False."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    a = tl.load(acc_ptr + idx, mask=mask)
    x = tl.load(x_ptr + idx, mask=mask)
    tl.store(acc_ptr + idx, a + x * w, mask=mask)
