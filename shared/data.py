"""Datasets that need no download, and site data files.

* ``mnist1d``: generated locally by the ``mnist1d`` package (Greydanus & Kobak),
  the paper's 4000/1000 train/test split by default (5000 samples, 80/20).
* ``digits``: scikit-learn's bundled 8x8 digits (1797 samples), a seeded 80/20 split.
* ``npz`` / ``csv``: a site's own file: ``.npz`` with arrays ``x`` and ``y``, or a
  ``.csv`` with a header row, one label column and numeric feature columns.

Every loader returns float32 features and int64 labels; nothing is fetched from
the network.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.config import DataConfig, Dataset
from shared.models import InputSpec

#: The ``mnist1d`` generator seed of the paper's benchmark data set.
MNIST1D_SEED = 42


class DataError(ValueError):
    """A data set or data file cannot be used; the message names the file or key."""


@dataclass(frozen=True)
class ArrayDataset:
    """Features ``x`` (float32, ``(N, *shape)``) and labels ``y`` (int64, ``(N,)``)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.x[index], self.y[index])


@dataclass(frozen=True)
class SplitDataset:
    """A train/test split and the input spec a model for it needs."""

    train: ArrayDataset
    test: ArrayDataset
    spec: InputSpec


@functools.lru_cache(maxsize=4)
def load_mnist1d(samples: int = 5000, train_fraction: float = 0.8) -> SplitDataset:
    """MNIST-1D generated locally (about 0.8 s for 5000 samples; cached per process).

    The same ``samples`` always gives the same data: the generator seed is fixed
    to the paper's (42).
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = samples
    args.train_split = train_fraction
    args.seed = MNIST1D_SEED
    raw = make_dataset(args)
    train = ArrayDataset(raw["x"].astype(np.float32), raw["y"].astype(np.int64))
    test = ArrayDataset(raw["x_test"].astype(np.float32), raw["y_test"].astype(np.int64))
    return SplitDataset(train, test, InputSpec((train.x.shape[1],), 10))


@functools.lru_cache(maxsize=1)
def load_digits(test_fraction: float = 0.2) -> SplitDataset:
    """scikit-learn's bundled 8x8 digits as ``(N, 1, 8, 8)`` in [0, 1], fixed split."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    return _split(ArrayDataset(x, y), test_fraction, seed=0)


def load_site_file(path: str | Path, label_column: str = "label") -> ArrayDataset:
    """Load a site's data file (``.npz`` with ``x``/``y`` or ``.csv`` with a label column).

    Raises:
        DataError: the file is missing, has an unknown suffix, has no labels,
            non-numeric values, or no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        data = _load_npz(path)
    elif suffix == ".csv":
        data = _load_csv(path, label_column)
    else:
        raise DataError(f"unknown data file format {suffix!r} for {path}; expected .npz or .csv")
    if len(data) == 0:
        raise DataError(f"data file {path} has no rows")
    if data.y.min() < 0:
        raise DataError(f"data file {path}: labels must be integers >= 0, got {data.y.min()}")
    return data


def _load_npz(path: Path) -> ArrayDataset:
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in ("x", "y") if k not in npz.files]
        if missing:
            raise DataError(
                f"data file {path} has no {' or '.join(missing)!s} array "
                f"(it has: {', '.join(npz.files) or 'nothing'}); expected 'x' features and "
                "'y' labels"
            )
        x, y = npz["x"], npz["y"]
    if not np.issubdtype(y.dtype, np.integer) and not np.all(np.equal(np.mod(y, 1), 0)):
        raise DataError(f"data file {path}: labels 'y' must be integers")
    return ArrayDataset(x.astype(np.float32), y.astype(np.int64).reshape(-1))


def _load_csv(path: Path, label_column: str) -> ArrayDataset:
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataError(f"data file {path} is empty")
        header = [h.strip() for h in header]
        if label_column not in header:
            raise DataError(
                f"data file {path} has no label column {label_column!r} "
                f"(columns: {', '.join(header)}); set data.label_column"
            )
        label_idx = header.index(label_column)
        xs, ys = [], []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                values = [float(v) for v in row]
            except ValueError:
                raise DataError(f"data file {path}, line {line_no}: non-numeric value") from None
            if len(values) != len(header):
                raise DataError(
                    f"data file {path}, line {line_no}: {len(values)} values, "
                    f"header has {len(header)}"
                )
            ys.append(values.pop(label_idx))
            xs.append(values)
    y = np.asarray(ys, dtype=np.float64)
    if len(y) and not np.all(np.equal(np.mod(y, 1), 0)):
        raise DataError(f"data file {path}: label column {label_column!r} must hold integers")
    x = np.asarray(xs, dtype=np.float32).reshape(len(ys), len(header) - 1)
    return ArrayDataset(x, y.astype(np.int64))


def site_file_split(
    path: str | Path, label_column: str, test_fraction: float = 0.2, num_classes: int = 0
) -> SplitDataset:
    """A site file as a pooled data set for simulation, with a seeded train/test split."""
    data = load_site_file(path, label_column)
    split = _split(data, test_fraction, seed=0)
    classes = max(num_classes, int(data.y.max()) + 1)
    return SplitDataset(split.train, split.test, InputSpec(tuple(data.x.shape[1:]), classes))


def _split(data: ArrayDataset, test_fraction: float, seed: int) -> SplitDataset:
    order = np.random.default_rng(seed).permutation(len(data))
    n_test = int(round(len(data) * test_fraction))
    test, train = data.subset(order[:n_test]), data.subset(order[n_test:])
    classes = int(data.y.max()) + 1
    return SplitDataset(train, test, InputSpec(tuple(data.x.shape[1:]), classes))


def load(config: DataConfig) -> SplitDataset:
    """The pooled data set a run config names (cached per process where generated).

    With ``data.input_shape``/``data.num_classes`` declared, that is the spec: a file in
    ``data.path`` must fit it, a built-in data set must have it, and without ``data.path``
    (npz/csv) the split is empty: the server holds no examples, only the spec.

    Raises:
        DataError: a site file cannot be read (see :func:`load_site_file`), or the data
            does not fit the declared spec.
    """
    declared = config.input_spec()
    if config.dataset is Dataset.MNIST1D:
        data = load_mnist1d(config.samples)
    elif config.dataset is Dataset.DIGITS:
        data = load_digits()
    elif config.path:
        data = site_file_split(config.path, config.label_column,
                               num_classes=declared.num_classes if declared else 0)
    elif declared is None:
        raise DataError(f"data.dataset = {config.dataset.value!r} needs data.path or "
                        "data.input_shape and data.num_classes")
    else:  # the sites hold the examples; the server only needs their spec
        empty = ArrayDataset(np.zeros((0, *declared.shape), np.float32), np.zeros(0, np.int64))
        return SplitDataset(empty, empty, declared)
    if declared is None:
        return data
    if config.dataset in (Dataset.MNIST1D, Dataset.DIGITS) and data.spec != declared:
        raise DataError(
            f"data.input_shape/data.num_classes declare {_spec_text(declared)}, but "
            f"{config.dataset.value} is {_spec_text(data.spec)}; leave them unset for it"
        )
    for part in (data.train, data.test):
        check_against_spec(part, declared, f"data file {config.path}")
    return SplitDataset(data.train, data.test, declared)


def _shape_text(shape: tuple[int, ...]) -> str:
    """A shape as ``data.input_shape`` writes it: ``'1,28,28'``."""
    return "'" + ",".join(map(str, shape)) + "'"


def _spec_text(spec: InputSpec) -> str:
    return f"shape {_shape_text(spec.shape)} with {spec.num_classes} classes"


def check_against_spec(data: ArrayDataset, spec: InputSpec, source: str) -> None:
    """Refuse ``data`` unless every example has ``spec.shape`` and every label is in
    ``0..spec.num_classes - 1``.

    Raises:
        DataError: naming ``source``, what it holds and the run-config key it disagrees with.
    """
    shape = tuple(data.x.shape[1:])
    if shape != spec.shape:
        raise DataError(
            f"{source}: examples have shape {_shape_text(shape)}, but the run "
            f"declares data.input_shape = {_shape_text(spec.shape)}"
        )
    if len(data) and int(data.y.max()) >= spec.num_classes:
        raise DataError(
            f"{source}: label {int(data.y.max())} is outside 0..{spec.num_classes - 1} "
            f"(data.num_classes = {spec.num_classes})"
        )


def holdout(data: ArrayDataset, fraction: float, *, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Split a site's data into (train, validation); validation gets ``fraction`` of it."""
    order = np.random.default_rng(seed).permutation(len(data))
    n_val = int(len(data) * fraction)
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))
