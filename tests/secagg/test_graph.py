"""k-regular neighbourhood graph: degree, symmetry, determinism."""

import pytest

from shared.secagg.graph import graph_seed, neighbours, permutation


@pytest.mark.parametrize(("n", "k"), [(2, 1), (5, 2), (5, 4), (6, 3), (10, 4), (10, 9), (31, 6)])
def test_k_regular_symmetric_loop_free(n, k):
    nbrs = neighbours(n, k, graph_seed(1, 2, n))
    assert len(nbrs) == n
    for u, vs in enumerate(nbrs):
        assert len(vs) == k and len(set(vs)) == k
        assert u not in vs
        assert all(0 <= v < n and u in nbrs[v] for v in vs)


def test_complete_graph_when_k_is_n_minus_1():
    nbrs = neighbours(8, 7, graph_seed(0, 0, 8))
    assert all(set(vs) == set(range(8)) - {u} for u, vs in enumerate(nbrs))


def test_deterministic_from_seed_and_varies_with_it():
    assert neighbours(20, 4, graph_seed(5, 3, 20)) == neighbours(20, 4, graph_seed(5, 3, 20))
    graphs = {neighbours(20, 4, graph_seed(5, r, 20)) for r in range(5)}
    assert len(graphs) == 5


def test_permutation_is_a_permutation():
    for n in (1, 2, 7, 100):
        assert sorted(permutation(n, b"s" * 32)) == list(range(n))


@pytest.mark.parametrize(("n", "k"), [(5, 3), (4, 4), (4, 0)])
def test_impossible_graphs_rejected(n, k):
    with pytest.raises(ValueError, match="k"):
        neighbours(n, k, b"\0" * 32)
