"""Triton paths, bit for bit against the CPU paths.

Without a GPU the kernels run on CPU tensors under Triton's interpreter: this module sets
``TRITON_INTERPRET=1`` before Triton is first imported (for the whole test process). With a
GPU the same comparisons run on CUDA. Skipped when Triton is not installed (``privfed[gpu]``).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kernels import (  # noqa: E402
    RING_DTYPE,
    MaskPurpose,
    accumulate_ring,
    accumulate_weighted,
    add_masks,
    chacha20_keystream,
    gaussian_noise,
    grid,
    quantize,
    reference_gaussian_noise,
)
from kernels._triton import launch  # noqa: E402
from kernels.noise import GAUSS_RUN  # noqa: E402
from tests.kernels.conftest import make_key  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# 1025 words = 65 blocks; the last size spans three programs of CHACHA_BLOCKS blocks
SMALL = (0, 1, 17, 1023, 1025, 2 * 16 * launch.CHACHA_BLOCKS + 3)


def _ring(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(RING_DTYPE)


COUNTERS = (0, 5, 2**31 + 3, 2**32 - 66)  # the last: a stream ending at the last block


@pytest.mark.parametrize(("n", "counter"), [(n, c) for n in SMALL for c in COUNTERS
                                            if c + -(-n // 16) <= 2**32])
def test_keystream(n, counter):
    key, nonce = os.urandom(32), os.urandom(12)
    got = launch.keystream(key, nonce, counter, n, device=DEVICE)
    assert torch.equal(got.cpu(), chacha20_keystream(key, nonce, counter, n))


@pytest.mark.parametrize("n", SMALL)
def test_add_masks(n, gen):
    x = _ring(n, gen)
    keys, signs = [make_key("t1"), make_key("t2"), make_key("t3")], [1, -1, -1]
    got = x.to(DEVICE)
    rows = launch.key_rows([(k.key, k.nonce) for k in keys], signs, DEVICE)
    launch.add_masks(got, rows)
    assert torch.equal(got.cpu(), add_masks(x, keys, signs))


@pytest.mark.parametrize("bits", [1, 8, 16, 17, 24])
@pytest.mark.parametrize("n", [0, 1, 2, 33, 2049])  # 2049 elements: two quantize programs
def test_quantize(n, bits, gen):
    x = torch.randn(n, generator=gen) * 2
    if n > 3:
        x[:4] = torch.tensor([float("inf"), -float("inf"), 1e30, -3.0])
    key, g = make_key(f"tq{n}"), grid(3.0, bits)
    out = torch.empty(n, dtype=RING_DTYPE, device=DEVICE)
    launch.quantize(x.to(DEVICE), out, launch.key_rows([(key.key, key.nonce)], [1], DEVICE),
                    g.clip, g.scale)
    assert torch.equal(out.cpu(), quantize(x, clip_range=3.0, bits=bits, key=key))


@pytest.mark.parametrize("n", SMALL)
def test_accumulate_ring(n, gen):
    acc, x = _ring(n, gen), _ring(n, gen)
    got = acc.to(DEVICE)
    launch.accumulate_ring(got, x.to(DEVICE))
    assert torch.equal(got.cpu(), accumulate_ring(acc, x))


@pytest.mark.parametrize("w", [0.3, -7.25, 1.0 + 2.0**-23])
@pytest.mark.parametrize("n", SMALL)
def test_accumulate_weighted(n, w, gen):
    acc, x = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    got = acc.to(DEVICE)
    launch.accumulate_weighted(got, x.to(DEVICE), float(torch.tensor(w, dtype=torch.float32)))
    assert torch.equal(got.cpu(), accumulate_weighted(acc, x, w))


@pytest.mark.parametrize("sigma", [1e-3, 1.0, 250.0])
@pytest.mark.parametrize("n", [0, 1, 2 * GAUSS_RUN - 1, 3 * 2 * GAUSS_RUN + 5])
def test_gaussian_matches_the_cpu_path_and_reference(n, sigma):
    """The fused kernel reads the stream as the CPU path does: equal up to float32 sin/cos
    and log rounding (documented: 2e-6 * (sigma + |z|) of the float64 reference)."""
    key = make_key(f"tg{n}{sigma}", MaskPurpose.DP_NOISE)
    got = launch.gaussian(n, -2.0 * sigma * sigma, key.key, key.nonce, GAUSS_RUN,
                          float(np.float32(math.pi * 2.0**-31)), device=DEVICE).cpu()
    assert got.dtype == torch.float32 and got.shape == (n,)
    ref = reference_gaussian_noise(n, sigma, key).double()
    assert ((got.double() - ref).abs() <= 2e-6 * (sigma + ref.abs())).all()
    cpu = gaussian_noise(n, sigma, key).double()  # the CPU fast path: the same draws
    assert ((got.double() - cpu).abs() <= 4e-6 * (sigma + cpu.abs())).all()


def test_launchers_check_dtype():
    with pytest.raises(TypeError, match="acc must have dtype torch.int32"):
        launch.accumulate_ring(torch.zeros(3, device=DEVICE), torch.zeros(3, device=DEVICE))


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_public_functions_dispatch_to_cuda(gen):
    key = make_key("dispatch")
    x = torch.randn(100_003, generator=gen)
    q = quantize(x.cuda(), clip_range=1.0, bits=16, key=key)
    assert q.is_cuda and torch.equal(q.cpu(), quantize(x, clip_range=1.0, bits=16, key=key))
    stream = chacha20_keystream(key.key, key.nonce, 0, 10**6 + 3, device="cuda")
    assert torch.equal(stream.cpu(), chacha20_keystream(key.key, key.nonce, 0, 10**6 + 3))


def test_kernels_compile_for_sm90_without_fma_in_float_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.kernels._compile_kernels"], env=env, capture_output=True,
        text=True, check=False, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"keystream_kernel", "add_masks_kernel", "quantize_kernel",
                           "accumulate_ring_kernel", "accumulate_weighted_kernel",
                           "gaussian_kernel"}
    assert all(k["cubin_bytes"] > 0 for k in report.values())
    # bit-exact float kernels; gaussian_kernel's libdevice log/sin/cos use FMA internally
    # (its draws match the CPU path to the documented tolerance, not bit for bit)
    for name in ("quantize_kernel", "accumulate_weighted_kernel"):
        assert not report[name]["fma"], name
