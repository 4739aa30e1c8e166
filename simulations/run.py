"""``privfed simulate``: one scenario, end to end, with its output folder."""

from __future__ import annotations

import enum
import functools
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from server.reporting import METRICS_FILE, SUMMARY_FILE
from shared.atomic import atomic_write_text
from shared.config import ConfigError, RunConfig
from simulations.baseline import train_centrally
from simulations.progress import MetricsFollower
from simulations.runner import output_path, run_on_ray


class Backend(enum.StrEnum):
    """Where a simulation's ClientApps run (a CLI choice: it never changes the result)."""

    INPROCESS = "inprocess"  # this process and a pool of warm workers (default)
    RAY = "ray"  # Flower's Simulation Engine, locally or on a Ray cluster


def run_scenario(
    flat: Mapping[str, Any],
    out: str | Path,
    *,
    console: Console,
    verbose: bool = False,
    backend: Backend = Backend.INPROCESS,
    workers: int | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Simulate the federation ``flat`` describes; return the summary written to ``out``.

    ``backend`` and its knobs (``workers`` for in-process, default one per core;
    ``ray_address`` for Ray) change where sites run, never what they compute.

    Raises:
        ConfigError: ``out`` already holds a run.
        RuntimeError: the simulation ended without a summary.
    """
    started = time.perf_counter()
    out_dir = output_path(out)
    resuming = bool(flat.get("output.resume"))
    if (out_dir / METRICS_FILE).exists() and not resuming:
        raise ConfigError(f"output folder {out_dir} already holds a run; choose another --out "
                          "(or --resume it)")
    flat = {**flat, "output.dir": str(out_dir)}
    config = RunConfig.from_flat(flat)
    console.print(f"privfed: simulating {config.federation.clients} sites x "
                  f"{config.federation.rounds} rounds ({config.model.name} on "
                  f"{config.data.dataset.value}) on the {backend.value} backend; "
                  f"output in {out_dir}")
    if backend is Backend.RAY:
        with MetricsFollower(out_dir / METRICS_FILE, config.federation.rounds, console):
            run_on_ray(flat, config.federation.clients, verbose=verbose, address=ray_address)
    else:
        from client.app import warm_up
        from simulations.inprocess import run_inprocess
        from simulations.workers import default_workers, make_executor

        # The pool starts before the progress display's threads do (workers are forked).
        executor = make_executor(default_workers() if workers is None else workers,
                                 verbose=verbose,
                                 preload=functools.partial(warm_up, config))

        try:
            with MetricsFollower(out_dir / METRICS_FILE, config.federation.rounds, console):
                run_inprocess(flat, config.federation.clients, executor, verbose=verbose)
        finally:
            executor.close()
    summary_path = out_dir / SUMMARY_FILE
    if not summary_path.exists():
        raise RuntimeError(f"the server wrote no {SUMMARY_FILE} in {out_dir}")
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    if config.train.centralized_baseline:
        central = train_centrally(config)
        summary["centralized_accuracy"] = central.accuracy
        summary["centralized_loss"] = central.loss
        if summary.get("final_accuracy") is not None and central.accuracy > 0:
            summary["federated_vs_centralized"] = summary["final_accuracy"] / central.accuracy
    summary["server_seconds"] = summary.get("wall_seconds")
    summary["wall_seconds"] = time.perf_counter() - started
    summary["out_dir"] = str(out_dir)
    summary["backend"] = backend.value
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    return summary
