"""Simulated site faults (``[faults]``): reproducible dropouts, crashes, stragglers and
byzantine sites.

A site drops out of a round with probability ``faults.dropout``, by a draw seeded with
(run seed, round, site), so a scenario drops the same sites every time. Where it drops:
``faults.dropout_stage`` (see ``shared.config.DropoutStage``); without SecAgg there is only
the ``train`` stage. ``faults.crash`` and ``faults.slow`` are drawn the same way, each from
its own stream: a crashing site fails after training (having spent the compute and, with
DP, the privacy budget of the round); a straggler replies ``faults.slow_seconds`` late.
"""

from __future__ import annotations

import numpy as np
import torch

from shared.config import DropoutStage, Misbehaviour, RunConfig

_SECAGG_STAGES = (
    DropoutStage.ADVERTISE,
    DropoutStage.SHARE,
    DropoutStage.COLLECT,
    DropoutStage.UNMASK,
)


class SimulatedDropout(RuntimeError):
    """A simulated site left mid-round (``[faults] dropout``)."""


def dropout_stage(config: RunConfig, server_round: int, site_id: int) -> DropoutStage | None:
    """The stage at which this site drops out of this round, or None if it stays.

    The first draw is the one privfed always used (same sites drop at ``train``); ``any``
    takes a second draw from the same seeded generator.
    """
    if config.faults.dropout <= 0:
        return None
    rng = np.random.default_rng([config.federation.seed, server_round, site_id, 0xD409])
    if not rng.random() < config.faults.dropout:
        return None
    stage = config.faults.dropout_stage
    if not config.secagg.enabled:
        return DropoutStage.TRAIN
    if stage is DropoutStage.ANY:
        return _SECAGG_STAGES[int(rng.integers(len(_SECAGG_STAGES)))]
    return stage


def _chance(config: RunConfig, probability: float, server_round: int, site_id: int,
            tag: int) -> bool:  # fmt: skip
    if probability <= 0:
        return False
    rng = np.random.default_rng([config.federation.seed, server_round, site_id, tag])
    return bool(rng.random() < probability)


def crashes(config: RunConfig, server_round: int, site_id: int) -> bool:
    """Whether this site crashes in this round after training (``faults.crash``)."""
    return _chance(config, config.faults.crash, server_round, site_id, 0xC2A5)


def straggler_delay(config: RunConfig, server_round: int, site_id: int) -> float:
    """Seconds this site's reply is late in this round (``faults.slow``; 0 if on time)."""
    slow = _chance(config, config.faults.slow, server_round, site_id, 0x5107)
    return config.faults.slow_seconds if slow else 0.0


class SimulatedCrash(RuntimeError):
    """A simulated byzantine site crashed mid-training (``byzantine_kind = "crash"``)."""


def byzantine_sites(config: RunConfig) -> frozenset[int]:
    """The sites that misbehave in every round: ``round(byzantine * clients)`` of them,
    chosen by a seeded permutation (the same sites for the same seed)."""
    count = round(config.faults.byzantine * config.federation.clients)
    if count == 0:
        return frozenset()
    order = np.random.default_rng([config.federation.seed, 0xB42]).permutation(
        config.federation.clients
    )
    return frozenset(int(s) for s in order[:count])


def misbehave(
    kind: Misbehaviour, state: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """What a byzantine site sends instead of its honest model ``state``.

    ``nan``: every float entry NaN; ``shape``: the first tensor gains a row; ``norm``: the
    update ``state - global`` blown up 1000 times; ``crash``: raises mid-round.

    Raises:
        SimulatedCrash: for ``crash``.
    """
    if kind is Misbehaviour.CRASH:
        raise SimulatedCrash("simulated crash mid-training")
    out = dict(state)
    if kind is Misbehaviour.NAN:
        return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                for k, v in out.items()}
    if kind is Misbehaviour.SHAPE:
        first = next(iter(out))
        out[first] = torch.cat([out[first], out[first][:1]])
        return out
    return {k: global_state[k] + 1000.0 * (v - global_state[k]) if v.is_floating_point() else v
            for k, v in out.items()}
