"""Vectorised Shamir over GF(2^61 - 1) against Python-integer oracles."""

import itertools
import secrets

import numpy as np
import pytest

from shared.secagg import shamir
from shared.secagg.shamir import P
from tests.secagg._sim import drbg

EDGES = [0, 1, 2, P - 1, P - 2, (1 << 32) - 1, 1 << 32, (1 << 60) + 12345]


def _field(values):
    return np.array(values, dtype=np.uint64)


def test_field_ops_match_python_ints():
    rnd = shamir.random_field((2000,), drbg(1))
    a = np.concatenate([_field(EDGES).repeat(len(EDGES)), rnd[:1000]])
    b = np.concatenate([np.tile(_field(EDGES), len(EDGES)), rnd[1000:]])
    ai, bi = [int(v) for v in a], [int(v) for v in b]
    assert [int(v) for v in shamir.mulmod(a, b)] == [x * y % P for x, y in zip(ai, bi, strict=True)]
    assert [int(v) for v in shamir.addmod(a, b)] == [
        (x + y) % P for x, y in zip(ai, bi, strict=True)
    ]
    assert [int(v) for v in shamir.submod(a, b)] == [
        (x - y) % P for x, y in zip(ai, bi, strict=True)
    ]
    assert int(shamir.summod(a, axis=0)) == sum(ai) % P
    nonzero = a[a != 0]
    assert np.all(shamir.mulmod(nonzero, shamir.invmod(nonzero)) == 1)
    with pytest.raises(ValueError, match="no inverse"):
        shamir.invmod(_field([0]))


def test_random_field_rejects_p_and_uses_the_given_source():
    draws = iter([P.to_bytes(8, "little"), (5).to_bytes(8, "little")])
    out = shamir.random_field((1,), lambda n: next(draws))
    assert int(out[0]) == 5
    assert np.all(shamir.random_field((10_000,)) < P)


@pytest.mark.parametrize("length", [0, 1, 7, 8, 32, 33])
def test_secret_field_roundtrip(length):
    secret = secrets.token_bytes(length)
    assert shamir.field_to_secret(shamir.secret_to_field(secret), length) == secret
    with pytest.raises(ValueError, match="7-byte chunk"):
        shamir.field_to_secret(_field([1 << 56]), 7)


@pytest.mark.parametrize(("holders", "t"), [(1, 1), (3, 2), (5, 3), (7, 7), (9, 5)])
def test_any_t_shares_reconstruct(holders, t):
    secret = secrets.token_bytes(32)
    xs = list(range(1, holders + 1))
    shares = shamir.split(shamir.secret_to_field(secret), xs, t)
    subsets = list(itertools.combinations(range(holders), t))
    rows = np.array(subsets)
    got = shamir.reconstruct(np.array(xs, dtype=np.uint64)[rows], shares[rows])
    assert all(shamir.field_to_secret(row, 32) == secret for row in got)
    if t > 1:  # t - 1 shares plus a wrong point do not give the secret
        bad = shares[rows[0]].copy()
        bad[0] = shamir.addmod(bad[0], 1)
        wrong = shamir.reconstruct(np.array(xs, dtype=np.uint64)[rows[:1]], bad[None])
        assert not np.array_equal(wrong[0], shamir.secret_to_field(secret))


def test_t_minus_1_shares_are_consistent_with_every_secret():
    t, xs = 4, [3, 8, 11, 20, 21]
    shares = shamir.split(shamir.secret_to_field(b"k" * 32), xs, t)
    seen = [(x, int(shares[j, 0])) for j, x in enumerate(xs[: t - 1])]
    for candidate in [0, 1, 12345, P - 1]:
        # The unique degree-(t-1) polynomial through (0, candidate) and the t-1 seen shares
        # gives a share at a fresh point; with it, reconstruction yields the candidate.
        pts = [(0, candidate), *seen]
        fresh_x = 99
        fresh_y = sum(yj * _lagrange_basis(pts, j, fresh_x) for j, (_, yj) in enumerate(pts)) % P
        assert shamir.reference_reconstruct([*seen, (fresh_x, fresh_y)]) == candidate


def _lagrange_basis(pts, j, x):
    num, den = 1, 1
    for m, (xm, _) in enumerate(pts):
        if m != j:
            num = num * (x - xm) % P
            den = den * (pts[j][0] - xm) % P
    return num * pow(den, P - 2, P) % P


def test_vectorised_matches_scalar_reference():
    rng = np.random.default_rng(0)  # picks share subsets only; secrets come from drbg
    batch, t, holders, elems = 40, 6, 12, 5
    secrets_ = shamir.random_field((batch, elems), drbg(2))
    xs_all = rng.permutation(np.arange(1, 1000))[:holders]
    xs, ys = np.zeros((batch, t), np.uint64), np.zeros((batch, t, elems), np.uint64)
    for b in range(batch):
        shares = shamir.split(secrets_[b], xs_all.tolist(), t, drbg(100 + b))
        pick = rng.choice(holders, t, replace=False)
        xs[b], ys[b] = xs_all[pick], shares[pick]
    got = shamir.reconstruct(xs, ys)
    for b in range(batch):
        for e in range(elems):
            ref = shamir.reference_reconstruct(
                list(zip(map(int, xs[b]), map(int, ys[b, :, e]), strict=True))
            )
            assert ref == int(got[b, e]) == int(secrets_[b, e])


def test_invalid_points_rejected():
    s = shamir.secret_to_field(b"x" * 32)
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(s, [1, 1, 2], 2)
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(s, [0, 1, 2], 2)
    with pytest.raises(ValueError, match="t must be"):
        shamir.split(s, [1, 2], 3)
    with pytest.raises(ValueError, match="distinct"):
        shamir.lagrange_at_zero(np.array([[1, 1]], dtype=np.uint64))
