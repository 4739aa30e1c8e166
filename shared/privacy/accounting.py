"""Pure privacy accounting for DP-SGD (Poisson-subsampled Gaussian mechanism).

Everything here takes numbers and returns numbers: no files, no clocks, no global
state (STYLE practice 1). The site ledger (``client/ledger.py``) stores events and
delegates every epsilon computation to this module.

An *event* is ``(noise_multiplier, sample_rate, steps)``: ``steps`` applications of
the Gaussian mechanism with noise standard deviation ``noise_multiplier`` times the
clipping norm, each on a Poisson sample of the site's records with rate
``sample_rate`` (add/remove-one neighbouring relation, as in Opacus). Any sequence of
events, homogeneous or not, composes:

* :attr:`Accountant.RDP` (default) adds the RDP curves of all events order by order
  over :data:`RDP_ORDERS` and converts once to (epsilon, delta) with Balle et al.
  2020, Thm. 21, using Opacus' own functions. ``RDP_ORDERS`` is Opacus'
  ``RDPAccountant.DEFAULT_ALPHAS`` plus Google ``dp_accounting``'s large orders
  (128 ... 1024); epsilon is a minimum over orders, so the result equals Opacus'
  ``RDPAccountant`` on the same history whenever its best order is < 63 (the usual
  case) and is tighter, matching ``dp_accounting``, when epsilon is very small.
* :attr:`Accountant.PRV` is the numerical composition of privacy loss random
  variables of Gopi et al. 2021 as implemented in ``opacus.accountants.analysis.prv``:
  each event's PRV is discretised on one common domain, self-composed by FFT, and the
  events are convolved together. The value returned is the *upper* bound of the
  estimate (``eps_upper``), with absolute epsilon error at most
  :data:`PRV_EPS_ERROR` and delta error ``delta / 1000`` (Opacus' defaults), i.e.
  exactly what ``opacus.accountants.PRVAccountant.get_epsilon`` returns for the
  same history. It is usually tighter than RDP.

>>> round(epsilon([(1.0, 0.01, 100)], delta=1e-5), 4)
1.2141
>>> epsilon([], delta=1e-5)
0.0
>>> epsilon([(0.0, 0.01, 1)], delta=1e-5)   # no noise: no privacy
inf
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import NamedTuple

import numpy as np
from opacus.accountants.analysis import prv as prv_analysis
from opacus.accountants.analysis import rdp as rdp_analysis

#: RDP orders: ``opacus.accountants.RDPAccountant.DEFAULT_ALPHAS`` + (128, 256, 512, 1024).
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024]
)
#: Absolute error allowed on epsilon by the PRV accountant (Opacus' default).
PRV_EPS_ERROR = 0.01
#: Largest noise multiplier :func:`calibrate_noise_multiplier` will try.
MAX_NOISE_MULTIPLIER = 1e4


class Accountant(StrEnum):
    """How a history of events is turned into one epsilon (see the module docstring)."""

    RDP = "rdp"
    PRV = "prv"

    @classmethod
    def parse(cls, value: str | Accountant) -> Accountant:
        """Return the member named by ``value`` (case-insensitive).

        Raises:
            ValueError: naming the value and the accepted ones.
        """
        try:
            return cls(str(getattr(value, "value", value)).strip().lower())
        except ValueError:
            options = ", ".join(m.value for m in cls)
            raise ValueError(f"accountant must be one of {options}, got {value!r}") from None


class SgmEvent(NamedTuple):
    """``steps`` steps of the Poisson-subsampled Gaussian mechanism."""

    noise_multiplier: float
    sample_rate: float
    steps: int


class InfeasibleBudgetError(ValueError):
    """No noise multiplier keeps the planned training within the target epsilon."""


def validate_event(event: Sequence[float]) -> SgmEvent:
    """Check one event and return it as an :class:`SgmEvent`.

    Guarantees on the result: ``noise_multiplier`` is finite and >= 0,
    ``sample_rate`` is in [0, 1], ``steps`` is an ``int`` >= 0.

    Raises:
        ValueError: with the expected range and the value that came.
    """
    if len(event) != 3:
        raise ValueError(f"event must be (noise_multiplier, sample_rate, steps), got {event!r}")
    sigma, q, steps = event
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0:
        raise ValueError(f"noise_multiplier must be a number >= 0, got {sigma!r}")
    if not math.isfinite(sigma):
        raise ValueError(f"noise_multiplier must be finite, got {sigma!r}")
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 1:
        raise ValueError(f"sample_rate must be a number in [0, 1], got {q!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return SgmEvent(float(sigma), float(q), int(steps))


def validate_delta(delta: float) -> float:
    """Return ``delta`` as a float if it is in the open interval (0, 1).

    Raises:
        ValueError: otherwise.
    """
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _effective(events: Iterable[Sequence[float]]) -> list[SgmEvent]:
    """Validated events that spend privacy, merged by (noise_multiplier, sample_rate).

    Events with 0 steps or sample rate 0 are dropped. Composition is commutative, so
    events with the same mechanism parameters are merged into one event with the
    summed steps (in order of first appearance), exactly as Opacus' accountants merge
    consecutive identical steps. This keeps the cost linear in *distinct* settings.
    """
    steps: dict[tuple[float, float], int] = {}
    for event in map(validate_event, events):
        if event.steps > 0 and event.sample_rate > 0:
            key = (event.noise_multiplier, event.sample_rate)
            steps[key] = steps.get(key, 0) + event.steps
    return [SgmEvent(sigma, q, n) for (sigma, q), n in steps.items()]


def rdp_curve(events: Iterable[Sequence[float]], orders: Sequence[float] = RDP_ORDERS):
    """RDP of the composition of ``events`` at each order, as a numpy array.

    Composition is exact for RDP: the curves add. Entries may be ``inf``
    (e.g. an event with noise multiplier 0). No events gives all zeros.
    """
    total = np.zeros(len(orders))
    for sigma, q, steps in _effective(events):
        total = total + steps * np.asarray(_unit_rdp(q, sigma, tuple(orders)))
    return total


@functools.lru_cache(maxsize=8192)
def _unit_rdp(q: float, sigma: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    """RDP of one step (RDP composes linearly in steps, so ``n`` steps is ``n`` times this).

    Cached: Opacus' series for fractional orders costs about a second at large ``q``,
    and calibration evaluates the same (q, sigma) pairs round after round.
    """
    curve = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders))
    return tuple(float(v) for v in np.asarray(curve, dtype=float))


def rdp_epsilon(events: Iterable[Sequence[float]], delta: float) -> float:
    """Epsilon of the composed ``events`` at ``delta`` by RDP; 0.0 for no events."""
    delta = validate_delta(delta)
    effective = _effective(events)
    if not effective:
        return 0.0
    curve = rdp_curve(effective)
    if not np.isfinite(curve).any():
        return math.inf
    with warnings.catch_warnings():
        # Opacus warns when the best order is at the edge of the grid; the result
        # is still a valid (if looser) upper bound, so the warning is not news.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=curve, delta=delta)
    return float(eps)


def prv_epsilon(
    events: Iterable[Sequence[float]], delta: float, eps_error: float = PRV_EPS_ERROR
) -> float:
    """Upper bound on epsilon of the composed ``events`` at ``delta`` by PRV composition.

    Identical to ``opacus.accountants.PRVAccountant`` with ``history = events``.
    Returns 0.0 for no events and ``inf`` if any event has noise multiplier 0.
    """
    delta = validate_delta(delta)
    effective = _effective(events)
    if not effective:
        return 0.0
    if any(e.noise_multiplier == 0 for e in effective):
        return math.inf
    delta_error = delta / 1000
    with np.errstate(divide="ignore"):  # sample_rate == 1 takes log(0) = -inf, harmlessly
        dprv = _compose_prv(effective, eps_error, delta_error)
        _, _, eps_upper = dprv.compute_epsilon(delta, delta_error, eps_error)
    return float(eps_upper)


def _compose_prv(events: list[SgmEvent], eps_error: float, delta_error: float):
    """The discretised PRV of ``events`` (mirrors ``PRVAccountant._get_dprv``)."""
    prvs = [prv_analysis.PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in events]
    counts = [steps for _, _, steps in events]
    half_width = prv_analysis.compute_safe_domain_size(
        prvs=prvs, max_self_compositions=counts, eps_error=eps_error, delta_error=delta_error
    )
    mesh = eps_error / np.sqrt(sum(counts) * np.log(12 / delta_error) / 2)
    domain = prv_analysis.Domain.create_aligned(-half_width, half_width, mesh)
    dprvs = [
        prv_analysis.discretize(
            prv_analysis.TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max), domain
        )
        for p in prvs
    ]
    return prv_analysis.compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)


def epsilon(
    events: Iterable[Sequence[float]], delta: float, accountant: Accountant = Accountant.RDP
) -> float:
    """Epsilon at ``delta`` of all ``events`` composed, by ``accountant``.

    Guarantees: 0.0 for an empty history or one whose events all have 0 steps or
    sample rate 0; ``inf`` if any spending event has noise multiplier 0; otherwise a
    finite upper bound, non-decreasing as events are appended.

    Raises:
        ValueError: on a malformed event, a delta outside (0, 1), or an unknown accountant.
    """
    accountant = Accountant.parse(accountant)
    if accountant is Accountant.PRV:
        return prv_epsilon(events, delta)
    return rdp_epsilon(events, delta)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    prior_events: Iterable[Sequence[float]] = (),
    accountant: Accountant = Accountant.RDP,
    rtol: float = 1e-3,
) -> float:
    """Smallest noise multiplier keeping ``prior_events`` + the planned rounds within budget.

    The plan is ``rounds`` rounds of ``steps_per_round`` steps at ``sample_rate``, all
    with the returned noise multiplier ``sigma``. Found by bisection on sigma
    (epsilon decreases as sigma grows).

    Guarantees: ``epsilon(prior + plan(sigma), delta, accountant) <= target_epsilon``
    holds for the returned ``sigma`` (it was evaluated), and ``sigma * (1 - rtol)``
    is not known to satisfy it: the result is at most ``rtol`` (relative) above the
    smallest feasible value.

    Raises:
        InfeasibleBudgetError: if the prior events alone reach ``target_epsilon``, or
            even ``MAX_NOISE_MULTIPLIER`` does not fit; the message has the numbers.
        ValueError: on malformed arguments.
    """
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    validate_event((1.0, sample_rate, steps_per_round))
    prior = [validate_event(e) for e in prior_events]

    def eps_at(sigma: float) -> float:
        plan = [SgmEvent(sigma, float(sample_rate), int(steps_per_round))] * rounds
        return epsilon(prior + plan, delta, accountant)

    spent = epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise InfeasibleBudgetError(
            f"cannot calibrate noise: epsilon already spent {spent:.4g} >= target "
            f"{target_epsilon:.4g} (delta={delta:g}, {Accountant.parse(accountant).value})"
        )
    return _bisect_sigma(eps_at, target_epsilon, rtol, spent)


def _bisect_sigma(eps_at, target: float, rtol: float, spent: float) -> float:
    """The smallest sigma on the grid ``(1 + rtol) ** i`` (i >= -inf..) with
    ``eps_at(sigma) <= target``.

    Searching a fixed geometric grid (rather than midpoints of a moving bracket)
    makes repeated calibrations, e.g. one per round, evaluate the same sigmas, which
    :func:`_unit_rdp` has cached. Adjacent grid points differ by ``rtol`` (relative).
    """
    ratio = math.log1p(rtol)

    def sigma(i: int) -> float:
        return math.exp(i * ratio)

    lo, hi = None, 0  # grid indices; sigma(0) = 1
    while eps_at(sigma(hi)) > target:
        lo, hi = hi, max(1, 2 * hi)
        if sigma(hi) > MAX_NOISE_MULTIPLIER:
            raise InfeasibleBudgetError(
                f"cannot calibrate noise: even noise_multiplier={MAX_NOISE_MULTIPLIER:g} "
                f"exceeds target epsilon {target:.4g} (already spent {spent:.4g})"
            )
    if lo is None:  # sigma = 1 already fits: search below it
        lo = -1
        while sigma(lo) > 1e-3 and eps_at(sigma(lo)) <= target:
            hi, lo = lo, 2 * lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps_at(sigma(mid)) <= target:
            hi = mid
        else:
            lo = mid
    return sigma(hi)
