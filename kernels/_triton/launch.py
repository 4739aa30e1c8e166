"""Typed host launchers for the Triton kernels: check shape, dtype and device, then launch.

Imported lazily by the public functions in :mod:`kernels` when they receive CUDA tensors.
On CPU tensors a launcher runs only under Triton's interpreter (``TRITON_INTERPRET=1`` set
before this module is first imported); tests use that to compare the kernels bit for bit
with the CPU paths.
"""

import os
from collections.abc import Sequence

import numpy as np
import torch

try:
    import triton
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "CUDA tensors need Triton for privfed kernels: pip install 'privfed[gpu]'"
    ) from error

from kernels._ring import RING_DTYPE, check_same_layout, check_tensor
from kernels._triton import _kernels

# ChaCha20 blocks per program (64 blocks = 1024 keystream words) and warps per program.
CHACHA_BLOCKS = 64
CHACHA_WARPS = 2
ELEMENTWISE_BLOCK = 1024
KEY_ROW_WORDS = 12
# Gaussian noise: 8 key words, 3 nonce words, a spare word, -2 sigma**2 as a float64.
GAUSS_ROW_WORDS = 14
GAUSS_WARPS = 1
# Float kernels launch without fused multiply-add so every rounding matches the CPU path.
FP_EXACT = {"enable_fp_fusion": False}


def check_device(x: torch.Tensor, name: str) -> None:
    """Raise ValueError unless ``x`` is on CUDA, or on CPU under the Triton interpreter."""
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(
        f"{name} must be a CUDA tensor for the Triton path (CPU only with TRITON_INTERPRET=1), "
        f"got device {x.device}"
    )


def _key_words(key: bytes, nonce: bytes) -> np.ndarray:
    """The 8 key words and 3 nonce words (little-endian int32) a kernel's key row starts with."""
    return np.frombuffer(bytes(key) + bytes(nonce), dtype="<i4")


def key_rows(keys: Sequence[tuple[bytes, bytes]], signs: Sequence[int], device) -> torch.Tensor:
    """[len(keys), 12] int32 rows: 8 key words, 3 nonce words, sign as 1 or -1."""
    rows = np.zeros((len(keys), KEY_ROW_WORDS), dtype=np.int32)
    for row, (key, nonce), sign in zip(rows, keys, signs, strict=True):
        row[:11] = _key_words(key, nonce)
        row[11] = sign
    return torch.from_numpy(rows).to(device)


def _chacha_grid(n_words: int) -> tuple[int]:
    return (triton.cdiv(triton.cdiv(n_words, 16), CHACHA_BLOCKS),)


def keystream(
    key: bytes, nonce: bytes, counter: int, n_words: int, *, device: torch.device
) -> torch.Tensor:
    """Keystream words on ``device`` (arguments already validated by the caller)."""
    out = torch.empty(n_words, dtype=RING_DTYPE, device=device)
    check_device(out, "keystream output")
    if n_words:
        rows = key_rows([(key, nonce)], [1], device)
        _kernels.keystream_kernel[_chacha_grid(n_words)](
            rows, out, counter, n_words, BLOCK=CHACHA_BLOCKS, num_warps=CHACHA_WARPS
        )
    return out


def add_masks(x: torch.Tensor, rows: torch.Tensor) -> None:
    """x += sum of signed keystreams described by ``rows`` (see :func:`key_rows`), in place."""
    check_tensor(x, "x", RING_DTYPE)
    check_device(x, "x")
    check_tensor(rows, "rows", torch.int32)
    if rows.ndim != 2 or rows.shape[1] != KEY_ROW_WORDS or rows.device != x.device:
        raise ValueError(
            f"rows must be [n_keys, {KEY_ROW_WORDS}] on {x.device}, "
            f"got {tuple(rows.shape)} on {rows.device}"
        )
    if x.numel() and rows.shape[0]:
        _kernels.add_masks_kernel[_chacha_grid(x.numel())](
            x, rows, rows.shape[0], x.numel(), BLOCK=CHACHA_BLOCKS, ROW=KEY_ROW_WORDS,
            num_warps=CHACHA_WARPS,
        )


def quantize(x: torch.Tensor, out: torch.Tensor, row: torch.Tensor, c: float, s: float) -> None:
    """out = stochastic quantisation of float32 ``x`` (see kernels.quantize for the rule)."""
    check_tensor(x, "x", torch.float32)
    check_tensor(out, "out", RING_DTYPE)
    check_same_layout(x, out, ("x", "out"))
    check_device(x, "x")
    n = x.numel()
    if n:
        grid = _chacha_grid(triton.cdiv(n, 2))
        _kernels.quantize_kernel[grid](
            x, out, row, n, c, s, BLOCK=CHACHA_BLOCKS, num_warps=CHACHA_WARPS, **FP_EXACT
        )


def gaussian(n: int, neg_two_var: float, key: bytes, nonce: bytes, run: int, angle_scale: float,
             *, device: torch.device) -> torch.Tensor:
    """``n`` float32 Box-Muller draws on ``device`` from the stream of ``key``/``nonce``
    (``run`` pairs per Box-Muller run; arguments validated by kernels.noise)."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    check_device(out, "noise output")
    if n:
        row = np.zeros(GAUSS_ROW_WORDS, dtype=np.int32)
        row[:11] = _key_words(key, nonce)
        row[12:14] = np.array([neg_two_var], dtype="<f8").view("<i4")
        runs = triton.cdiv(n, 2 * run)
        _kernels.gaussian_kernel[(runs,)](
            torch.from_numpy(row).to(device), out, n, angle_scale, R=run,
            num_warps=GAUSS_WARPS, **FP_EXACT,
        )
    return out


def accumulate_ring(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x (mod 2**32), in place."""
    _check_pair(acc, x, RING_DTYPE)
    n = acc.numel()
    if n:
        grid = (triton.cdiv(n, ELEMENTWISE_BLOCK),)
        _kernels.accumulate_ring_kernel[grid](acc, x, n, BLOCK=ELEMENTWISE_BLOCK)


def accumulate_weighted(acc: torch.Tensor, x: torch.Tensor, w: float) -> None:
    """acc = fl(acc + fl(x * w)) in float32 (no fused multiply-add), in place."""
    _check_pair(acc, x, torch.float32)
    n = acc.numel()
    if n:
        grid = (triton.cdiv(n, ELEMENTWISE_BLOCK),)
        _kernels.accumulate_weighted_kernel[grid](
            acc, x, w, n, BLOCK=ELEMENTWISE_BLOCK, **FP_EXACT
        )


def _check_pair(acc: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> None:
    check_tensor(acc, "acc", dtype)
    check_tensor(x, "x", dtype)
    check_same_layout(acc, x, ("acc", "x"))
    check_device(acc, "acc")
