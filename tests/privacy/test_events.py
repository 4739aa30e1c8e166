"""shared.privacy.events and ledger_format: records refuse what they do not understand."""

import pytest

from shared.privacy.events import Budget, EventStatus, LedgerEvent, effective_history
from shared.privacy.ledger_format import LedgerState, dump_ledger, parse_ledger

BASE = {
    "seq": 0, "run": "r", "round": 1, "mechanism": "dpsgd-gaussian-poisson",
    "noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "accountant": "rdp",
    "delta": 1e-5, "status": "reserved", "epsilon_after": 0.5, "timestamp": "t",
}  # fmt: skip


@pytest.mark.parametrize(
    "change, word",
    [
        ({"mechanism": "laplace"}, "unknown mechanism"),
        ({"version": 2}, "unknown event version"),
        ({"status": "pending"}, "pending"),
        ({"status": "committed"}, "only a committed event names a reservation"),
        ({"reservation": 0}, "only a committed event names a reservation"),
        ({"accountant": "moments"}, "accountant must be one of"),
        ({"epsilon_after": float("nan")}, "epsilon_after"),
        ({"round": -1}, "round"),
        ({"run": 1.5}, "run"),
        ({"extra": 1}, "event fields"),
    ],
)
def test_event_refuses_unknown_or_invalid(change, word):
    with pytest.raises(ValueError, match=word):
        LedgerEvent.from_dict(BASE | change)


def test_event_round_trip_and_effective_history():
    reserved = LedgerEvent.from_dict(BASE)
    committed = LedgerEvent.from_dict(BASE | {"seq": 1, "status": "committed", "reservation": 0,
                                              "steps": 4})  # fmt: skip
    assert LedgerEvent.from_dict(committed.to_dict()) == committed
    assert effective_history([reserved]) == [reserved]  # uncommitted counts in full
    assert effective_history([reserved, committed]) == [committed]
    assert committed.status is EventStatus.COMMITTED


@pytest.mark.parametrize(
    "eps, delta", [(0, 1e-5), (-1, 1e-5), (float("inf"), 1e-5), (1, 0), (1, 1)]
)
def test_budget_validation(eps, delta):
    with pytest.raises(ValueError, match="must be"):
        Budget(eps, delta)


def test_file_text_round_trip_and_commit_exceeding_reservation_refused():
    reserved = LedgerEvent.from_dict(BASE)
    state = LedgerState(Budget(1.0, 1e-5), reserved.accountant, (), (reserved,))
    assert parse_ledger(dump_ledger(state)).events == (reserved,)
    too_many = LedgerEvent.from_dict(BASE | {"seq": 1, "status": "committed", "reservation": 0,
                                             "steps": 11})  # fmt: skip
    bad = LedgerState(state.budget, "rdp", (), (reserved, too_many))
    with pytest.raises(ValueError, match="steps_taken must be in"):
        parse_ledger(dump_ledger(bad))
