"""Robust aggregation without SecAgg: update norm bounding and median / trimmed mean.

Norm bounding scales every accepted update ``u = reply - global`` with
``||u|| > bound`` down to length ``bound`` (direction kept; ``||u|| = 0`` and updates
within the bound are untouched), so no single site can move the model further
than ``bound``. The coordinate-wise median and trimmed mean are Flower's
``FedMedian`` and ``FedTrimmedAvg``. Under SecAgg the server never sees an
individual update: bounding happens on the client before encoding and the server
refuses these strategies (see ``server/secagg.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from server.validation import update_norm
from shared.config import Aggregation, RunConfig
from shared.wire import ARRAYS, first_record, numpy_to_record, record_to_numpy, record_views


def bound_update(
    arrays: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray], bound: float
) -> tuple[dict[str, np.ndarray], float]:
    """``global + u * min(1, bound / ||u||)`` and ``||u||`` (float entries only).

    Requires finite arrays (validate first). Integer entries are passed through.
    """
    norm = update_norm(arrays, global_arrays)
    scale = 1.0 if norm <= bound or norm == 0 else bound / norm
    if scale == 1.0:
        return dict(arrays), norm
    out = {}
    for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating):
            base = global_arrays[key]
            out[key] = (base + (value - base) * scale).astype(value.dtype)
        else:
            out[key] = value
    return out, norm


def bound_replies(
    replies: list[Message], global_arrays: Mapping[str, np.ndarray], bound: float
) -> int:
    """Norm-bound every reply's model in place; return how many were scaled down."""
    if not bound > 0 or math.isinf(bound):
        return 0
    scaled = 0
    for reply in replies:
        arrays = record_to_numpy(reply.content.array_records[ARRAYS])
        bounded, norm = bound_update(arrays, global_arrays, bound)
        if norm > bound:
            scaled += 1
            reply.content[ARRAYS] = numpy_to_record(bounded)
    return scaled


def weighted_mean(contents: list[RecordDict], weight_key: str) -> ArrayRecord:
    """The replies' arrays averaged with weights ``metrics[weight_key] / total``.

    The same float operations in the same order as Flower's ``aggregate_arrayrecords``
    (``acc = a_1 * f_1``, then ``acc += a_i * f_i`` in each array's dtype), so the result
    is bit-identical to Flower's FedAvg; arrays are read as views of the replies' bytes
    (:func:`shared.wire.record_views`: numpy.load's header parse was most of the cost,
    and a copy is not needed).
    """
    weights = [float(first_record(c, MetricRecord)[weight_key]) for c in contents]  # type: ignore[arg-type,index]
    total = sum(weights)
    acc: dict[str, np.ndarray] = {}
    for content, weight in zip(contents, weights, strict=True):
        factor = weight / total
        for record in content.values():
            if not isinstance(record, ArrayRecord):
                continue
            for key, value in record_views(record).items():
                if key in acc:
                    acc[key] += value * factor
                else:
                    acc[key] = value * factor
    return numpy_to_record(acc)


class WeightedFedAvg(FedAvg):
    """Flower's FedAvg with :func:`weighted_mean` as its array aggregation."""

    #: A weighted mean, so secure aggregation (which reveals only that) may wrap it.
    secagg_compatible = True

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        return (weighted_mean(contents, self.weighted_by_key),
                self.train_metrics_aggr_fn(contents, self.weighted_by_key))  # fmt: skip


def aggregation_strategy(config: RunConfig, **kwargs: object) -> FedAvg:
    """FedAvg, or Flower's coordinate-wise median / trimmed mean, as ``[robust]`` says."""
    method = config.robust.aggregation
    if method is Aggregation.MEDIAN:
        return FedMedian(**kwargs)  # type: ignore[arg-type]
    if method is Aggregation.TRIMMED_MEAN:
        return FedTrimmedAvg(beta=config.robust.trim_fraction, **kwargs)  # type: ignore[arg-type]
    return WeightedFedAvg(**kwargs)  # type: ignore[arg-type]
