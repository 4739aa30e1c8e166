"""Weighted encoding into Z_2^32 and decoding of the secure sum."""

import numpy as np
import pytest

from kernels import dequantization_error_bound
from shared.secagg.encoding import decode, encode, vector_length
from shared.secagg.params import SecAggParams, max_weight_limit
from tests.secagg._sim import drbg, run_round


def test_slots_edges_and_weight_scaling():
    p = SecAggParams(n=4, k=3, t=2, bits=8, max_weight=50)
    x = np.array([-np.inf, -5.0, -1.0, 0.0, 0.25, 1.0, 7.0, np.inf])
    one = encode(x, 1, p, metrics=np.array([1e9, -1e9]), randbytes=drbg(0))
    assert one.dtype == np.uint32 and one.shape == (vector_length(8, 2),)
    assert one[:3].tolist() == [0, 0, 0] and one[5:8].tolist() == [255, 255, 255]
    assert 127 <= one[3] <= 128 and one[8] == 1 and one[9:].tolist() == [255, 0]
    seven = encode(x, 7, p, metrics=np.array([1e9, -1e9]), randbytes=drbg(0))
    assert np.array_equal(seven, one * 7)  # same dither: every slot, weight included, x 7
    assert encode(np.zeros(0), 3, p).tolist() == [3]


def test_nan_and_bad_weights_rejected():
    p = SecAggParams(n=4, k=3, t=2, max_weight=50)
    with pytest.raises(ValueError, match="NaN"):
        encode(np.array([0.0, np.nan]), 1, p)
    with pytest.raises(ValueError, match="NaN"):
        encode(np.zeros(2), 1, p, metrics=np.array([np.nan]))
    for w in (0, 51, -1):
        with pytest.raises(ValueError, match=r"weight must be in \[1, max_weight=50\]"):
            encode(np.zeros(2), w, p)
    with pytest.raises(ValueError, match="int example count"):
        encode(np.zeros(2), 2.0, p)


def test_weighted_mean_through_secure_aggregation():
    n, d, bits, c = 6, 50, 16, 0.5
    params = SecAggParams(n=n, k=4, t=3, bits=bits, clip_range=c, max_weight=1000)
    rng = np.random.default_rng(0)  # test data only
    updates = rng.normal(0, 0.2, (n, d))
    weights = rng.integers(1, 1001, n)
    losses = rng.uniform(0, 3, (n, 1))
    enc = np.stack([encode(updates[i], int(weights[i]), params, losses[i], drbg(i))
                    for i in range(n)])  # fmt: skip
    assert enc.shape == (n, vector_length(d, 1)) and enc.dtype == np.uint32
    total, _, _ = run_round(params, enc)
    assert np.array_equal(total, enc.sum(axis=0, dtype=np.uint64).astype(np.uint32))
    agg = decode(total, params, n_params=d, n_metrics=1)
    assert agg.total_weight == weights.sum()
    clipped = np.clip(updates, -c, c)
    w_total = int(weights.sum())
    tol = dequantization_error_bound(c, bits, w_total) / w_total
    assert np.abs(agg.mean_update - weights @ clipped / w_total).max() <= tol
    tol_m = dequantization_error_bound(params.metric_clip_range, bits, w_total) / w_total
    assert abs(agg.mean_metrics[0] - weights @ losses[:, 0] / w_total) <= tol_m


def test_worst_case_sum_does_not_wrap():
    n, bits = 7, 12
    w = max_weight_limit(n, bits)
    params = SecAggParams(n=n, k=6, t=4, bits=bits, max_weight=w)
    enc = np.stack([encode(np.full(5, 9.0), w, params, np.array([1e9]), drbg(i))
                    for i in range(n)])  # fmt: skip
    exact = enc.sum(axis=0, dtype=np.uint64)
    assert exact.max() <= 2**32 - 1
    agg = decode(exact.astype(np.uint32), params, n_params=5, n_metrics=1)
    assert np.allclose(agg.mean_update, params.clip_range)
    assert np.isclose(agg.mean_metrics[0], params.metric_clip_range)


def test_decode_rejects_impossible_sums():
    p = SecAggParams(n=4, k=3, t=2, max_weight=5)
    with pytest.raises(ValueError, match="3 elements"):
        decode(np.zeros(4, dtype=np.uint32), p, n_params=2)
    with pytest.raises(ValueError, match=r"total weight must be in \[1, 20\], got 0"):
        decode(np.zeros(3, dtype=np.uint32), p, n_params=2)
