"""Pure privacy accounting shared by the site ledger and the server (no state, no I/O)."""

from shared.privacy.accounting import (
    MAX_NOISE_MULTIPLIER,
    PRV_EPS_ERROR,
    RDP_ORDERS,
    Accountant,
    InfeasibleBudgetError,
    SgmEvent,
    calibrate_noise_multiplier,
    epsilon,
    prv_epsilon,
    rdp_curve,
    rdp_epsilon,
    validate_delta,
    validate_event,
)

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "PRV_EPS_ERROR",
    "RDP_ORDERS",
    "Accountant",
    "InfeasibleBudgetError",
    "SgmEvent",
    "calibrate_noise_multiplier",
    "epsilon",
    "prv_epsilon",
    "rdp_curve",
    "rdp_epsilon",
    "validate_delta",
    "validate_event",
]
