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


def _sgd_runs(optimizer_kwargs, hook=False):
    """(weights after shared.training.train, weights after torch's own step loop)."""
    from shared.models import InputSpec, get_model
    from shared.training import train

    data = ArrayDataset(np.random.default_rng(0).standard_normal((70, 12), dtype=np.float32),
                        np.arange(70) % 3)  # fmt: skip
    out = []
    for ours in (True, False):
        torch.manual_seed(0)
        model = get_model("mlp", InputSpec((12,), 3))
        optimizer = torch.optim.SGD(model.parameters(), **optimizer_kwargs)
        if hook:
            optimizer.register_step_post_hook(lambda *_: None)
        batches = Batches(data, 16, seed=5, shuffle=True)
        if ours:
            loss = train(model, batches, optimizer, epochs=2)
        else:
            losses = []
            for _ in range(2):
                for x, y in batches:
                    optimizer.zero_grad(set_to_none=True)
                    step_loss = torch.nn.functional.cross_entropy(model(x), y)
                    step_loss.backward()
                    optimizer.step()
                    losses.append(float(step_loss.detach()))
            loss = float(np.mean(losses))
        out.append((loss, [p.detach().clone() for p in model.parameters()]))
    return out


@pytest.mark.parametrize("kwargs, hook", [({"lr": 0.05}, False), ({"lr": 0.1}, True),
                                          ({"lr": 0.05, "momentum": 0.9}, False),
                                          ({"lr": 0.05, "weight_decay": 1e-3}, False)])
def test_train_gives_the_weights_of_torchs_sgd_step_bit_for_bit(kwargs, hook):
    (loss, ours), (ref_loss, ref) = _sgd_runs(kwargs, hook)
    assert loss == ref_loss
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))


def test_an_optimizer_that_is_not_torchs_sgd_takes_its_own_step():
    from shared.training import _plain_sgd_step

    class Wrapped:  # what a DP optimizer looks like from here: a wrapper, not an SGD
        param_groups: list = []

    assert _plain_sgd_step(Wrapped()) is None  # type: ignore[arg-type]
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert _plain_sgd_step(adam) is None
