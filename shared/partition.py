"""Partitioners that split one labelled data set over simulated sites.

Each returns a list of index arrays, one per site, that are disjoint and (for
``iid`` and ``dirichlet``) cover every example. All are pure functions of their
arguments: the same labels, site count and seed give the same partition on every
machine (numpy's PCG64 ``Generator``; this randomness is not security relevant).

Written here rather than taken from ``flwr-datasets``: its partitioners need a
Hugging Face ``datasets.Dataset`` and pull in ``datasets``, ``pyarrow``,
``pandas`` and the hub client (19 packages in a dry-run install here) for what is
a few lines of numpy over an in-memory label array.
"""

from __future__ import annotations

import numpy as np

from shared.config import ConfigError, Partitioner


def partition(
    labels: np.ndarray,
    num_sites: int,
    how: Partitioner,
    *,
    seed: int,
    alpha: float = 1.0,
    shards_per_site: int = 2,
) -> list[np.ndarray]:
    """Dispatch to the partitioner named by ``how``."""
    if how is Partitioner.IID:
        return iid(labels, num_sites, seed=seed)
    if how is Partitioner.DIRICHLET:
        return dirichlet(labels, num_sites, alpha=alpha, seed=seed)
    return label_shards(labels, num_sites, shards_per_site=shards_per_site, seed=seed)


def _check(labels: np.ndarray, num_sites: int) -> None:
    if num_sites < 1:
        raise ConfigError(f"federation.clients must be >= 1, got {num_sites}")
    if len(labels) < num_sites:
        raise ConfigError(
            f"cannot split {len(labels)} examples over {num_sites} sites "
            "(federation.clients is larger than the data set)"
        )


def iid(labels: np.ndarray, num_sites: int, *, seed: int) -> list[np.ndarray]:
    """A uniformly random split into sizes that differ by at most one."""
    _check(labels, num_sites)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_sites)]


def dirichlet(
    labels: np.ndarray,
    num_sites: int,
    *,
    alpha: float,
    seed: int,
    min_size: int | None = None,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label skew: each class is spread over sites with proportions ~ Dir(alpha).

    Small ``alpha`` concentrates each class on few sites; large ``alpha`` tends to
    IID. Draws are repeated (deterministically) until every site holds at least
    ``min_size`` examples (default: min(10, N // (2 * num_sites)), at least 1).

    Raises:
        ConfigError: alpha <= 0, or no draw in ``max_tries`` gave every site
            ``min_size`` examples.
    """
    _check(labels, num_sites)
    if not alpha > 0:
        raise ConfigError(f"data.alpha must be > 0, got {alpha}")
    if min_size is None:
        min_size = max(1, min(10, len(labels) // (2 * num_sites)))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for idx in by_class:
            props = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ConfigError(
        f"data.alpha = {alpha} with {num_sites} sites left a site with fewer than "
        f"{min_size} examples in {max_tries} draws; raise data.alpha or lower federation.clients"
    )


def label_shards(
    labels: np.ndarray, num_sites: int, *, shards_per_site: int, seed: int
) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, cut into shards, deal them out.

    Each site gets ``shards_per_site`` shards, so it sees at most that many labels
    (plus shard boundaries). Examples left over by the integer division are unused.
    """
    _check(labels, num_sites)
    if shards_per_site < 1:
        raise ConfigError(f"data.shards_per_client must be >= 1, got {shards_per_site}")
    num_shards = num_sites * shards_per_site
    shard_size = len(labels) // num_shards
    if shard_size == 0:
        raise ConfigError(
            f"{len(labels)} examples cannot make {num_shards} shards "
            "(federation.clients * data.shards_per_client)"
        )
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    shards = order[: num_shards * shard_size].reshape(num_shards, shard_size)
    deal = rng.permutation(num_shards).reshape(num_sites, shards_per_site)
    return [np.sort(shards[row].reshape(-1)) for row in deal]
