"""Simulated site faults (``[faults]``): reproducible dropouts for rehearsing them.

A site drops out of a round with probability ``faults.dropout``, by a draw seeded with
(run seed, round, site), so a scenario drops the same sites every time. Where it drops:
``faults.dropout_stage`` (see ``shared.config.DropoutStage``); without SecAgg there is only
the ``train`` stage.
"""

from __future__ import annotations

import numpy as np

from shared.config import DropoutStage, RunConfig

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
