"""The wire contract: record keys and model (de)serialisation both apps use.

Flower messages carry a ``RecordDict``; privfed puts the model under
:data:`ARRAYS`, the round's instructions under :data:`CONFIG` and a site's
reply metrics under :data:`METRICS`. Strategies weight replies by the metric
:data:`NUM_EXAMPLES`. Import these names; never retype the strings.
"""

from __future__ import annotations

import functools
import io
from collections import OrderedDict
from collections.abc import Mapping
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
#: ConfigRecord in a train reply with facts about the site, not its data: ``name``
#: and, with DP on, the site's cumulative ``epsilon`` (public by design: the site
#: reports its spend; it is not averaged).
SITE = "site"
SITE_NAME = "name"
SITE_EPSILON = "epsilon"
SITE_ROUND = "round"

#: Error code of a train reply refused because the site's privacy budget is spent
#: (Flower's own codes are small integers; privfed's start at 1000).
ERROR_PRIVACY_BUDGET_EXHAUSTED = 1001

# Node-config keys a simulation sets for every virtual site.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
#: Node-config key of a deployed site's display name.
SITE_NAME_KEY = "site-name"


_Record = TypeVar("_Record", ArrayRecord, MetricRecord, ConfigRecord)


def record_at(content: RecordDict, key: str, kind: type[_Record]) -> _Record | None:
    """``content.<kind>_records.get(key)``: the record under ``key`` if it is a ``kind``.

    Flower builds those views afresh on every access, storing every record of the message
    again on the way (~35 us each); this is a dictionary lookup.
    """
    record = content.get(key)
    return record if isinstance(record, kind) else None


def first_record(content: RecordDict, kind: type[_Record]) -> _Record | None:
    """``next(iter(content.<kind>_records.values()), None)`` without building the view."""
    return next((r for r in content.values() if isinstance(r, kind)), None)


def record_views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Every array of ``record`` as a read-only view (see :func:`array_view`), key order
    kept: for reading replies without copying them."""
    return {k: array_view(v) for k, v in record.items()}


#: Flower's serialisation type for arrays: the bytes of ``numpy.save``.
_NUMPY_STYPE = "numpy.ndarray"


@functools.lru_cache(maxsize=1024)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes | None:
    """The bytes ``numpy.save`` writes before the data of a C-ordered array of this dtype
    and shape (None for dtypes without a fixed byte layout, e.g. objects, and for headers
    too long for format 1.0: those take numpy's own path)."""
    descr = np.dtype(dtype)
    if descr.hasobject:
        return None
    header = {"descr": np.lib.format.dtype_to_descr(descr), "fortran_order": False,
              "shape": shape}  # fmt: skip
    buffer = io.BytesIO()
    try:  # numpy.save writes format 1.0 unless the header does not fit it
        np.lib.format.write_array_header_1_0(buffer, header)
    except ValueError:
        return None
    return buffer.getvalue()


def numpy_to_array(value: np.ndarray) -> Array:
    """``Array.from_numpy_ndarray`` byte for byte, without ``numpy.save``'s per-call cost
    (the header of each (dtype, shape) is built once)."""
    value = value if value.flags.c_contiguous else value.copy(order="C")
    dtype, shape = str(value.dtype), tuple(value.shape)
    header = _npy_header(dtype, shape)
    if header is None:
        return Array.from_numpy_ndarray(value)
    return Array(dtype=dtype, shape=shape, stype=_NUMPY_STYPE, data=header + value.tobytes())


def _plain_view(array: Array) -> np.ndarray | None:
    """A read-only view of ``array``'s bytes when they start with exactly the header
    ``numpy.save`` writes for its declared dtype and shape and hold nothing else; None
    otherwise."""
    if array.stype != _NUMPY_STYPE:
        return None
    try:
        header = _npy_header(array.dtype, tuple(array.shape))
    except (TypeError, ValueError):  # an unknown dtype string: numpy.load says why
        return None
    data = array.data
    if header is None or not data.startswith(header):
        return None
    dtype = np.dtype(array.dtype)
    count = int(np.prod(array.shape, dtype=np.int64))
    if len(data) != len(header) + count * dtype.itemsize:
        return None
    return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(array.shape)


def array_view(array: Array) -> np.ndarray:
    """``array.numpy()``'s values without a copy: a read-only view of the message's bytes
    where they are plain ``numpy.save`` output (see :func:`array_to_numpy`), else
    ``array.numpy()``."""
    view = _plain_view(array)
    return view if view is not None else array.numpy()


def array_to_numpy(array: Array) -> np.ndarray:
    """``array.numpy()`` (a fresh, writable array), without ``numpy.load``'s header parse
    when the bytes start with exactly the header ``numpy.save`` writes for the array's
    declared dtype and shape; anything else takes ``numpy.load``'s checks.
    """
    view = _plain_view(array)
    return view.copy() if view is not None else array.numpy()


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Every array of ``record`` as numpy (see :func:`array_to_numpy`), key order kept."""
    return {k: array_to_numpy(v) for k, v in record.items()}


def numpy_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The inverse of :func:`record_to_numpy`."""
    return ArrayRecord(OrderedDict((k, numpy_to_array(v)) for k, v in arrays.items()))


def to_record(state_dict: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A torch state dict as an ``ArrayRecord`` (CPU copies, exact bytes, key order kept;
    the same bytes as ``ArrayRecord(state_dict)``)."""
    return numpy_to_record({k: v.detach().cpu().numpy() for k, v in state_dict.items()})


def from_record(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """The inverse of :func:`to_record`: bit-identical tensors, same keys and dtypes."""
    return OrderedDict((k, torch.from_numpy(v)) for k, v in record_to_numpy(record).items())


def load_into(model: torch.nn.Module, record: ArrayRecord) -> None:
    """Load global weights into ``model``; keys and shapes must match exactly.

    What ``model.load_state_dict(from_record(record))`` does for the plain parameters and
    buffers of privfed's models (values cast to each tensor's dtype as ``copy_`` casts
    them), with one copy per array instead of three: each tensor is written from a view
    of the message's bytes. Nothing is written unless every key and shape fits.

    Raises:
        ValueError: the record does not fit the model (names the keys at fault).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(record))
    extra = sorted(set(record) - set(own))
    if missing or extra:
        raise ValueError(f"model weights do not fit: missing {missing}, unexpected {extra}")
    values = {key: array_view(array) for key, array in record.items()}
    for key, value in values.items():
        if value.shape != own[key].shape:
            raise ValueError(
                f"model weights do not fit: {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(own[key].shape)}"
            )
    with torch.no_grad():
        for key, value in values.items():
            _copy_into(own[key], value)


def _copy_into(target: torch.Tensor, value: np.ndarray) -> None:
    """``target.copy_(value)`` for a CPU tensor (a state dict's: detached, aliasing the
    module's own); numpy writes it where it can, without a tensor over ``value``."""
    if target.device.type == "cpu":
        try:
            np.copyto(target.numpy(), value, casting="unsafe")
            return
        except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16, ...)
            pass
    target.copy_(torch.from_numpy(np.array(value)))
