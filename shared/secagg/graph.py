"""Public k-regular neighbourhood graph for SecAgg+.

The graph is a Harary graph H(k, n) (a circulant: each vertex joined to the floor(k/2)
nearest vertices on each side of a ring, plus the opposite vertex when k is odd) whose ring
order is a uniformly random permutation of the client indices. This is the construction of
Flower's SecAgg+ and gives, for every seed, a k-regular, symmetric, loop-free graph; the
random relabelling makes each client's neighbourhood a uniformly random position in it.

The permutation is drawn by Fisher-Yates from SHA-256 in counter mode keyed by a public seed,
so every party derives the same graph from (run id, round, n) without a message and without
any numpy RNG.
"""

from __future__ import annotations

import hashlib

_GRAPH_DOMAIN = b"privfed/secagg/graph/v1"


def graph_seed(run_id: int, round_: int, n: int) -> bytes:
    """Public 32-byte seed of the neighbourhood graph of one round."""
    h = hashlib.sha256(_GRAPH_DOMAIN)
    for v in (run_id, round_, n):
        h.update(int(v).to_bytes(16, "little", signed=True))
    return h.digest()


class _HashStream:
    """Deterministic stream of unbiased integers from SHA-256(seed || counter)."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0

    def _word(self) -> int:
        block = hashlib.sha256(self._seed + self._counter.to_bytes(8, "little")).digest()
        self._counter += 1
        return int.from_bytes(block[:8], "little")

    def below(self, bound: int) -> int:
        """Uniform integer in [0, bound) by rejection sampling."""
        limit = (1 << 64) - (1 << 64) % bound
        while True:
            w = self._word()
            if w < limit:
                return w % bound


def permutation(n: int, seed: bytes) -> list[int]:
    """Uniformly random permutation of range(n), a pure function of ``seed``."""
    order = list(range(n))
    stream = _HashStream(seed)
    for i in range(n - 1, 0, -1):
        j = stream.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def neighbours(n: int, k: int, seed: bytes) -> tuple[tuple[int, ...], ...]:
    """Neighbour lists of a random k-regular graph on client indices ``0..n-1``.

    Returns:
        ``nbrs`` with ``nbrs[u]`` the sorted neighbours of u. Guarantees: ``len(nbrs[u]) == k``,
        ``u not in nbrs[u]``, ``v in nbrs[u]`` iff ``u in nbrs[v]``, identical for equal
        arguments. ``k = n - 1`` gives the complete graph (plain SecAgg).

    Raises:
        ValueError: unless ``1 <= k <= n - 1`` and ``n * k`` is even.
    """
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, n - 1] = [1, {n - 1}], got {k}")
    if (n * k) % 2:
        raise ValueError(f"n * k must be even for a k-regular graph, got n={n}, k={k}")
    order = permutation(n, seed)
    offsets = list(range(1, k // 2 + 1))
    offsets += [-o for o in offsets]
    if k % 2:
        offsets.append(n // 2)
    nbrs: list[set[int]] = [set() for _ in range(n)]
    for pos, u in enumerate(order):
        for off in offsets:
            nbrs[u].add(order[(pos + off) % n])
    return tuple(tuple(sorted(s)) for s in nbrs)
