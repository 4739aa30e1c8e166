"""The site privacy ledger: every DP-SGD round a site ever trains, kept on the site's disk.

A site promises its data protection officer that no run, ever, spends more than its
budget ``(epsilon, delta)`` of its records' privacy. The ledger keeps that promise:

* **Budget from the site only.** :func:`open_site_ledger` takes the site's node config
  and nothing else; the run config (which the server controls) never reaches it, and
  no method takes a budget. The site admin may change the budget in the node config:
  the new epsilon applies from the next open and is recorded in ``policy_history``
  (lowering it below what is spent simply stops training). Changing *delta* once
  events exist is refused, because every recorded epsilon is relative to that delta.
* **Reserve before training.** :meth:`PrivacyLedger.reserve` writes a ``reserved``
  event durably *before* returning, or raises :class:`BudgetExhaustedError` without
  writing anything. :meth:`PrivacyLedger.commit` appends a ``committed`` event with
  the steps actually taken (never more than reserved). A reservation without a commit
  (the trainer crashed) counts in full, forever: a crash can never under-count.
* **Append-only, durable, checked.** Events are frozen and never edited or removed.
  Every write goes to a temp file in the site dir, is fsynced, renamed over the
  ledger and the directory is fsynced, under an exclusive ``fcntl.flock`` so two
  processes cannot interleave. The file carries its format version and a SHA-256 of
  its content; a truncated, hand-edited, unparsable or unknown-version file is refused
  with :class:`LedgerCorruptError` naming the file -- never read as "nothing spent".
* **Math elsewhere.** Epsilon comes from :mod:`shared.privacy.accounting` over the
  effective history (each reservation, replaced by its commit if there is one).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from shared.atomic import atomic_write_text
from shared.privacy import Accountant, calibrate_noise_multiplier, epsilon, validate_event
from shared.privacy.events import (
    MECHANISM,
    Budget,
    EventStatus,
    LedgerEvent,
    check_commit,
    check_run_round,
    effective_history,
)
from shared.privacy.ledger_format import (
    FILE_FORMAT,
    FILE_VERSION,
    LedgerState,
    PolicyRecord,
    dump_ledger,
    parse_ledger,
)

__all__ = [
    "FILE_FORMAT",
    "FILE_VERSION",
    "LEDGER_FILENAME",
    "NODE_CONFIG_KEYS",
    "Budget",
    "BudgetExhaustedError",
    "EventStatus",
    "LedgerCorruptError",
    "LedgerError",
    "LedgerEvent",
    "LedgerState",
    "PlannedRound",
    "PolicyRecord",
    "PrivacyLedger",
    "Reservation",
    "SitePrivacyConfig",
    "open_site_ledger",
]

#: File name of the ledger inside the site directory.
LEDGER_FILENAME = "privacy_ledger.json"

#: Node-config keys the site sets (Flower ``--node-config`` / simulation node config).
NODE_CONFIG_KEYS = {
    "site_dir": "site-dir",
    "epsilon": "privacy-epsilon",
    "delta": "privacy-delta",
    "accountant": "privacy-accountant",
}


class LedgerError(Exception):
    """A ledger operation was refused; the message says why (and names the file)."""


class LedgerCorruptError(LedgerError):
    """The ledger file is unreadable, truncated, hand-edited or of an unknown version."""


def load(path: Path) -> LedgerState:
    """Read and fully check a ledger file.

    Raises:
        LedgerCorruptError: naming ``path`` and what is wrong. Never returns an
            empty state for a damaged file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LedgerCorruptError(f"privacy ledger {path} is unreadable: {err}") from None
    try:
        return parse_ledger(text)
    except ValueError as err:
        raise LedgerCorruptError(
            f"privacy ledger {path} is invalid ({err}); refusing to treat it as empty"
        ) from None


class BudgetExhaustedError(LedgerError):
    """Training this round would take the site past its budget; nothing was written."""

    def __init__(self, spent: float, cost: float, projected: float, budget: Budget, acc: str):
        self.spent, self.cost, self.projected, self.budget = spent, cost, projected, budget
        super().__init__(
            f"privacy budget exhausted: spent epsilon={spent:.4f}, this round costs "
            f"+{cost:.4f}, projected epsilon={projected:.4f} > budget epsilon="
            f"{budget.epsilon:g} (delta={budget.delta:g}, accountant={acc})"
        )


@dataclass(frozen=True)
class PlannedRound:
    """What the trainer is about to do: ``steps`` DP-SGD steps in round ``round`` of ``run``."""

    run: str | int
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        validate_event((self.noise_multiplier, self.sample_rate, self.steps))
        check_run_round(self.run, self.round)


@dataclass(frozen=True)
class Reservation:
    """Handle returned by :meth:`PrivacyLedger.reserve`; pass it to ``commit``."""

    seq: int
    event: LedgerEvent


@dataclass(frozen=True)
class SitePrivacyConfig:
    """The privacy settings a site gives itself in its node config (parsed once)."""

    site_dir: Path
    budget: Budget
    accountant: Accountant = Accountant.RDP

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> SitePrivacyConfig:
        """Parse ``site-dir``, ``privacy-epsilon``, ``privacy-delta`` [, ``privacy-accountant``].

        Raises:
            LedgerError: naming the missing or malformed key.
        """
        keys = NODE_CONFIG_KEYS
        missing = [keys[k] for k in ("site_dir", "epsilon", "delta") if keys[k] not in node_config]
        if missing:
            raise LedgerError(f"node config is missing {', '.join(missing)} (site privacy budget)")
        try:
            budget = Budget(
                _as_float(node_config[keys["epsilon"]]), _as_float(node_config[keys["delta"]])
            )
            accountant = Accountant.parse(str(node_config.get(keys["accountant"], "rdp")))
        except ValueError as err:
            raise LedgerError(f"node config: {err}") from None
        return cls(Path(str(node_config[keys["site_dir"]])), budget, accountant)


def _as_float(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def open_site_ledger(node_config: Mapping[str, object]) -> PrivacyLedger:
    """Open (creating if needed) the ledger of the site described by ``node_config`` only."""
    cfg = SitePrivacyConfig.from_node_config(node_config)
    return PrivacyLedger.open(cfg.site_dir, cfg.budget, cfg.accountant)


class PrivacyLedger:
    """The site's append-only record of DP events; a thin store over the accounting math.

    Every public method re-reads the file under the lock, so several ledger objects
    (or processes) on one site dir always see each other's events.
    """

    def __init__(self, path: Path, state: LedgerState):
        self.path = path
        self._state = state

    # -- opening -----------------------------------------------------------------
    @classmethod
    def open(
        cls, site_dir: str | os.PathLike, budget: Budget, accountant: Accountant = Accountant.RDP
    ) -> PrivacyLedger:
        """Open the site's ledger with the site's current policy, creating the file if absent.

        Raises:
            LedgerCorruptError: the file exists but is not a valid ledger.
            LedgerError: the delta differs from the one recorded events used.
        """
        site = Path(site_dir)
        site.mkdir(parents=True, exist_ok=True)
        accountant = Accountant.parse(accountant)
        policy = PolicyRecord(budget, accountant, _now())
        ledger = cls(site / LEDGER_FILENAME, LedgerState(budget, accountant, (policy,), ()))
        with ledger._locked():
            ledger._adopt_policy(policy)
        return ledger

    @classmethod
    def read(cls, site_dir: str | os.PathLike) -> PrivacyLedger:
        """Open an existing ledger read-only, with the policy stored in it (for reports).

        Raises:
            LedgerError: no ledger file in ``site_dir``.
            LedgerCorruptError: the file is not a valid ledger.
        """
        path = Path(site_dir) / LEDGER_FILENAME
        if not path.is_file():
            raise LedgerError(f"no privacy ledger at {path}")
        return cls(path, load(path))

    def _adopt_policy(self, policy: PolicyRecord) -> None:
        if not self.path.exists():
            self._write(self._state)
            return
        budget, accountant = policy.budget, policy.accountant
        state = self._reload()
        if budget.delta != state.budget.delta and state.events:
            raise LedgerError(
                f"{self.path}: node config delta={budget.delta:g} differs from the delta "
                f"{state.budget.delta:g} of the recorded events; delta cannot change"
            )
        if (budget, accountant) != (state.budget, state.accountant):
            history = (*state.policy_history, policy)
            self._write(
                replace(state, budget=budget, accountant=accountant, policy_history=history)
            )

    # -- queries -------------------------------------------------------------------
    @property
    def budget(self) -> Budget:
        """The budget in force (the site's, as of the last open)."""
        return self._state.budget

    @property
    def accountant(self) -> Accountant:
        """The accountant in force."""
        return self._state.accountant

    def events(self) -> tuple[LedgerEvent, ...]:
        """All events, oldest first, as on disk now."""
        with self._locked(shared=True):
            return self._reload().events

    def spent_epsilon(self) -> float:
        """Epsilon spent so far over all runs (uncommitted reservations count in full)."""
        with self._locked(shared=True):
            return self._epsilon(_history(self._reload().events))

    def projected_epsilon(self, planned: PlannedRound) -> float:
        """Epsilon the site would reach if ``planned`` were trained now."""
        with self._locked(shared=True):
            history = _history(self._reload().events)
        return self._epsilon([*history, _as_event(planned)])

    def remaining_noise_multiplier(
        self, sample_rate: float, steps_per_round: int, rounds: int
    ) -> float:
        """Smallest noise multiplier for ``rounds`` more rounds within the remaining budget.

        Raises:
            shared.privacy.InfeasibleBudgetError: if the budget is already spent.
        """
        with self._locked(shared=True):
            history = _history(self._reload().events)
        return calibrate_noise_multiplier(
            self.budget.epsilon,
            self.budget.delta,
            sample_rate,
            steps_per_round,
            rounds,
            prior_events=history,
            accountant=self.accountant,
        )

    # -- mutations -----------------------------------------------------------------
    def reserve(self, planned: PlannedRound) -> Reservation:
        """Durably record ``planned`` as spent, or refuse it; call before training.

        Returns only after the ``reserved`` event is on disk (file and dir fsynced).

        Raises:
            BudgetExhaustedError: projected epsilon > budget; nothing is written.
        """
        with self._locked():
            state = self._reload()
            history = _history(state.events)
            spent = self._epsilon(history)
            projected = self._epsilon([*history, _as_event(planned)])
            if projected > state.budget.epsilon:
                raise BudgetExhaustedError(
                    spent, projected - spent, projected, state.budget, state.accountant.value
                )
            event = self._new_event(planned, EventStatus.RESERVED, projected, None)
            self._write(replace(state, events=(*state.events, event)))
            return Reservation(event.seq, event)

    def commit(self, reservation: Reservation, steps_taken: int) -> LedgerEvent:
        """Record that the reserved round ran ``steps_taken`` steps (<= reserved).

        Raises:
            LedgerError: unknown or already committed reservation, or too many steps.
        """
        with self._locked():
            state = self._reload()
            reserved = self._open_reservation(state, reservation)
            try:
                check_commit(reserved, steps_taken)
            except ValueError as err:
                raise LedgerError(f"{self.path}: {err}") from None
            done = replace(_planned_of(reserved), steps=steps_taken)
            others = [e.as_sgm() for e in effective_history(state.events) if e.seq != reserved.seq]
            after = self._epsilon([*others, _as_event(done)])
            event = self._new_event(done, EventStatus.COMMITTED, after, reserved.seq)
            self._write(replace(state, events=(*state.events, event)))
            return event

    # -- internals -----------------------------------------------------------------
    def _new_event(self, planned: PlannedRound, status: EventStatus, eps: float, ref: int | None):
        return LedgerEvent(
            seq=len(self._state.events),
            run=planned.run,
            round=planned.round,
            mechanism=MECHANISM,
            noise_multiplier=planned.noise_multiplier,
            sample_rate=planned.sample_rate,
            steps=planned.steps,
            accountant=self._state.accountant.value,
            delta=self._state.budget.delta,
            status=status,
            epsilon_after=eps,
            timestamp=_now(),
            reservation=ref,
        )

    def _open_reservation(self, state: LedgerState, reservation: Reservation) -> LedgerEvent:
        seq = reservation.seq
        if not 0 <= seq < len(state.events) or state.events[seq] != reservation.event:
            raise LedgerError(f"{self.path}: reservation {seq} is not in this ledger")
        if any(e.reservation == seq for e in state.events):
            raise LedgerError(f"{self.path}: reservation {seq} is already committed")
        return state.events[seq]

    def _epsilon(self, history) -> float:
        return epsilon(history, self._state.budget.delta, self._state.accountant)

    def _reload(self) -> LedgerState:
        self._state = load(self.path)
        return self._state

    def _write(self, state: LedgerState) -> None:
        atomic_write_text(self.path, dump_ledger(state), mode=0o600)
        self._state = state

    @contextlib.contextmanager
    def _locked(self, shared: bool = False) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _history(events) -> list:
    return [e.as_sgm() for e in effective_history(events)]


def _as_event(planned: PlannedRound):
    return (planned.noise_multiplier, planned.sample_rate, planned.steps)


def _planned_of(event: LedgerEvent) -> PlannedRound:
    return PlannedRound(
        event.run, event.round, event.noise_multiplier, event.sample_rate, event.steps
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")
