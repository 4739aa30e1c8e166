"""DP noise from ChaCha20: moments, exact pmf, symmetry, reference equality, refusals."""

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


@pytest.mark.parametrize("n", SIZES[:-1])
def test_gaussian_matches_reference(n):
    key = _key(f"gr{n}")
    torch.testing.assert_close(
        gaussian_noise(n, 1.7, key), reference_gaussian_noise(n, 1.7, key), rtol=1e-6, atol=1e-7
    )


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
