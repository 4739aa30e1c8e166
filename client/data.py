"""Where a site's data comes from.

In simulation a virtual site is a partition of one pooled data set, chosen by
``partition-id``/``num-partitions`` in its node config. A deployed site points
its node config at its own file (``data-path``). Either way the site keeps a
seeded validation hold-out for federated evaluation.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from shared.config import DataConfig, Dataset, RunConfig
from shared.data import (
    ArrayDataset,
    DataError,
    SplitDataset,
    check_against_spec,
    holdout,
    load,
    load_site_file,
)
from shared.models import InputSpec
from shared.partition import partition
from shared.wire import NUM_PARTITIONS, PARTITION_ID, SITE_NAME_KEY

#: Node-config key of a deployed site's data file.
DATA_PATH = "data-path"


@dataclass(frozen=True)
class SiteData:
    """A site's training and validation examples and the model input spec."""

    train: ArrayDataset
    val: ArrayDataset
    spec: InputSpec
    site_id: int


def site_data(config: RunConfig, node_config: Mapping[str, object]) -> SiteData:
    """This site's data, from its own file or its simulation partition.

    Raises:
        DataError: the node config names neither a data file nor a partition.
    """
    if DATA_PATH in node_config:
        data = load_site_file(str(node_config[DATA_PATH]), config.data.label_column)
        # The run's declared spec, else a built-in data set's, fixes the model's input for
        # every party: the site's file must fit it. Else the spec is read off the file.
        builtin = config.data.dataset in (Dataset.MNIST1D, Dataset.DIGITS)
        spec = config.data.input_spec() or (load(config.data).spec if builtin else None)
        if spec is None:
            spec = _file_spec(data)
        check_against_spec(data, spec, f"site data file {node_config[DATA_PATH]}")
        site_id = _deployed_site_id(node_config)
        train, val = holdout(data, config.data.val_fraction, seed=config.federation.seed + site_id)
        return SiteData(train, val, spec, site_id=site_id)
    if PARTITION_ID in node_config and NUM_PARTITIONS in node_config:
        pid, n = int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS])  # type: ignore[call-overload]
        return _partition(config.data, config.federation.seed, pid, n)
    raise DataError(
        f"node config has neither {DATA_PATH!r} (a site's data file) nor "
        f"{PARTITION_ID!r}/{NUM_PARTITIONS!r} (a simulated site)"
    )


def preload_partitions(config: RunConfig) -> None:
    """Load a simulation's pooled data set and split it into its sites' partitions now.

    A simulation calls this before it starts its worker processes: forked workers then
    share the result instead of each loading the data on its first call (~0.1 s each,
    inside the first round).
    """
    _parts(config.data, config.federation.seed, config.federation.clients)


def _deployed_site_id(node_config: Mapping[str, object]) -> int:
    """A stable 31-bit id from the site's name (or its data path), so that sites get
    different training seeds and fault draws, and each the same one every round."""
    name = str(node_config.get(SITE_NAME_KEY, node_config[DATA_PATH]))
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") & 0x7FFF_FFFF


def _file_spec(data: ArrayDataset) -> InputSpec:
    return InputSpec(tuple(data.x.shape[1:]), int(data.y.max()) + 1)


@functools.lru_cache(maxsize=2)
def _pooled(data_config: DataConfig) -> SplitDataset:
    """The pooled data set, read once per process (a simulation's sites share it)."""
    pooled = load(data_config)
    if len(pooled.train) == 0:
        raise DataError(f"a simulation partitions data.path among its sites; data.dataset = "
                        f"{data_config.dataset.value!r} without data.path has no examples")
    return pooled


@functools.lru_cache(maxsize=2)
def _parts(data_config: DataConfig, seed: int, num_partitions: int) -> list[np.ndarray]:
    """Every site's example indices, computed once per process and split."""
    return partition(
        _pooled(data_config).train.y,
        num_partitions,
        data_config.partitioner,
        seed=seed,
        alpha=data_config.alpha,
        shards_per_site=data_config.shards_per_client,
    )


# Partitions are disjoint, so caching every site's costs at most one more copy of the pooled
# training set; a small cache missed on every call once a run had more sites than slots.
@functools.lru_cache(maxsize=100_000)
def _partition(data_config: DataConfig, seed: int, pid: int, num_partitions: int) -> SiteData:
    if not 0 <= pid < num_partitions:
        raise DataError(f"{PARTITION_ID} {pid} is outside 0..{num_partitions - 1}")
    pooled = _pooled(data_config)
    mine = pooled.train.subset(_parts(data_config, seed, num_partitions)[pid])
    train, val = holdout(mine, data_config.val_fraction, seed=seed + pid)
    return SiteData(train, val, pooled.spec, site_id=pid)
