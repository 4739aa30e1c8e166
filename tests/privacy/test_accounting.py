"""shared.privacy.accounting against independent accountants (Opacus, Google dp_accounting)."""

import doctest
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from shared.privacy import accounting
from shared.privacy.accounting import (
    Accountant,
    InfeasibleBudgetError,
    calibrate_noise_multiplier,
    epsilon,
)

DELTA = 1e-5
# (noise_multiplier, sample_rate, steps) histories: homogeneous and heterogeneous rounds.
HISTORIES = {
    "one_round": [(1.0, 0.01, 100)],
    "full_batch": [(2.0, 1.0, 10)],
    "hetero": [(0.8, 0.02, 50), (1.5, 0.05, 200), (1.1, 0.004, 1000)],
    "long": [(1.1, 0.01, 5000)],
    "small_eps": [(4.0, 0.001, 100)],
}


def _opacus(cls, history, delta=DELTA):
    acc = cls()
    acc.history = list(history)
    return acc.get_epsilon(delta)


def _dp_accounting_rdp(history, delta=DELTA):
    dpa = pytest.importorskip("dp_accounting")
    acc = dpa.rdp.RdpAccountant()
    for sigma, q, steps in history:
        sgm = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))
        acc.compose(dpa.SelfComposedDpEvent(sgm, steps))
    return acc.get_epsilon(delta)


def test_doctests():
    assert doctest.testmod(accounting).failed == 0


def test_orders_extend_opacus_defaults():
    opacus_orders = tuple(RDPAccountant.DEFAULT_ALPHAS)
    assert accounting.RDP_ORDERS[: len(opacus_orders)] == opacus_orders


@pytest.mark.parametrize("name", HISTORIES)
def test_rdp_equals_opacus_rdp_accountant_on_same_orders(name):
    acc = RDPAccountant()
    acc.history = list(HISTORIES[name])
    theirs = acc.get_epsilon(DELTA, alphas=list(accounting.RDP_ORDERS))
    assert epsilon(HISTORIES[name], DELTA) == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize("name", HISTORIES)
def test_rdp_equals_opacus_defaults_unless_tighter(name):
    ours, theirs = epsilon(HISTORIES[name], DELTA), _opacus(RDPAccountant, HISTORIES[name])
    if name == "small_eps":  # Opacus' best order is its largest (63): ours is tighter
        assert ours < theirs
    else:
        assert ours == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize("name", HISTORIES)
def test_rdp_within_1pct_of_dp_accounting(name):
    ours = epsilon(HISTORIES[name], DELTA)
    assert ours == pytest.approx(_dp_accounting_rdp(HISTORIES[name]), rel=0.01)


@pytest.mark.parametrize("name", ["one_round", "hetero", "full_batch"])
def test_prv_equals_opacus_prv_accountant(name):
    ours = epsilon(HISTORIES[name], DELTA, Accountant.PRV)
    assert ours == pytest.approx(_opacus(PRVAccountant, HISTORIES[name]), rel=1e-9)


def test_prv_close_to_dp_accounting_pld_and_below_rdp():
    dpa = pytest.importorskip("dp_accounting")
    history = HISTORIES["hetero"]
    pld = dpa.pld.PLDAccountant()
    for sigma, q, steps in history:
        sgm = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))
        pld.compose(dpa.SelfComposedDpEvent(sgm, steps))
    prv = epsilon(history, DELTA, Accountant.PRV)
    # PRV is an upper bound with absolute error <= PRV_EPS_ERROR per side.
    assert abs(prv - pld.get_epsilon(DELTA)) <= 3 * accounting.PRV_EPS_ERROR
    assert prv < epsilon(history, DELTA, Accountant.RDP)


def test_rounds_compose_like_one_history():
    rounds = [(1.0, 0.01, 100)] * 5
    assert epsilon(rounds, DELTA) == pytest.approx(epsilon([(1.0, 0.01, 500)], DELTA), rel=1e-12)


def test_order_of_events_does_not_matter():
    history = HISTORIES["hetero"]
    assert epsilon(history[::-1], DELTA) == pytest.approx(epsilon(history, DELTA), rel=1e-12)


@pytest.mark.parametrize("acc", list(Accountant))
def test_epsilon_grows_with_each_event(acc):
    history, previous = [], 0.0
    for event in HISTORIES["hetero"]:
        history.append(event)
        current = epsilon(history, DELTA, acc)
        assert current > previous
        previous = current


@pytest.mark.parametrize("acc", list(Accountant))
def test_edge_cases(acc):
    assert epsilon([], DELTA, acc) == 0.0
    assert epsilon([(1.0, 0.01, 0), (1.0, 0.0, 10)], DELTA, acc) == 0.0
    assert epsilon([(0.0, 0.01, 1)], DELTA, acc) == math.inf


@pytest.mark.parametrize(
    "event, word",
    [
        ((-1.0, 0.1, 1), "noise_multiplier"),
        ((math.nan, 0.1, 1), "noise_multiplier"),
        ((math.inf, 0.1, 1), "noise_multiplier"),
        ((1.0, 1.5, 1), "sample_rate"),
        ((1.0, 0.1, 1.5), "steps"),
        ((1.0, 0.1, -1), "steps"),
        ((1.0, 0.1, True), "steps"),
        ((1.0, 0.1), "event"),
    ],
)
def test_bad_events_are_refused(event, word):
    with pytest.raises(ValueError, match=word):
        epsilon([event], DELTA)


@pytest.mark.parametrize("delta", [0, 1, -1e-5, math.nan])
def test_bad_delta_is_refused(delta):
    with pytest.raises(ValueError, match="delta must be in"):
        epsilon([(1.0, 0.01, 1)], delta)


def test_unknown_accountant_lists_the_options():
    with pytest.raises(ValueError, match="rdp, prv.*'gdp'"):
        epsilon([(1.0, 0.01, 1)], DELTA, "gdp")
    assert Accountant.parse("PRV") is Accountant.PRV


def test_calibration_is_feasible_and_nearly_minimal():
    prior = [(1.0, 0.02, 100)]
    sigma = calibrate_noise_multiplier(4.0, DELTA, 0.01, 50, 10, prior_events=prior)
    plan = [(sigma, 0.01, 50)] * 10
    assert epsilon(prior + plan, DELTA) <= 4.0
    smaller = [(sigma * (1 - 2e-3), 0.01, 50)] * 10
    assert epsilon(prior + smaller, DELTA) > 4.0


def test_calibration_matches_opacus_without_prior():
    ours = calibrate_noise_multiplier(3.0, DELTA, 0.01, 100, 10)
    theirs = get_noise_multiplier(
        target_epsilon=3.0, target_delta=DELTA, sample_rate=0.01, steps=1000, accountant="rdp"
    )
    assert ours == pytest.approx(theirs, rel=5e-3)


def test_calibration_with_prv():
    sigma = calibrate_noise_multiplier(3.0, DELTA, 0.01, 100, 10, accountant=Accountant.PRV)
    assert epsilon([(sigma, 0.01, 1000)], DELTA, Accountant.PRV) <= 3.0
    assert sigma < calibrate_noise_multiplier(3.0, DELTA, 0.01, 100, 10)  # PRV is tighter


def test_calibration_impossible_when_prior_spends_the_target():
    prior = [(0.5, 0.1, 1000)]
    with pytest.raises(InfeasibleBudgetError, match="already spent .* >= target 1"):
        calibrate_noise_multiplier(1.0, DELTA, 0.01, 10, 1, prior_events=prior)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"target_epsilon": 0}, "target_epsilon"),
        ({"rounds": 0}, "rounds"),
        ({"steps": -1}, "steps"),
    ],
)
def test_calibration_validates_arguments(kwargs, word):
    args = {"target_epsilon": 1.0, "rounds": 1, "steps": 10} | kwargs
    with pytest.raises(ValueError, match=word):
        calibrate_noise_multiplier(
            args["target_epsilon"], DELTA, 0.01, args["steps"], args["rounds"]
        )
