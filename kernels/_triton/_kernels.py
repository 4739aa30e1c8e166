"""Triton kernels (private). Launch them through :mod:`kernels._triton.launch`.

Each ChaCha20-driven program handles ``BLOCK`` consecutive 64-byte blocks (16 words each);
word ``j`` of block ``b`` is keystream word ``16 * b + j`` exactly as on the CPU path. The
block function yields 16 vectors of ``BLOCK`` lanes (one lane per block);
:func:`_interleave16` turns them into one vector of consecutive words, so every load and
store is contiguous (coalesced) rather than strided by a block's 64 bytes.
"""

import triton
import triton.language as tl

from kernels._triton._chacha import block_counters, chacha_block


@triton.jit
def _interleave8(v0, v1, v2, v3, v4, v5, v6, v7):
    """Eight equal-length vectors as one, ``out[8 * b + i] = v_i[b]``.

    Three levels of pairwise interleaving; at level ``l`` the pair partners differ in bit
    ``2 - l`` of ``i``, so ``i = 4e + 2f + g`` lands at ``8b + i``.
    """
    a0, a1 = tl.interleave(v0, v4), tl.interleave(v1, v5)
    a2, a3 = tl.interleave(v2, v6), tl.interleave(v3, v7)
    return tl.interleave(tl.interleave(a0, a2), tl.interleave(a1, a3))


@triton.jit
def _interleave16(w):
    """The 16 word vectors ``w`` of ``BLOCK`` blocks as one vector of ``16 * BLOCK`` words,
    block-major: ``out[16 * b + j] = w[j][b]``. Pairing word ``k`` with word ``k + 8`` gives
    vectors whose element ``2b + e`` is word ``k + 8e`` of block ``b``; interleaving those
    eight puts word ``8e + k`` at ``16b + 8e + k``."""
    return _interleave8(
        tl.interleave(w[0], w[8]), tl.interleave(w[1], w[9]), tl.interleave(w[2], w[10]),
        tl.interleave(w[3], w[11]), tl.interleave(w[4], w[12]), tl.interleave(w[5], w[13]),
        tl.interleave(w[6], w[14]), tl.interleave(w[7], w[15]),
    )


@triton.jit
def _program_words(pid, BLOCK: tl.constexpr):
    """int64 indices of the ``16 * BLOCK`` keystream words of program ``pid``."""
    return pid.to(tl.int64) * (16 * BLOCK) + tl.arange(0, 16 * BLOCK).to(tl.int64)


@triton.jit
def keystream_kernel(row_ptr, out_ptr, counter, n_words, BLOCK: tl.constexpr):
    """out[i] = keystream word i of the key row, from block ``counter``."""
    pid = tl.program_id(0)
    ctr = block_counters(counter, pid, BLOCK)
    words = _interleave16(chacha_block(row_ptr, ctr))
    idx = _program_words(pid, BLOCK)
    tl.store(out_ptr + idx, words.to(tl.int32, bitcast=True), mask=idx < n_words)


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
    pid = tl.program_id(0)
    ctr = block_counters(0, pid, BLOCK)
    zero = tl.zeros_like(ctr)
    acc = (zero, zero, zero, zero, zero, zero, zero, zero,
           zero, zero, zero, zero, zero, zero, zero, zero)
    for k in range(n_keys):
        row = rows_ptr + k * ROW
        sign = tl.load(row + ROW - 1).to(tl.uint32, bitcast=True)
        acc = _signed_sum(acc, chacha_block(row, ctr), sign)
    idx = _program_words(pid, BLOCK)
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0).to(tl.uint32, bitcast=True)
    tl.store(x_ptr + idx, (x + _interleave16(acc)).to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def quantize_kernel(x_ptr, q_ptr, row_ptr, n, c, s, BLOCK: tl.constexpr):
    """q = floor((floor(y * 2**16) + r) / 2**16), y = (clamp(x, -c, c) + c) * s.

    Element 2i takes the low 16 bits of keystream word i as r, element 2i + 1 the high.
    """
    pid = tl.program_id(0)
    ctr = block_counters(0, pid, BLOCK)
    w = _interleave16(chacha_block(row_ptr, ctr))
    r = tl.interleave(w & 0xFFFF, w >> 16)
    idx = pid.to(tl.int64) * (32 * BLOCK) + tl.arange(0, 32 * BLOCK).to(tl.int64)
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    y = (tl.minimum(tl.maximum(x, -c), c) + c) * s
    fixed = (y * 65536.0).to(tl.int64)
    q = (fixed + r.to(tl.int64)) >> 16
    tl.store(q_ptr + idx, q.to(tl.int32), mask=mask)


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


@triton.jit
def _low63(lo, hi):
    """int64 holding the low 63 bits of the little-endian 64-bit word ``hi:lo`` (uint32)."""
    big = ((hi & 0x7FFFFFFF).to(tl.uint64) << 32) | lo.to(tl.uint64)
    return big.to(tl.int64, bitcast=True)


@triton.jit
def gaussian_kernel(row_ptr, out_ptr, n, angle_scale, R: tl.constexpr):
    """One Box-Muller run of ``R`` pairs per program (layout: kernels.noise.gaussian_noise).

    Run ``j`` reads keystream blocks from ``3R/16 * j``: its first ``R/8`` blocks hold the
    63-bit ``M_k`` (pair ``k = 8 * block + i`` from words ``2i, 2i + 1``), the next ``R/16``
    the angle words ``T_k`` (``k = 16 * block + j``). ``row_ptr`` holds the key row's 11
    words, a spare word, then ``-2 sigma**2`` as the two int32 halves of a float64. The
    roundings are the CPU path's: ``ln u`` in float64, the rest in float32; launch with
    enable_fp_fusion=False.
    """
    run = tl.program_id(0).to(tl.int64)
    first = run * (3 * R // 16)
    wm = chacha_block(row_ptr, (first + tl.arange(0, R // 8)).to(tl.uint32))
    wt = chacha_block(row_ptr, (first + R // 8 + tl.arange(0, R // 16)).to(tl.uint32))
    big = _interleave8(  # big[8 * block + i] = M of words 2i, 2i + 1 of that block
        _low63(wm[0], wm[1]), _low63(wm[2], wm[3]), _low63(wm[4], wm[5]),
        _low63(wm[6], wm[7]), _low63(wm[8], wm[9]), _low63(wm[10], wm[11]),
        _low63(wm[12], wm[13]), _low63(wm[14], wm[15]),
    )
    lo = tl.load(row_ptr + 12).to(tl.uint32, bitcast=True).to(tl.uint64)
    hi = tl.load(row_ptr + 13).to(tl.uint32, bitcast=True).to(tl.uint64)
    neg_two_var = ((hi << 32) | lo).to(tl.float64, bitcast=True)
    u = big.to(tl.float64) * 1.0842021724855044e-19 + 5.421010862427522e-20  # 2**-63, 2**-64
    r = tl.sqrt((tl.log(u) * neg_two_var).to(tl.float32))
    theta = _interleave16(wt).to(tl.int32, bitcast=True).to(tl.float32) * angle_scale
    cos_at = run * (2 * R) + tl.arange(0, R).to(tl.int64)
    tl.store(out_ptr + cos_at, tl.cos(theta) * r, mask=cos_at < n)
    tl.store(out_ptr + cos_at + R, tl.sin(theta) * r, mask=cos_at + R < n)
