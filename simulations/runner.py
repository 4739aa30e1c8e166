"""Run a scenario on Flower's Simulation Engine (the Ray backend, for scale-out).

The unchanged ``server.app:app`` and ``client.app:app`` run exactly as in
deployment; every virtual site gets Flower's simulation node config
(``partition-id``, ``num-partitions``) and the run config of the scenario. The
ServerApp sees Flower's grid through :class:`simulations.ordering.CanonicalGrid`
(nodes in partition order, replies sorted by partition), so a seed gives the same
model as on the in-process backend. With ``ray_address`` the ClientApps run on an
existing Ray cluster (whose nodes must have privfed installed).

Flower 1.41's public ``run_simulation`` cannot pass a run config, so
:func:`run_on_ray` calls its internal ``_run_simulation`` with a ``Run`` whose
``override_config`` is the scenario. That is the one place privfed touches a
private Flower API; flwr is pinned to 1.41.* for it.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from simulations.scenario import PROJECT_DIR


def _backend_config(num_cpus: int, address: str | None = None) -> dict[str, Any]:
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR,
                                 "log_to_driver": True}  # fmt: skip
    if address:  # a running cluster brings its own resources
        init_args["address"] = address
    else:
        init_args["num_cpus"] = num_cpus
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


def new_run(flat_config: Mapping[str, Any]) -> Any:
    """A Flower ``Run`` whose run config is the scenario, with the task identity Flower's
    runtimes give the ServerApp's task (every Message built afterwards carries it).

    Both simulation backends start a run this way.
    """
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    run = Run.create_empty(run_id=secrets.randbits(63))
    run.primary_task_id = secrets.randbits(63)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(flat_config)
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    return run


def run_on_ray(
    flat_config: Mapping[str, Any],
    num_sites: int,
    *,
    verbose: bool = False,
    address: str | None = None,
) -> None:
    """Run the apps on Flower's Simulation Engine with ``num_sites`` virtual sites.

    ``address``: an existing Ray cluster (``ray://host:10001`` or ``host:6379``); by
    default a local Ray instance with one ClientApp actor per core.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.app import Context, RecordDict
    from flwr.supercore.telemetry import EventType

    from client.app import app as client_app
    from server.app import app as server_app
    from simulations.ordering import canonical_server_app

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    run = new_run(flat_config)
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(flat_config))
    from flwr.simulation.run_simulation import _run_simulation

    _run_simulation(
        num_supernodes=num_sites,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=canonical_server_app(server_app),
        backend_name="ray",
        backend_config=_backend_config(os.cpu_count() or 1, address),
        server_app_context=context,
        app_dir=str(PROJECT_DIR),
        run=run,
        # Without is_app, Flower registers the virtual sites' contexts with an
        # empty run config (flwr 1.41 vce_api.start_vce).
        is_app=True,
        verbose_logging=verbose,
    )


def output_path(out: str | Path) -> Path:
    """The absolute output folder (the server may run with another working directory)."""
    return Path(out).expanduser().resolve()
