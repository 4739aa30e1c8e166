"""The site ledger's file format: pure text <-> :class:`LedgerState` (no I/O).

One JSON object, written with sorted keys::

    {"accountant": "rdp", "budget": {"delta": 1e-05, "epsilon": 8.0},
     "events": [<LedgerEvent.to_dict()>, ...], "format": "privfed-site-privacy-ledger",
     "policy_history": [{"accountant": "rdp", "delta": 1e-05, "epsilon": 8.0,
                         "timestamp": "..."}],
     "sha256": "<hex>", "version": 1}

``sha256`` is the SHA-256 of the canonical JSON (sorted keys, no whitespace, no NaN)
of every other field, so a truncated or hand-edited file is detected. A new layout
gets a new ``version``; an unknown one is refused, never guessed at.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from shared.privacy.accounting import Accountant
from shared.privacy.events import Budget, LedgerEvent, check_history

#: Value of the file's ``format`` field.
FILE_FORMAT = "privfed-site-privacy-ledger"
#: Version of the file layout this module reads and writes.
FILE_VERSION = 1


@dataclass(frozen=True)
class PolicyRecord:
    """A budget/accountant the site adopted, and when (audit trail of admin changes)."""

    budget: Budget
    accountant: Accountant
    timestamp: str


@dataclass(frozen=True)
class LedgerState:
    """Everything in the ledger file: the policy in force, its history, the events."""

    budget: Budget
    accountant: Accountant
    policy_history: tuple[PolicyRecord, ...]
    events: tuple[LedgerEvent, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "accountant", Accountant.parse(self.accountant))


def _body(state: LedgerState) -> dict:
    policies = [
        {**asdict(p.budget), "accountant": p.accountant.value, "timestamp": p.timestamp}
        for p in state.policy_history
    ]
    return {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "budget": asdict(state.budget),
        "accountant": state.accountant.value,
        "policy_history": policies,
        "events": [e.to_dict() for e in state.events],
    }


def _digest(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def dump_ledger(state: LedgerState) -> str:
    """The file text for ``state``: readable JSON plus the SHA-256 of its canonical form."""
    body = _body(state)
    return json.dumps({**body, "sha256": _digest(body)}, indent=1, sort_keys=True) + "\n"


def parse_ledger(text: str) -> LedgerState:
    """Parse and fully check the text of a ledger file.

    Checks, in order: JSON, ``format``, ``version`` (unknown versions are refused),
    SHA-256 of the canonical content (any edit or damage fails), every field of
    every record, and the cross-event rules of :func:`check_history`.

    Raises:
        ValueError: saying what is wrong. Never returns an empty state for bad input.
    """
    try:
        return _parse(json.loads(text))
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON: {err}") from None
    except (TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"malformed content: {err!r}") from None


def _parse(doc: object) -> LedgerState:
    if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
        raise ValueError(f"not a {FILE_FORMAT} file")
    if doc.get("version") != FILE_VERSION:
        raise ValueError(
            f"unknown format version {doc.get('version')!r} "
            f"(this privfed reads version {FILE_VERSION})"
        )
    expected = {"format", "version", "budget", "accountant", "policy_history", "events", "sha256"}
    if doc.keys() != expected:
        raise ValueError(f"fields must be {sorted(expected)}, got {sorted(doc)}")
    body = {k: v for k, v in doc.items() if k != "sha256"}
    if doc.get("sha256") != _digest(body):
        raise ValueError("checksum mismatch: the file was edited or damaged")
    budget = Budget(**body["budget"])
    policies = tuple(
        PolicyRecord(
            Budget(p["epsilon"], p["delta"]), Accountant.parse(p["accountant"]), str(p["timestamp"])
        )
        for p in body["policy_history"]
    )
    events = tuple(LedgerEvent.from_dict(e) for e in body["events"])
    check_history(events, budget.delta)
    return LedgerState(budget, Accountant.parse(body["accountant"]), policies, events)
