"""SecAggParams: one clear ValueError per violation, naming the parameter."""

import math

import pytest

from shared.secagg.params import SecAggParams, max_weight_limit

VALID = {"n": 10, "k": 6, "t": 4, "bits": 16, "clip_range": 1.0, "max_weight": 100}


def make(**overrides):
    return SecAggParams(**{**VALID, **overrides})


def test_valid_and_plain():
    p = make()
    assert (p.n, p.k, p.t) == (10, 6, 4)
    plain = SecAggParams.plain(n=7, t=4)
    assert plain.k == 6
    assert SecAggParams.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"n": 1, "k": 1, "t": 1}, r"n must be >= 2"),
        ({"k": 0, "t": 1}, r"k must be in \[1, n - 1\]"),
        ({"k": 10, "t": 6}, r"k must be in \[1, n - 1\] = \[1, 9\], got 10"),
        ({"n": 9, "k": 5, "t": 3}, r"n \* k must be even"),
        ({"t": 3}, r"t must be > k / 2 = 3.0, got t=3"),
        ({"t": 7}, r"t must be <= k = 6, got t=7"),
        ({"bits": 0}, r"bits must be in \[1, 24\] \(kernels.quantize\), got 0"),
        ({"bits": 25}, r"bits must be in \[1, 24\] \(kernels.quantize\), got 25"),
        ({"max_weight": 0}, r"max_weight must be >= 1, got 0"),
        ({"max_weight": 10**5}, r"bits=16 and max_weight=100000 .* exceed 2\*\*32 - 1"),
        ({"clip_range": 0.0}, r"clip_range must be finite and > 0, got 0.0"),
        ({"clip_range": -1.0}, r"clip_range must be finite and > 0"),
        ({"clip_range": math.nan}, r"clip_range must be finite and > 0"),
        ({"clip_range": math.inf}, r"clip_range must be finite and > 0"),
        ({"metric_clip_range": 0.0}, r"metric_clip_range must be finite and > 0"),
        ({"k": 6.0}, r"k must be an int, got float"),
        ({"t": True}, r"t must be an int, got bool"),
        ({"clip_range": "1"}, r"clip_range must be a number, got str"),
    ],
)
def test_each_violation_is_one_clear_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        make(**overrides)


def test_capacity_boundary_is_exact():
    limit = max_weight_limit(10, 16)
    assert 10 * limit * (2**16 - 1) <= 2**32 - 1 < 10 * (limit + 1) * (2**16 - 1)
    make(max_weight=limit)
    with pytest.raises(ValueError, match="max_weight"):
        make(max_weight=limit + 1)


def test_from_dict_names_missing_keys():
    d = make().to_dict()
    del d["t"]
    with pytest.raises(ValueError, match=r"missing \['t'\]"):
        SecAggParams.from_dict(d)
