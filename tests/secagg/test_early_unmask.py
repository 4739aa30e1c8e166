"""The server removes each survivor's self mask as soon as t shares of its seed are in."""

import numpy as np
import pytest

from shared.secagg.contract import Stage
from shared.secagg.params import SecAggParams
from tests.secagg._sim import run_round


def _inputs(n, length, seed):
    return np.random.default_rng(seed).integers(0, 2**32, (n, length), dtype=np.uint32)


def _ring_sum(x, rows):
    return x[sorted(rows)].sum(axis=0, dtype=np.uint64).astype(np.uint32)


ORDERS = {
    "forward": lambda order: order,
    "reverse": lambda order: order[::-1],
    "shuffled": lambda order: list(np.random.default_rng(5).permutation(order)),
}


@pytest.mark.parametrize("order", ORDERS, ids=str)
@pytest.mark.parametrize("drops", [{}, {Stage.COLLECT_MASKED: {1, 6}}, {Stage.UNMASK: {0, 4}}],
                         ids=["none", "collect", "unmask"])  # fmt: skip
def test_sum_is_exact_whatever_order_unmask_replies_arrive_in(order, drops):
    params = SecAggParams(n=9, k=6, t=4)
    x = _inputs(9, 17, seed=3)
    out, server, _ = run_round(params, x, drops=drops, unmask_order=ORDERS[order])
    survivors = set(range(9)) - drops.get(Stage.COLLECT_MASKED, set())
    assert server.survivors == tuple(sorted(survivors))
    assert np.array_equal(out, _ring_sum(x, survivors))


def test_self_masks_are_gone_before_finalize_when_nobody_dropped():
    # Pairwise masks cancel in the sum, so once every self mask is removed on arrival the
    # accumulator already holds the plain sum and finalize has nothing left to subtract.
    x = _inputs(8, 11, seed=4)
    seen = {}

    def keep(server):
        seen["acc"] = server._acc.copy()

    out, _, _ = run_round(SecAggParams(n=8, k=4, t=3), x, before_finalize=keep)
    assert np.array_equal(seen["acc"], _ring_sum(x, range(8)))
    assert np.array_equal(out, seen["acc"])
