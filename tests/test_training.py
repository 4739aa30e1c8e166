"""The plain training loop's batching and seeding (shared/training.py)."""

import numpy as np
import pytest
import torch

from shared.data import ArrayDataset
from shared.training import Batches, seed_torch


def _data(n: int) -> ArrayDataset:
    return ArrayDataset(np.arange(n, dtype=np.float32).reshape(n, 1), np.arange(n) % 10)


@pytest.mark.parametrize("n, size", [(0, 4), (1, 4), (200, 32), (64, 32), (7, 10)])
def test_each_epoch_visits_every_example_once(n, size):
    batches = Batches(_data(n), size, seed=3, shuffle=True)
    for _ in range(2):
        seen = [b for b in batches]
        assert len(seen) == len(batches) == -(-n // size)
        assert all(len(x) == len(y) <= size for x, y in seen)
        rows = torch.cat([x for x, _ in seen]).flatten().tolist() if seen else []
        assert sorted(rows) == list(range(n))
        for x, y in seen:  # features and labels stay paired
            assert torch.equal(y, x.flatten().long() % 10)


def test_shuffling_is_reproducible_from_the_seed_and_differs_per_epoch():
    def epochs(seed):
        batches = Batches(_data(50), 8, seed=seed, shuffle=True)
        return [torch.cat([x for x, _ in batches]).flatten().tolist() for _ in range(2)]

    first, again, other = epochs(1), epochs(1), epochs(2)
    assert first == again
    assert first[0] != first[1]
    assert first != other


def test_without_shuffle_batches_keep_the_file_order():
    batches = Batches(_data(10), 4, seed=0, shuffle=False)
    assert [x.flatten().tolist() for x, _ in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        Batches(_data(3), 0, seed=0, shuffle=True)


def test_seed_torch_makes_cpu_draws_reproducible():
    seed_torch(7)
    a = torch.rand(5)
    seed_torch(7)
    assert torch.equal(a, torch.rand(5))
    torch.manual_seed(7)  # the same generator torch.manual_seed seeds
    assert torch.equal(a, torch.rand(5))
