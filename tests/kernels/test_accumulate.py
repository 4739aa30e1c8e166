"""accumulate_ring / accumulate_weighted: bit-exact against references, wrap-around, refusals."""

import pytest
import torch

from kernels import (
    RING_DTYPE,
    accumulate_ring,
    accumulate_weighted,
    reference_accumulate_ring,
    reference_accumulate_weighted,
)
from tests.kernels.conftest import SIZES


def _ring(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(RING_DTYPE)


@pytest.mark.parametrize("n", SIZES)
def test_ring_matches_reference(n, gen):
    acc, x = _ring(n, gen), _ring(n, gen)
    expected = reference_accumulate_ring(acc, x)
    assert accumulate_ring(acc, x) is acc
    assert torch.equal(acc, expected)


def test_ring_wraps_mod_2_32():
    acc = torch.tensor([2**31 - 1, -1, -(2**31)], dtype=RING_DTYPE)
    accumulate_ring(acc, torch.tensor([1, 1, -1], dtype=RING_DTYPE))
    assert acc.tolist() == [-(2**31), 0, 2**31 - 1]


def test_streaming_fold_equals_sum(gen):
    updates = [_ring(999, gen) for _ in range(9)]
    acc = torch.zeros(999, dtype=RING_DTYPE)
    for u in updates:
        accumulate_ring(acc, u)
    total = sum(u.to(torch.int64) for u in updates)
    assert torch.equal(acc, reference_accumulate_ring(torch.zeros_like(acc), (
        (total + 2**31) % 2**32 - 2**31).to(RING_DTYPE)))


@pytest.mark.parametrize("w", [0.0, 1.0, 0.3, -2.5, 1e-3, 123456.789])
@pytest.mark.parametrize("n", SIZES)
def test_weighted_matches_reference_bit_for_bit(n, w, gen):
    acc, x = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    expected = reference_accumulate_weighted(acc, x, w)
    assert accumulate_weighted(acc, x, w) is acc
    assert torch.equal(acc, expected)


def test_weighted_rounds_product_then_sum():
    # x * w = 1 + 2**-22 + 2**-46 exactly: an FMA would leave 2**-46, two roundings leave 0.
    acc = torch.tensor([-(1.0 + 2.0**-22)], dtype=torch.float32)
    x = torch.tensor([1.0 + 2.0**-23], dtype=torch.float32)
    accumulate_weighted(acc, x, 1.0 + 2.0**-23)
    assert acc.item() == 0.0


@pytest.mark.parametrize(
    ("acc", "x", "error", "match"),
    [
        (torch.zeros(3, dtype=RING_DTYPE), torch.zeros(4, dtype=RING_DTYPE), ValueError,
         "same shape"),
        (torch.zeros(3, dtype=RING_DTYPE), torch.zeros(3, dtype=torch.int64), TypeError,
         "x must have dtype torch.int32"),
        (torch.zeros(3, 2, dtype=RING_DTYPE).t(), torch.zeros(2, 3, dtype=RING_DTYPE),
         ValueError, "contiguous"),
    ],
)
def test_ring_bad_arguments(acc, x, error, match):
    with pytest.raises(error, match=match):
        accumulate_ring(acc, x)


@pytest.mark.parametrize("w", [float("nan"), float("inf"), 1e39, True, "1"])
def test_weighted_bad_weight(w):
    with pytest.raises(ValueError, match="w must"):
        accumulate_weighted(torch.zeros(2), torch.zeros(2), w)
