"""l2_clip / l2_norm: norm bound after rounding, norm 0, inf, NaN, reference, dtypes."""

import math
from fractions import Fraction

import pytest
import torch

from kernels import l2_clip, l2_norm, reference_l2_clip
from tests.kernels.conftest import SIZES


def _exact_norm_squared(x: torch.Tensor) -> Fraction:
    return sum((Fraction(v) ** 2 for v in x.double().tolist()), Fraction(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(n, dtype, gen):
    x = (torch.randn(n, generator=gen) * 3).to(dtype)
    fast, ref = l2_clip(x, 1.0), reference_l2_clip(x, 1.0)
    assert fast.dtype == dtype and fast.shape == x.shape
    torch.testing.assert_close(fast, ref, rtol=2e-7 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 1.0, 7.0])
def test_clipped_norm_never_exceeds_the_bound_exactly(max_norm, gen):
    for trial in range(20):
        x = torch.randn(257, generator=gen) * (10.0 ** (trial % 5 - 2))
        out = l2_clip(x, max_norm)
        assert _exact_norm_squared(out) <= Fraction(max_norm) ** 2


def test_small_vectors_are_returned_unchanged_as_copies(gen):
    x = torch.randn(100, generator=gen)
    out = l2_clip(x, 1e6)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_direction_is_preserved(gen):
    x = torch.randn(1000, generator=gen, dtype=torch.float64)
    out = l2_clip(x, 0.25)
    assert torch.allclose(out / out.norm(), x / x.norm(), rtol=1e-12, atol=1e-15)
    assert out.norm().item() == pytest.approx(0.25, rel=2e-6)


@pytest.mark.parametrize("n", [0, 5])
def test_zero_norm_returns_zeros_without_dividing(n):
    x = torch.zeros(n)
    assert torch.equal(l2_clip(x, 1.0), x)
    assert l2_norm(x) == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused(bad):
    x = torch.tensor([1.0, bad, 2.0, bad])
    with pytest.raises(ValueError, match="2 of 4 values are NaN or inf"):
        l2_clip(x, 1.0)


def test_float32_norm_does_not_overflow():
    x = torch.full((1000,), 3e38)
    assert math.isfinite(l2_norm(x))
    assert _exact_norm_squared(l2_clip(x, 1.0)) <= 1


def test_float64_square_overflow_is_refused():
    with pytest.raises(ValueError, match="overflows float64"):
        l2_norm(torch.tensor([1e200, 1e200], dtype=torch.float64))


@pytest.mark.parametrize("max_norm", [0, -1.0, math.inf, math.nan, "1"])
def test_bad_max_norm_is_refused(max_norm):
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
        l2_clip(torch.ones(3), max_norm)


def test_integer_input_is_refused():
    with pytest.raises(TypeError, match="float32 or float64, got torch.int32"):
        l2_clip(torch.ones(3, dtype=torch.int32), 1.0)
