"""Privacy events as immutable, versioned records, and the rule for which ones count.

Pure data and pure functions (no I/O). The site ledger (``client/ledger.py``)
persists these records; a server-side accountant can reuse the same types.

A round leaves up to two events: a ``reserved`` one written *before* training (the
planned steps) and, if the round finished, a ``committed`` one pointing at it with
the steps actually taken. :func:`effective_history` counts, per reservation, the
commit if there is one and the reservation itself otherwise -- so a round whose
trainer crashed counts in full.

Like ``dp_accounting``, unknown mechanisms, statuses or versions are refused rather
than guessed at.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from enum import StrEnum

from shared.privacy.accounting import Accountant, SgmEvent, validate_delta, validate_event

#: Version of the :class:`LedgerEvent` record layout.
EVENT_FORMAT_VERSION = 1
#: The only mechanism privfed records: DP-SGD, Gaussian noise, Poisson sampling.
MECHANISM = "dpsgd-gaussian-poisson"


class EventStatus(StrEnum):
    """Whether an event is a pre-training reservation or the record of what ran."""

    RESERVED = "reserved"
    COMMITTED = "committed"


@dataclass(frozen=True)
class Budget:
    """A site's privacy budget: no run, ever, may take the site past ``(epsilon, delta)``.

    Raises:
        ValueError: unless ``epsilon`` is finite and > 0 and ``delta`` is in (0, 1).
    """

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        eps = self.epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"budget epsilon must be > 0, got {eps!r}")
        if not math.isfinite(eps):
            raise ValueError(f"budget epsilon must be finite, got {eps!r}")
        validate_delta(self.delta)
        object.__setattr__(self, "epsilon", float(eps))
        object.__setattr__(self, "delta", float(self.delta))


def check_run_round(run: object, round_: object) -> None:
    """Raise ValueError unless ``run`` is a str or int and ``round_`` an int >= 0."""
    if isinstance(run, bool) or not isinstance(run, (str, int)):
        raise ValueError(f"run must be a str or int, got {run!r}")
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
        raise ValueError(f"round must be an integer >= 0, got {round_!r}")


@dataclass(frozen=True)
class LedgerEvent:
    """One immutable record of DP-SGD steps at a site.

    ``epsilon_after`` is the site's cumulative epsilon (at ``delta``, by
    ``accountant``) once this event counts; ``reservation`` is, for a committed
    event, the ``seq`` of the reservation it settles (``None`` for reservations).
    """

    seq: int
    run: str | int
    round: int
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    delta: float
    status: EventStatus
    epsilon_after: float
    timestamp: str
    reservation: int | None = None
    version: int = EVENT_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.version != EVENT_FORMAT_VERSION:
            raise ValueError(f"unknown event version {self.version!r}")
        if self.mechanism != MECHANISM:
            raise ValueError(f"unknown mechanism {self.mechanism!r} (expected {MECHANISM!r})")
        check_run_round(self.run, self.round)
        validate_event((self.noise_multiplier, self.sample_rate, self.steps))
        Accountant.parse(self.accountant)
        validate_delta(self.delta)
        object.__setattr__(self, "status", EventStatus(self.status))
        eps = self.epsilon_after
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
            raise ValueError(f"epsilon_after must be finite and >= 0, got {eps!r}")
        for name in ("noise_multiplier", "sample_rate", "delta", "epsilon_after"):
            object.__setattr__(self, name, float(getattr(self, name)))
        is_commit = self.status is EventStatus.COMMITTED
        if is_commit != isinstance(self.reservation, int):
            raise ValueError(f"event {self.seq}: only a committed event names a reservation")

    def as_sgm(self) -> SgmEvent:
        """The ``(noise_multiplier, sample_rate, steps)`` triple the accountant composes."""
        return SgmEvent(self.noise_multiplier, self.sample_rate, self.steps)

    def to_dict(self) -> dict:
        """JSON-ready dict (status as its string value)."""
        return {**asdict(self), "status": self.status.value}

    @classmethod
    def from_dict(cls, data: Mapping) -> LedgerEvent:
        """Parse a dict written by :meth:`to_dict`.

        Raises:
            ValueError: on missing or unknown fields or invalid values.
        """
        names = {f.name for f in fields(cls)}
        required = names - {"reservation", "version"}
        if not isinstance(data, Mapping) or not required <= data.keys() <= names:
            keys = sorted(data) if isinstance(data, Mapping) else data
            raise ValueError(f"event fields must be {sorted(names)}, got {keys!r}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"malformed event {dict(data)!r}: {err}") from None


def check_history(events: Sequence[LedgerEvent], delta: float) -> None:
    """Check the cross-event rules of an append-only history.

    Rules: ``seq`` equals the position; every event uses ``delta``; a commit settles
    an earlier reservation of the same run and round, at most once, with at most the
    reserved steps and the same noise and sample rate.

    Raises:
        ValueError: naming the first offending event.
    """
    settled: set[int] = set()
    for index, event in enumerate(events):
        if event.seq != index:
            raise ValueError(f"event at position {index} has seq {event.seq}")
        if event.delta != delta:
            raise ValueError(f"event {index} uses delta {event.delta:g}, budget delta {delta:g}")
        if event.status is EventStatus.COMMITTED:
            _check_commit(events, event, settled)
            settled.add(event.reservation)


def _check_commit(events: Sequence[LedgerEvent], event: LedgerEvent, settled: set[int]) -> None:
    ref = event.reservation
    if not 0 <= ref < event.seq or events[ref].status is not EventStatus.RESERVED:
        raise ValueError(f"event {event.seq} commits {ref}, which is not an earlier reservation")
    if ref in settled:
        raise ValueError(f"event {event.seq} commits reservation {ref} a second time")
    check_commit(events[ref], event.steps)
    same = ("run", "round", "noise_multiplier", "sample_rate")
    if any(getattr(event, f) != getattr(events[ref], f) for f in same):
        raise ValueError(f"event {event.seq} does not match its reservation {ref}")


def check_commit(reserved: LedgerEvent, steps_taken: int) -> None:
    """Raise ValueError unless ``steps_taken`` is an int in [0, reserved.steps]."""
    if isinstance(steps_taken, bool) or not isinstance(steps_taken, int):
        raise ValueError(f"steps_taken must be an integer, got {steps_taken!r}")
    if not 0 <= steps_taken <= reserved.steps:
        raise ValueError(
            f"steps_taken must be in [0, {reserved.steps}] (reserved in event "
            f"{reserved.seq}), got {steps_taken}"
        )


def effective_history(events: Sequence[LedgerEvent]) -> list[LedgerEvent]:
    """The events that count: each reservation, replaced by its commit if it has one.

    Guarantee: an uncommitted reservation counts with all its reserved steps.
    """
    commits = {e.reservation: e for e in events if e.status is EventStatus.COMMITTED}
    return [commits.get(e.seq, e) for e in events if e.status is EventStatus.RESERVED]
