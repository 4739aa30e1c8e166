"""The ``privfed`` command line.

``privfed simulate [SCENARIO] [--set K=V ...] [--out DIR]`` runs a federation on
this machine; ``privfed ledger show --site-dir DIR`` reads a site's privacy
ledger. Bad input ends with one line naming the problem and a non-zero status;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from client.ledger_cli import ledger_app
from server.checkpoint import CheckpointError
from shared.config import ConfigError, RunConfig
from shared.data import DataError, load
from shared.models import UnknownModelError
from simulations import deploy_cli
from simulations.scenario import DEFAULT_SCENARIO, ScenarioError, compose, read_scenario

if TYPE_CHECKING:
    from simulations.run import Backend

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="privfed: private federated learning on Flower.")
console = Console(stderr=False)
err_console = Console(stderr=True)

#: Errors a user can fix; shown as one line.
USER_ERRORS = (ScenarioError, ConfigError, DataError, UnknownModelError, FileNotFoundError,
               CheckpointError)


@app.callback()
def _root() -> None:
    """privfed: private federated learning on Flower."""


def fail(message: str, code: int = 2) -> typer.Exit:
    sys.stderr.write(f"privfed: error: {' '.join(message.split())}\n")
    return typer.Exit(code)


@app.command()
def simulate(
    scenario: Annotated[Path, typer.Argument(help="scenario TOML file")] = DEFAULT_SCENARIO,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: section.key=value")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output folder")] = None,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
    verbose: Annotated[bool, typer.Option(help="show Flower's and Ray's logs")] = False,
    backend: Annotated[
        str, typer.Option(help="where sites run: inprocess (this machine's cores) or ray")
    ] = "inprocess",
    workers: Annotated[
        int | None,
        typer.Option(help="inprocess: worker processes (default: one per core; 0: none)"),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="ray: address of an existing Ray cluster")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="continue the run in this folder from its last good checkpoint"),
    ] = None,
) -> None:
    """Run a simulated federation and write metrics.jsonl, summary.json and metrics.png."""
    from simulations.run import run_scenario

    try:
        chosen = _backend(backend, workers, ray_address)
        if resume is not None:
            flat, out_dir = resumable(resume, set_ or []), resume
        else:
            flat = compose(read_scenario(scenario), set_ or [])
            out_dir = out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
        config = RunConfig.from_flat(flat)
        load(config.data)  # a data problem is reported before any site starts
        summary = run_scenario(flat, out_dir, console=console, verbose=verbose, backend=chosen,
                               workers=workers, ray_address=ray_address)  # fmt: skip
    except USER_ERRORS as exc:
        if debug:
            raise
        raise fail(str(exc)) from None
    except Exception as exc:
        if debug:
            raise
        raise fail(f"simulation failed: {type(exc).__name__}: {exc} (--debug shows the traceback)",
                   code=1) from None
    console.print_json(json.dumps(summary_view(summary)))


def resumable(run_dir: Path, overrides: list[str]) -> dict[str, object]:
    """The run config of the interrupted run in ``run_dir``, set to resume it.

    Raises:
        server.checkpoint.CheckpointError: the folder has no usable checkpoint.
    """
    from server.checkpoint import CheckpointStore

    checkpoint = CheckpointStore(run_dir).latest()
    if checkpoint is None:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    flat = compose(checkpoint.run_config, overrides, defaults=checkpoint.run_config)
    return {**flat, "output.dir": str(run_dir.expanduser().resolve()), "output.resume": True}


def _backend(name: str, workers: int | None, ray_address: str | None) -> Backend:
    """The ``--backend`` choice, checked with the options that go with it."""
    from simulations.run import Backend

    try:
        chosen = Backend(name)
    except ValueError:
        options = ", ".join(b.value for b in Backend)
        raise ConfigError(
            f"--backend: unknown backend {name!r}; expected one of: {options}"
        ) from None
    if workers is not None and (chosen is not Backend.INPROCESS or workers < 0):
        raise ConfigError(f"--workers must be >= 0 and needs --backend inprocess, got {workers} "
                          f"with --backend {chosen.value}")  # fmt: skip
    if ray_address is not None and chosen is not Backend.RAY:
        raise ConfigError("--ray-address needs --backend ray")
    return chosen


def summary_view(summary: dict[str, object]) -> dict[str, object]:
    """The headline figures of a summary (what the main job prints last)."""
    keys = ("final_accuracy", "centralized_accuracy", "epsilon", "rounds_completed",
            "wall_seconds", "out_dir")
    return {k: summary[k] for k in keys if summary.get(k) not in (None, {})}


app.add_typer(ledger_app, name="ledger", help="A site's privacy ledger.")
deploy_cli.mount(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("privfed: interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
