import numpy as np
import pytest

from shared.config import ConfigError, Partitioner
from shared.partition import dirichlet, iid, label_shards, partition

LABELS = np.repeat(np.arange(10), 200)  # 2000 examples, 10 balanced classes


def label_skew(labels, parts):
    """Mean total-variation distance between each site's label mix and the global one."""
    classes = np.unique(labels)
    glob = np.array([(labels == c).mean() for c in classes])
    tvs = []
    for p in parts:
        local = np.array([(labels[p] == c).mean() for c in classes])
        tvs.append(0.5 * np.abs(local - glob).sum())
    return float(np.mean(tvs))


@pytest.mark.parametrize("how", list(Partitioner))
def test_same_seed_same_partition_other_seed_another(how):
    a = partition(LABELS, 10, how, seed=3, alpha=0.5)
    b = partition(LABELS, 10, how, seed=3, alpha=0.5)
    c = partition(LABELS, 10, how, seed=4, alpha=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("how", [Partitioner.IID, Partitioner.DIRICHLET])
def test_partitions_are_disjoint_and_cover_everything(how):
    parts = partition(LABELS, 7, how, seed=0, alpha=1.0)
    allidx = np.concatenate(parts)
    assert len(parts) == 7
    assert len(allidx) == len(LABELS) == len(np.unique(allidx))


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in iid(LABELS, 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_grows_as_alpha_falls():
    skews = [label_skew(LABELS, dirichlet(LABELS, 10, alpha=a, seed=1)) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5
    assert label_skew(LABELS, iid(LABELS, 10, seed=1)) < skews[1]


def test_dirichlet_keeps_every_site_non_empty():
    parts = dirichlet(LABELS, 20, alpha=0.1, seed=0)
    assert min(len(p) for p in parts) >= 10


def test_label_shards_give_each_site_few_labels():
    parts = label_shards(LABELS, 10, shards_per_site=2, seed=0)
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)
    assert len(np.unique(np.concatenate(parts))) == sum(len(p) for p in parts)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: iid(LABELS, 0, seed=0), "federation.clients must be >= 1"),
        (lambda: iid(LABELS[:3], 5, seed=0), "larger than the data set"),
        (lambda: dirichlet(LABELS, 5, alpha=0.0, seed=0), "data.alpha must be > 0"),
        (lambda: dirichlet(LABELS, 500, alpha=0.01, seed=0, min_size=4, max_tries=3),
         "raise data.alpha"),
        (lambda: label_shards(LABELS, 10, shards_per_site=0, seed=0), "shards_per_client"),
    ],
)
def test_bad_partition_requests_name_the_setting(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
