"""One DP-SGD round at a site, kept within the site's own privacy budget.

The order is what makes the promise hold:

1. the site's budget comes from its node config (:func:`site_node_config`);
2. the noise is the run's ``privacy.noise_multiplier`` or, if 0, calibrated so the
   rounds left in this run fit in what remains of the budget;
3. the round is *reserved* in the ledger (durably) before any example is touched;
   if it would exceed the budget, :class:`~client.ledger.BudgetExhaustedError` is
   raised and nothing trains;
4. DP-SGD runs (Opacus sampling, clipping, noise, see :mod:`client.dpsgd`);
5. the steps actually taken are committed. A crash between 3 and 5 leaves the
   reservation counting in full.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from client.dpsgd import ClippingMode, make_private_round, preflight
from client.ledger import NODE_CONFIG_KEYS, PlannedRound, open_site_ledger
from shared.config import RunConfig
from shared.data import ArrayDataset
from shared.training import make_loader, make_optimizer, train
from shared.wire import PARTITION_ID

#: Folder of simulated sites inside a simulation's output folder.
SITES_DIR = "sites"


@dataclass(frozen=True)
class PrivateResult:
    """What a private round did: the new weights and what the ledger recorded."""

    state: dict[str, torch.Tensor]
    train_loss: float
    epsilon: float
    noise_multiplier: float
    steps: int


def site_node_config(config: RunConfig, node_config: Mapping[str, object]) -> dict[str, object]:
    """The node config a site's ledger is opened with.

    A deployed site sets ``site-dir`` and its budget in its own node config, and that
    is used as is: nothing the server sends can change it. A simulated site (Flower's
    simulation node config carries only ``partition-id``) is played by the researcher,
    whose scenario gives every simulated site the budget ``[privacy] epsilon/delta``
    and the folder ``<output.dir>/sites/<partition-id>``.
    """
    if NODE_CONFIG_KEYS["site_dir"] in node_config or PARTITION_ID not in node_config:
        return dict(node_config)
    out = Path(config.output.dir) if config.output.dir else Path.home() / ".privfed" / "sim"
    return {
        **node_config,
        NODE_CONFIG_KEYS["site_dir"]: str(out / SITES_DIR / str(node_config[PARTITION_ID])),
        NODE_CONFIG_KEYS["epsilon"]: config.privacy.epsilon,
        NODE_CONFIG_KEYS["delta"]: config.privacy.delta,
        NODE_CONFIG_KEYS["accountant"]: config.privacy.accountant.value,
    }


def train_privately(
    model: torch.nn.Module,
    data: ArrayDataset,
    config: RunConfig,
    node_config: Mapping[str, object],
    *,
    run_id: int,
    server_round: int,
    seed: int,
) -> PrivateResult:
    """Train ``model`` on ``data`` for one round with DP-SGD, within the site's budget.

    Raises:
        client.ledger.BudgetExhaustedError: the round would exceed the budget (nothing
            was trained or written).
        client.dpsgd.PreflightError: the model cannot be trained with DP-SGD.
        client.ledger.LedgerError: the site's privacy settings are missing or the
            ledger file is damaged.
    """
    mode = ClippingMode(config.privacy.clipping.value)
    preflight(model, mode)
    ledger = open_site_ledger(site_node_config(config, node_config))
    loader = make_loader(data, min(config.train.batch_size, len(data)), seed=seed, shuffle=False)
    sample_rate = 1 / len(loader)  # Opacus' DPDataLoader rate for this loader
    steps = config.train.epochs * len(loader)
    sigma = config.privacy.noise_multiplier or ledger.remaining_noise_multiplier(
        sample_rate, steps, config.federation.rounds - server_round + 1
    )
    reservation = ledger.reserve(PlannedRound(run_id, server_round, sigma, sample_rate, steps))
    optimizer = make_optimizer(model, config.train)
    rnd = make_private_round(model, optimizer, loader, noise_multiplier=sigma,
                             max_grad_norm=config.privacy.max_grad_norm, mode=mode)
    with rnd:
        if rnd.sample_rate != sample_rate:
            raise RuntimeError(f"sampled at rate {rnd.sample_rate}, reserved {sample_rate}")
        loss = train(rnd.model, rnd.data_loader, rnd.optimizer, config.train.epochs,
                     criterion=rnd.criterion, step_on_empty=True)
    event = ledger.commit(reservation, rnd.steps)
    return PrivateResult(rnd.finish(), loss, event.epsilon_after, sigma, rnd.steps)
