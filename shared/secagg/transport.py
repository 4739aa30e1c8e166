"""How SecAgg+ stage messages ride in a transport message (a Flower ``RecordDict``).

One transport message may carry several stage messages, one per record, each under its
``record_name(stage, direction)``: e.g. round r's masked-input request next to round r + 1's
key advertisement. Each stage message names its own run, round and client, so the receiver
dispatches by round. Records are plain mappings here (Flower's ``ConfigRecord`` is one);
nothing in this module imports Flower.

Also the vector layout both ends agree on: the model update is the concatenation, in the
global model's key order, of ``new - global`` per array, flattened, as float32; the train
metrics in ``SECURE_METRICS`` ride in the masked vector after the weight (``encoding``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from shared.secagg.contract import (
    RECORD_PREFIX,
    Direction,
    Stage,
    _Message,
    parse,
    record_name,
)
from shared.secagg.errors import ContractError

#: Train-reply metrics averaged inside the masked vector, weighted by example counts.
SECURE_METRICS = ("train_loss",)
_STAGE_ORDER = {stage: i for i, stage in enumerate(Stage)}


def is_stage_record(name: str) -> bool:
    """Whether a record name belongs to a SecAgg stage message."""
    return name.startswith(RECORD_PREFIX + ".")


def pack(messages: Iterable[_Message]) -> dict[str, dict[str, Any]]:
    """Stage messages as ``{record name: flat dict}``; at most one per stage and direction.

    Raises:
        ContractError: two messages of the same stage and direction.
    """
    out: dict[str, dict[str, Any]] = {}
    for msg in messages:
        name = record_name(msg.STAGE, msg.DIRECTION)
        if name in out:
            raise ContractError(f"two {msg.STAGE.value!r} messages in one transport message")
        out[name] = msg.to_dict()
    return out


def unpack(records: Mapping[str, Mapping[str, Any]], direction: Direction) -> list[_Message]:
    """The stage messages of ``direction`` among ``records``, ordered by (round, stage).

    Records of other names are ignored. Raises ``ContractError`` if a stage record is
    malformed, is filed under another stage's name, or travels the other way.
    """
    out = []
    for name, record in records.items():
        if not is_stage_record(name):
            continue
        msg = parse(dict(record), direction)
        if name != record_name(msg.STAGE, direction):
            raise ContractError(f"record {name!r} holds a {msg.STAGE.value!r} message")
        out.append(msg)
    return sorted(out, key=lambda m: (m.round, _STAGE_ORDER[m.STAGE]))


def flat_update(new: Sequence[np.ndarray], old: Sequence[np.ndarray]) -> np.ndarray:
    """``concat(new_i - old_i)`` as float32, in the given (global model) order.

    Raises:
        ValueError: the two models differ in number of arrays or in a shape.
    """
    if len(new) != len(old):
        raise ValueError(f"model has {len(new)} arrays, the global model {len(old)}")
    sizes = [int(np.asarray(o).size) for o in old]
    out = np.empty(sum(sizes), dtype=np.float32)
    pos = 0
    for i, (a, b, size) in enumerate(zip(new, old, sizes, strict=True)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise ValueError(f"array {i}: shape {a.shape}, global model has {b.shape}")
        np.subtract(a.reshape(-1), b.reshape(-1), out=out[pos : pos + size], casting="unsafe")
        pos += size
    return out


def apply_update(old: Sequence[np.ndarray], mean_update: np.ndarray) -> list[np.ndarray]:
    """``old_i + update slice``, each cast back to ``old_i``'s dtype and shape.

    Float arrays get the float64 sum rounded to their dtype; integer arrays (e.g. batch
    counters) get it rounded to the nearest integer.
    """
    total = sum(int(np.asarray(o).size) for o in old)
    if mean_update.shape != (total,):
        raise ValueError(f"update has shape {mean_update.shape}, the model {total} values")
    out, pos = [], 0
    for o in old:
        o = np.asarray(o)
        new = o.astype(np.float64) + mean_update[pos : pos + o.size].reshape(o.shape)
        if not np.issubdtype(o.dtype, np.floating):
            new = np.rint(new)
        out.append(new.astype(o.dtype))
        pos += o.size
    return out
