"""client.ledger: reservation before training, refusal, persistence, crash safety, tampering."""

import dataclasses
import inspect
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from client.ledger import (
    LEDGER_FILENAME,
    Budget,
    BudgetExhaustedError,
    LedgerCorruptError,
    LedgerError,
    PlannedRound,
    PrivacyLedger,
    open_site_ledger,
)
from shared.privacy import Accountant, epsilon

DELTA = 1e-5
REPO = Path(__file__).resolve().parents[2]


def node_config(site, eps=2.0, delta=DELTA, **extra):
    return {"site-dir": str(site), "privacy-epsilon": eps, "privacy-delta": delta, **extra}


def planned(round_=1, run="run-a", sigma=1.0, q=0.01, steps=100):
    return PlannedRound(run, round_, sigma, q, steps)


def test_reserve_commit_and_spent_epsilon(tmp_path):
    ledger = open_site_ledger(node_config(tmp_path))
    assert ledger.spent_epsilon() == 0.0
    first = ledger.reserve(planned(1))
    assert first.event.status == "reserved"
    assert ledger.spent_epsilon() == pytest.approx(epsilon([(1.0, 0.01, 100)], DELTA))
    done = ledger.commit(first, steps_taken=60)
    assert (done.status, done.reservation, done.steps) == ("committed", first.seq, 60)
    assert ledger.spent_epsilon() == pytest.approx(epsilon([(1.0, 0.01, 60)], DELTA))
    assert done.epsilon_after == pytest.approx(ledger.spent_epsilon())


def test_ledger_epsilon_equals_opacus_on_same_history(tmp_path):
    ledger = open_site_ledger(node_config(tmp_path, eps=50.0))
    opacus = RDPAccountant()
    for round_, (sigma, q, steps) in enumerate([(0.9, 0.02, 40), (1.3, 0.05, 80), (0.9, 0.02, 7)]):
        ledger.commit(ledger.reserve(planned(round_, sigma=sigma, q=q, steps=steps)), steps)
        for _ in range(steps):
            opacus.step(noise_multiplier=sigma, sample_rate=q)
    assert ledger.spent_epsilon() == pytest.approx(opacus.get_epsilon(DELTA), rel=1e-9)


def test_refusal_says_budget_exhausted_with_numbers_and_writes_nothing(tmp_path):
    ledger = open_site_ledger(node_config(tmp_path, eps=1.25))
    ledger.commit(ledger.reserve(planned(1)), 100)
    before = (tmp_path / LEDGER_FILENAME).read_bytes()
    with pytest.raises(BudgetExhaustedError) as info:
        ledger.reserve(planned(2))
    err = info.value
    message = str(err)
    assert "privacy budget exhausted" in message
    assert f"{err.spent:.4f}" in message and f"{err.projected:.4f}" in message
    assert "budget epsilon=1.25" in message and f"+{err.cost:.4f}" in message
    assert err.projected > 1.25 > err.spent
    assert (tmp_path / LEDGER_FILENAME).read_bytes() == before


def test_budget_accumulates_across_two_runs(tmp_path):
    first_run = open_site_ledger(node_config(tmp_path))
    for round_ in (1, 2):
        first_run.commit(first_run.reserve(planned(round_, run=7)), 100)
    second_run = open_site_ledger(node_config(tmp_path))  # a new process/run, same site
    second_run.commit(second_run.reserve(planned(1, run=8)), 100)
    assert second_run.spent_epsilon() == pytest.approx(epsilon([(1.0, 0.01, 300)], DELTA))
    assert [e.run for e in second_run.events()] == [7, 7, 7, 7, 8, 8]
    with pytest.raises(BudgetExhaustedError):
        for round_ in range(2, 100):
            second_run.reserve(planned(round_, run=8))
    assert second_run.spent_epsilon() <= 2.0


def test_budget_comes_only_from_node_config(tmp_path):
    params = list(inspect.signature(open_site_ledger).parameters)
    assert params == ["node_config"]
    assert "budget" not in inspect.signature(PrivacyLedger.reserve).parameters
    with pytest.raises(LedgerError, match="privacy-epsilon"):
        open_site_ledger({"site-dir": str(tmp_path), "privacy-delta": DELTA})
    # A server-side run config has no path to the ledger: its keys are simply not read.
    run_config = {"privacy.epsilon": 1e9, "privacy-epsilon": 1e9}
    ledger = open_site_ledger(node_config(tmp_path, eps=1.0) | {"unrelated": run_config})
    assert ledger.budget == Budget(1.0, DELTA)


@pytest.mark.parametrize(
    "cfg, word",
    [
        ({"privacy-epsilon": 0}, "epsilon must be > 0"),
        ({"privacy-epsilon": "inf"}, "epsilon must be finite"),
        ({"privacy-delta": 1.0}, "delta must be in"),
        ({"privacy-epsilon": True}, "number"),
        ({"privacy-accountant": "moments"}, "accountant must be one of rdp, prv"),
    ],
)
def test_bad_node_config_is_refused(tmp_path, cfg, word):
    with pytest.raises(LedgerError, match=word):
        open_site_ledger(node_config(tmp_path) | cfg)


def test_admin_may_change_epsilon_but_not_delta(tmp_path):
    ledger = open_site_ledger(node_config(tmp_path, eps=2.0))
    ledger.reserve(planned(1))
    lowered = open_site_ledger(node_config(tmp_path, eps=0.5))
    assert lowered.budget.epsilon == 0.5
    with pytest.raises(BudgetExhaustedError):
        lowered.reserve(planned(2))
    history = json.loads((tmp_path / LEDGER_FILENAME).read_text())["policy_history"]
    assert [p["epsilon"] for p in history] == [2.0, 0.5]
    with pytest.raises(LedgerError, match="delta cannot change"):
        open_site_ledger(node_config(tmp_path, delta=1e-6))


def test_prv_accountant_selectable(tmp_path):
    ledger = open_site_ledger(node_config(tmp_path, **{"privacy-accountant": "prv"}))
    reservation = ledger.reserve(planned(1))
    assert reservation.event.accountant == "prv"
    expected = epsilon([(1.0, 0.01, 100)], DELTA, Accountant.PRV)
    assert ledger.spent_epsilon() == pytest.approx(expected)


def test_commit_rules(tmp_path):
    ledger = open_site_ledger(node_config(tmp_path))
    reservation = ledger.reserve(planned(1))
    with pytest.raises(LedgerError, match=r"steps_taken must be in \[0, 100\]"):
        ledger.commit(reservation, 101)
    ledger.commit(reservation, 100)
    with pytest.raises(LedgerError, match="already committed"):
        ledger.commit(reservation, 100)
    other = PrivacyLedger.open(tmp_path / "elsewhere", Budget(2.0, DELTA))
    with pytest.raises(LedgerError, match="not in this ledger"):
        other.commit(reservation, 1)


def test_events_are_frozen(tmp_path):
    ledger = open_site_ledger(node_config(tmp_path))
    event = ledger.reserve(planned(1)).event
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.steps = 0


def test_noise_calibration_from_remaining_budget(tmp_path):
    ledger = open_site_ledger(node_config(tmp_path, eps=3.0))
    ledger.commit(ledger.reserve(planned(1)), 100)
    sigma = ledger.remaining_noise_multiplier(sample_rate=0.01, steps_per_round=100, rounds=5)
    for round_ in range(2, 7):
        ledger.reserve(planned(round_, sigma=sigma))
    assert 2.9 < ledger.spent_epsilon() <= 3.0


_CRASHER = textwrap.dedent(
    """
    import sys, time
    from client.ledger import PlannedRound, open_site_ledger
    ledger = open_site_ledger({"site-dir": sys.argv[1], "privacy-epsilon": 5.0,
                               "privacy-delta": 1e-5})
    ledger.reserve(PlannedRound("crash-run", 3, 1.0, 0.01, 100))
    print("reserved", flush=True)
    time.sleep(60)  # "training"; killed here, before commit
    """
)


def test_crash_after_reservation_counts_the_round(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "reserved"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    ledger = PrivacyLedger.read(tmp_path)
    [event] = ledger.events()
    assert (event.run, event.round, event.status) == ("crash-run", 3, "reserved")
    assert ledger.spent_epsilon() == pytest.approx(epsilon([(1.0, 0.01, 100)], DELTA))


def _reserve_many(site, worker, count):
    ledger = open_site_ledger(node_config(site, eps=1e3))
    for round_ in range(count):
        ledger.reserve(planned(round_, run=f"w{worker}"))


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    open_site_ledger(node_config(tmp_path, eps=1e3))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_reserve_many, args=(tmp_path, w, 15)) for w in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    events = PrivacyLedger.read(tmp_path).events()
    assert [e.seq for e in events] == list(range(30))
    assert sorted(e.run for e in events) == ["w0"] * 15 + ["w1"] * 15


# -- damaged files: refused loudly, never read as "nothing spent" -------------------


@pytest.fixture
def spent_site(tmp_path):
    ledger = open_site_ledger(node_config(tmp_path))
    ledger.commit(ledger.reserve(planned(1)), 100)
    ledger.reserve(planned(2))
    return tmp_path


def _refused(site, match):
    path = str(site / LEDGER_FILENAME)
    for opener in (lambda: open_site_ledger(node_config(site)), lambda: PrivacyLedger.read(site)):
        with pytest.raises(LedgerCorruptError, match=match) as info:
            opener()
        assert path in str(info.value)


@pytest.mark.parametrize("cut", ["empty", "one byte", "half", "last two bytes"])
def test_truncated_file_is_refused(spent_site, cut):
    path = spent_site / LEDGER_FILENAME
    data = path.read_bytes()
    ends = {"empty": 0, "one byte": 1, "half": len(data) // 2, "last two bytes": -2}
    path.write_bytes(data[: ends[cut]])
    _refused(spent_site, "invalid")


def test_hand_edited_file_is_refused(spent_site):
    path = spent_site / LEDGER_FILENAME
    path.write_text(path.read_text().replace('"steps": 100', '"steps": 1'))
    _refused(spent_site, "checksum mismatch")


def test_deleted_event_is_refused_even_with_fixed_checksum(spent_site):
    from shared.privacy.ledger_format import _digest

    path = spent_site / LEDGER_FILENAME
    doc = json.loads(path.read_text())
    del doc["events"][0]  # drop the reservation the commit points at
    doc["sha256"] = _digest({k: v for k, v in doc.items() if k != "sha256"})
    path.write_text(json.dumps(doc))
    _refused(spent_site, "seq")


def test_unknown_version_is_refused(spent_site):
    path = spent_site / LEDGER_FILENAME
    doc = json.loads(path.read_text())
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    _refused(spent_site, "unknown format version 99")


def test_not_a_ledger_is_refused(spent_site):
    (spent_site / LEDGER_FILENAME).write_text('{"events": []}')
    _refused(spent_site, "not a privfed-site-privacy-ledger file")


def test_stray_temp_file_is_ignored(spent_site):
    spent = PrivacyLedger.read(spent_site).spent_epsilon()
    (spent_site / f".{LEDGER_FILENAME}.abc123.tmp").write_text('{"half-written": ')
    ledger = open_site_ledger(node_config(spent_site))
    assert ledger.spent_epsilon() == spent
    ledger.reserve(planned(3))
    assert len(PrivacyLedger.read(spent_site).events()) == 4


def test_read_of_missing_ledger_is_an_error(tmp_path):
    with pytest.raises(LedgerError, match="no privacy ledger at"):
        PrivacyLedger.read(tmp_path)
