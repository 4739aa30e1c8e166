"""Check every client reply before it can touch the global model.

A train reply is accepted only if its model has exactly the global model's keys,
shapes and dtypes, every value is finite, the update (reply minus global) has an
L2 norm within the configured bound, its example count is a positive integer
within the configured maximum, and it answers this run and this round. A
rejected reply is dropped with a :class:`Rejection` naming the reason; it never
raises, whatever garbage arrives (norm 0, inf and NaN included).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from shared.wire import (
    ARRAYS,
    NUM_EXAMPLES,
    SITE,
    SITE_ROUND,
    first_record,
    record_at,
    record_views,
)


class Reason(enum.StrEnum):
    """Why a reply was rejected (counted per kind in the round's metrics)."""

    MALFORMED = "malformed"
    WRONG_KEYS = "wrong_keys"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    NON_FINITE = "non_finite"
    NORM_TOO_LARGE = "norm_too_large"
    BAD_EXAMPLE_COUNT = "bad_example_count"
    STALE = "stale"


@dataclass(frozen=True)
class Rejection:
    """A dropped reply: who sent it, the reason kind and a human-readable detail."""

    node_id: int
    reason: Reason
    detail: str

    def __str__(self) -> str:
        return f"node {self.node_id}: {self.reason.value}: {self.detail}"


@dataclass(frozen=True)
class ReplyBounds:
    """Limits a reply must respect; ``inf`` / 0 switch a limit off."""

    max_update_norm: float = math.inf
    max_examples: int = 0


def update_norm(arrays: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``arrays - global_arrays`` over every floating-point entry.

    Computed in float64; NaN if any entry is NaN, inf if any is infinite; 0.0 for
    identical models.
    """
    total = 0.0
    for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating):
            diff = value.astype(np.float64) - global_arrays[key].astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total) if total == total else math.nan


def check_reply(
    reply: Message,
    global_arrays: Mapping[str, np.ndarray],
    bounds: ReplyBounds,
    *,
    run_id: int,
    server_round: int,
) -> Rejection | None:
    """The reason ``reply`` must not be aggregated, or None if it may."""
    node = reply.metadata.src_node_id

    def reject(reason: Reason, detail: str) -> Rejection:
        return Rejection(node, reason, detail)

    if reply.metadata.run_id != run_id:
        return reject(Reason.STALE, f"run {reply.metadata.run_id}, expected {run_id}")
    site = record_at(reply.content, SITE, ConfigRecord)
    if site is not None and SITE_ROUND in site and site[SITE_ROUND] != server_round:
        return reject(Reason.STALE, f"answers round {site[SITE_ROUND]}, expected {server_round}")
    record = record_at(reply.content, ARRAYS, ArrayRecord)
    metrics = first_record(reply.content, MetricRecord)
    if record is None or metrics is None:
        return reject(Reason.MALFORMED, f"no {ARRAYS!r} arrays or no metrics")
    try:
        arrays = record_views(record)
    except Exception as exc:  # undecodable bytes from a broken client
        return reject(Reason.MALFORMED, f"arrays cannot be decoded: {exc}")
    return (
        _check_structure(arrays, global_arrays, reject)
        or _check_values(arrays, global_arrays, bounds, reject)
        or _check_examples(metrics.get(NUM_EXAMPLES), bounds, reject)
    )


def _check_structure(arrays, global_arrays, reject) -> Rejection | None:
    if set(arrays) != set(global_arrays):
        missing = sorted(set(global_arrays) - set(arrays))[:3]
        extra = sorted(set(arrays) - set(global_arrays))[:3]
        return reject(Reason.WRONG_KEYS, f"missing {missing}, unexpected {extra}")
    for key, value in arrays.items():
        expected = global_arrays[key]
        if value.shape != expected.shape:
            return reject(Reason.WRONG_SHAPE, f"{key} has shape {value.shape}, expected "
                                              f"{expected.shape}")
        if value.dtype != expected.dtype:
            return reject(Reason.WRONG_DTYPE, f"{key} is {value.dtype}, expected {expected.dtype}")
    return None


def _check_values(arrays, global_arrays, bounds: ReplyBounds, reject) -> Rejection | None:
    for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            return reject(Reason.NON_FINITE, f"{key} has {bad} NaN/inf values")
    norm = update_norm(arrays, global_arrays)
    if not norm <= bounds.max_update_norm:
        return reject(Reason.NORM_TOO_LARGE,
                      f"update norm {norm:.4g} > bound {bounds.max_update_norm:.4g}")
    return None


def _check_examples(count: object, bounds: ReplyBounds, reject) -> Rejection | None:
    ok_type = isinstance(count, int | float) and not isinstance(count, bool)
    if not ok_type or not math.isfinite(float(count)) or float(count) != int(count) or count < 1:  # type: ignore[arg-type]
        return reject(Reason.BAD_EXAMPLE_COUNT, f"{NUM_EXAMPLES} = {count!r}, expected an "
                                                "integer >= 1")
    if bounds.max_examples and count > bounds.max_examples:  # type: ignore[operator]
        return reject(Reason.BAD_EXAMPLE_COUNT,
                      f"{NUM_EXAMPLES} = {count} > maximum {bounds.max_examples}")
    return None


def split_valid(
    replies: Iterable[Message],
    global_arrays: Mapping[str, np.ndarray],
    bounds: ReplyBounds,
    *,
    run_id: int,
    server_round: int,
) -> tuple[list[Message], list[Rejection]]:
    """Partition replies into those that may be aggregated and the rejections."""
    valid: list[Message] = []
    rejected: list[Rejection] = []
    for reply in replies:
        rejection = check_reply(reply, global_arrays, bounds, run_id=run_id,
                                server_round=server_round)
        if rejection is None:
            valid.append(reply)
        else:
            rejected.append(rejection)
    return valid, rejected
