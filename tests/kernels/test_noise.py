"""DP noise from ChaCha20: moments, tails, exact pmf, symmetry, reference equality, refusals."""

import math

import numpy as np
import pytest
import torch

from kernels import (
    RING_DTYPE,
    MaskPurpose,
    discrete_gaussian_noise,
    gaussian_noise,
    reference_discrete_gaussian_noise,
    reference_gaussian_noise,
)
from kernels.chacha20 import chacha20_keystream
from kernels.noise import GAUSS_RUN, _gaussian_numpy, _gaussian_torch, _GaussScratch
from tests.kernels.conftest import SIZES, make_key

DRAWS = 10**6


def _key(label: str):
    return make_key(label, MaskPurpose.DP_NOISE)


def _discrete_gaussian_pmf(sigma: float, support: int = 200) -> dict[int, float]:
    weights = {k: math.exp(-k * k / (2 * sigma * sigma)) for k in range(-support, support + 1)}
    total = math.fsum(weights.values())
    return {k: w / total for k, w in weights.items()}


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_gaussian_moments(sigma):
    z = gaussian_noise(DRAWS, sigma, _key(f"g{sigma}"))
    assert z.dtype == torch.float32 and z.numel() == DRAWS
    z = z.double()
    se_mean, se_var = sigma / math.sqrt(DRAWS), sigma**2 * math.sqrt(2 / DRAWS)
    assert abs(z.mean().item()) < 5 * se_mean
    assert abs(z.var().item() - sigma**2) < 5 * se_var
    kurtosis = (z**4).mean().item() / sigma**4
    assert abs(kurtosis - 3.0) < 5 * math.sqrt(96 / DRAWS)  # var of z^4/sigma^4 is 96


def test_gaussian_tails_and_pair_independence():
    z = gaussian_noise(DRAWS, 1.0, _key("tails")).double()
    for t in (2.0, 3.0, 4.0):
        p = math.erfc(t / math.sqrt(2))
        observed = (z.abs() > t).double().mean().item()
        assert abs(observed - p) < 5 * math.sqrt(p * (1 - p) / DRAWS), (t, observed, p)
    runs = DRAWS // (2 * GAUSS_RUN)
    pairs = z[: runs * 2 * GAUSS_RUN].view(runs, 2, GAUSS_RUN)  # r cos, r sin of one pair
    corr = (pairs[:, 0] * pairs[:, 1]).mean().item()  # uncorrelated: E[z1 z2] = 0, sd 1
    assert abs(corr) < 5 / math.sqrt(runs * GAUSS_RUN)
    assert z.abs().max().item() <= 9.42


def _words(m_bits: int, angle: int) -> torch.Tensor:
    """One run whose every pair has low-63-bit radius word ``m_bits`` and angle ``angle``."""
    w = torch.zeros(1, 3 * GAUSS_RUN, dtype=torch.int64)
    w[0, 0 : 2 * GAUSS_RUN : 2] = m_bits & 0xFFFFFFFF
    w[0, 1 : 2 * GAUSS_RUN : 2] = m_bits >> 32
    w[0, 2 * GAUSS_RUN :] = angle
    return w.to(torch.int32)  # wraps to the int32 bit patterns


@pytest.mark.parametrize(("m_bits", "angle", "radius"), [
    (0, 0, math.sqrt(128 * math.log(2))),  # smallest uniform: the largest radius, finite
    ((1 << 63) - 1, 1 << 30, 0.0),  # largest uniform: radius 0, never NaN
    (1 << 62, -(1 << 31), math.sqrt(2 * math.log(2))),  # u = 1/2, theta = -pi
])
def test_gaussian_transform_edges_cpu_and_torch_paths(m_bits, angle, radius):
    words = _words(m_bits, angle)
    out = np.empty((1, 2, GAUSS_RUN), dtype=np.float32)
    _gaussian_numpy(words.numpy().view(np.uint32).copy(), 2.0, out, _GaussScratch(1))
    via_torch = _gaussian_torch(words, 2.0)
    theta = angle * math.pi / 2**31
    want = torch.tensor([2 * radius * math.cos(theta), 2 * radius * math.sin(theta)])
    for got in (torch.from_numpy(out), via_torch):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[0, :, 0], want, rtol=1e-6, atol=1e-6)
        assert (got == got[:, :, :1]).all()


@pytest.mark.parametrize("sigma", [0.8, 3.0, 40.0])
def test_discrete_gaussian_moments_and_pmf(sigma):
    z = discrete_gaussian_noise(DRAWS, sigma, _key(f"d{sigma}"))
    assert z.dtype == RING_DTYPE and z.numel() == DRAWS
    pmf = _discrete_gaussian_pmf(sigma)
    variance = math.fsum(k * k * p for k, p in pmf.items())
    fourth = math.fsum(k**4 * p for k, p in pmf.items())
    v = z.double()
    assert abs(v.mean().item()) < 5 * math.sqrt(variance / DRAWS)
    assert abs(v.var().item() - variance) < 5 * math.sqrt((fourth - variance**2) / DRAWS)
    counts = np.bincount(z.numpy() + 1000, minlength=2001)
    for k in range(-3, 4):
        p, observed = pmf[k], counts[k + 1000] / DRAWS
        assert abs(observed - p) < 5 * math.sqrt(p * (1 - p) / DRAWS), (k, observed, p)


def test_discrete_gaussian_is_symmetric():
    z = discrete_gaussian_noise(DRAWS, 2.0, _key("sym")).numpy()
    counts = np.bincount(np.abs(z) * 2 + (z < 0), minlength=40)
    for k in range(1, 6):
        pos, neg = counts[2 * k], counts[2 * k + 1]
        assert abs(pos - neg) < 5 * math.sqrt(pos + neg), (k, pos, neg)


def _assert_near_reference(got: torch.Tensor, ref: torch.Tensor, sigma: float) -> None:
    """The documented bound: within 2e-6 * (sigma + |z|) of the float64 reference."""
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = (got.double() - ref.double()).abs()
    assert (err <= 2e-6 * (sigma + ref.double().abs())).all(), err.max().item()


@pytest.mark.parametrize("n", SIZES[:-1])
def test_gaussian_matches_reference(n):
    key = _key(f"gr{n}")
    _assert_near_reference(gaussian_noise(n, 1.7, key), reference_gaussian_noise(n, 1.7, key), 1.7)


@pytest.mark.parametrize("sigma", [1e-3, 1.0, 250.0])
def test_gaussian_torch_path_matches_reference(sigma):
    """The path CUDA uses, run on CPU tensors: the same transform as the numpy fast path."""
    key, n = _key(f"gt{sigma}"), 3 * GAUSS_RUN + 5
    runs = -(-n // (2 * GAUSS_RUN))
    words = chacha20_keystream(key.key, key.nonce, 0, 3 * GAUSS_RUN * runs)
    got = _gaussian_torch(words.view(runs, -1), sigma).reshape(-1)[:n]
    _assert_near_reference(got, reference_gaussian_noise(n, sigma, key), sigma)


def test_gaussian_is_prefix_stable_across_chunks():
    key = _key("gprefix")
    big = gaussian_noise(2 * GAUSS_RUN * 200 + 7, 1.0, key)  # several CPU chunks
    assert torch.equal(gaussian_noise(10, 1.0, key), big[:10])
    assert torch.equal(gaussian_noise(2 * GAUSS_RUN * 70, 1.0, key), big[: 2 * GAUSS_RUN * 70])


@pytest.mark.parametrize("n", SIZES[:-1])
def test_discrete_gaussian_matches_reference(n):
    key = _key(f"dr{n}")
    assert torch.equal(discrete_gaussian_noise(n, 2.2, key),
                       reference_discrete_gaussian_noise(n, 2.2, key))


def test_large_draws_are_reproducible_and_key_dependent():
    n = SIZES[-1]
    a = gaussian_noise(n, 1.0, _key("big"))
    assert a.shape == (n,) and torch.equal(a, gaussian_noise(n, 1.0, _key("big")))
    assert not torch.equal(a, gaussian_noise(n, 1.0, _key("other")))
    d = discrete_gaussian_noise(n, 1.0, _key("big"))
    assert d.shape == (n,) and torch.equal(d, discrete_gaussian_noise(n, 1.0, _key("big")))


def test_discrete_output_is_a_prefix_independent_of_n():
    key = _key("prefix")
    assert torch.equal(discrete_gaussian_noise(10, 3.0, key), discrete_gaussian_noise(5000, 3.0,
                                                                                     key)[:10])


@pytest.mark.parametrize(
    ("fn", "n", "sigma", "match"),
    [
        (gaussian_noise, -1, 1.0, "n must be an int >= 0"),
        (gaussian_noise, 4, 0.0, "sigma must be a finite number"),
        (gaussian_noise, 4, math.nan, "sigma must be a finite number"),
        (discrete_gaussian_noise, 4, 2.0**21, r"in \(0, 1.04858e\+06\], got 2097152"),
    ],
)
def test_bad_arguments_are_refused(fn, n, sigma, match):
    with pytest.raises(ValueError, match=match):
        fn(n, sigma, _key("bad"))


def test_key_type_is_checked():
    with pytest.raises(TypeError, match="key must be a MaskKey"):
        gaussian_noise(4, 1.0, b"k" * 44)
