"""Frozen, validated SecAgg+ parameters.

Every violation is reported before any round starts, as one ``ValueError`` naming the
parameter, what was expected and what came. Checks run in a fixed order (types, then n, k,
t, bits, max_weight, ring capacity, clip ranges); the first violation found is raised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kernels import RING_BITS, check_ring_capacity
from kernels.quantize import MAX_BITS

RING_MAX = (1 << RING_BITS) - 1


def _require_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")


def _require_positive_finite(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")


@dataclass(frozen=True)
class SecAggParams:
    """Parameters of one SecAgg+ round, validated on construction.

    Attributes:
        n: number of clients sampled for the round (graph vertices).
        k: neighbours per client; the graph is k-regular. ``k = n - 1`` is plain SecAgg.
        t: Shamir threshold. Each client's secrets are shared among its k neighbours plus
            itself (k + 1 holders); any t of them reconstruct, t - 1 learn nothing.
            Must satisfy ``k / 2 < t <= k``.
        bits: quantisation bit width (1..24, the kernels' limit); each coordinate of a
            client's input is an integer in ``[0, 2**bits - 1]`` before weighting.
        clip_range: model-update coordinates are clipped to ``[-clip_range, clip_range]``.
        max_weight: largest example count a client may use as its weight.
        metric_clip_range: weighted metrics are clipped to ``[-metric_clip_range,
            metric_clip_range]`` and quantised with the same bit width.

    Guarantees:
        ``n * max_weight * (2**bits - 1) <= 2**32 - 1``: the sum over all clients of every
        slot of the encoded vector (weighted update, weight, weighted metrics) fits in
        Z_2^32 without wrapping, so the ring sum equals the integer sum.
    """

    n: int
    k: int
    t: int
    bits: int = 16
    clip_range: float = 1.0
    max_weight: int = 1
    metric_clip_range: float = 100.0

    def __post_init__(self) -> None:
        for name in ("n", "k", "t", "bits", "max_weight"):
            _require_int(name, getattr(self, name))
        if self.n < 2:
            raise ValueError(f"n must be >= 2 clients, got {self.n}")
        if not 1 <= self.k <= self.n - 1:
            raise ValueError(f"k must be in [1, n - 1] = [1, {self.n - 1}], got {self.k}")
        if (self.n * self.k) % 2:
            raise ValueError(
                f"n * k must be even for a k-regular graph to exist, got n={self.n}, k={self.k}"
            )
        if not 2 * self.t > self.k:
            raise ValueError(f"t must be > k / 2 = {self.k / 2}, got t={self.t}")
        if self.t > self.k:
            raise ValueError(f"t must be <= k = {self.k}, got t={self.t}")
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in [1, {MAX_BITS}] (kernels.quantize), got {self.bits}")
        if self.max_weight < 1:
            raise ValueError(f"max_weight must be >= 1, got {self.max_weight}")
        try:
            check_ring_capacity(self.n, self.bits, self.max_weight)
        except ValueError as exc:
            raise ValueError(
                f"bits={self.bits} and max_weight={self.max_weight} let the sum of n={self.n} "
                f"clients exceed 2**32 - 1; lower bits or max_weight "
                f"(max_weight <= {max_weight_limit(self.n, self.bits)} at bits={self.bits}): {exc}"
            ) from None
        _require_positive_finite("clip_range", self.clip_range)
        _require_positive_finite("metric_clip_range", self.metric_clip_range)

    @classmethod
    def plain(cls, n: int, t: int, **kwargs: object) -> SecAggParams:
        """Plain SecAgg: every client is every other client's neighbour (k = n - 1)."""
        return cls(n=n, k=n - 1, t=t, **kwargs)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, int | float]:
        """Plain dict for a config record."""
        return {
            "n": self.n,
            "k": self.k,
            "t": self.t,
            "bits": self.bits,
            "clip_range": float(self.clip_range),
            "max_weight": self.max_weight,
            "metric_clip_range": float(self.metric_clip_range),
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> SecAggParams:
        """Inverse of ``to_dict``; validates like the constructor."""
        fields = ("n", "k", "t", "bits", "clip_range", "max_weight", "metric_clip_range")
        missing = [f for f in fields if f not in d]
        if missing:
            raise ValueError(f"SecAgg params missing {missing}, got keys {sorted(d)}")
        return cls(**{f: d[f] for f in fields})  # type: ignore[arg-type]


def max_weight_limit(n: int, bits: int) -> int:
    """Largest ``max_weight`` for which n clients at ``bits`` cannot wrap Z_2^32."""
    return RING_MAX // (n * ((1 << bits) - 1))
