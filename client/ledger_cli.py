"""``privfed ledger show``: read a site's privacy ledger (never writes to it).

Mounted by the main CLI as ``app.add_typer(ledger_app, name="ledger")``. On a
missing, corrupt or unknown-version ledger it prints one line naming the file to
stderr and exits with status 1 (no traceback).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from client.ledger import LedgerError, PrivacyLedger

ledger_app = typer.Typer(
    help="Inspect a site's privacy ledger.", no_args_is_help=True, add_completion=False
)


@ledger_app.callback()
def _group() -> None:
    """Inspect a site's privacy ledger."""


def ledger_report(ledger: PrivacyLedger) -> dict:
    """The ``--json`` document: ``budget``, ``spent_epsilon``, ``events`` and extras."""
    events = ledger.events()
    spent = ledger.spent_epsilon()
    return {
        "site_dir": str(ledger.path.parent),
        "file": str(ledger.path),
        "budget": {"epsilon": ledger.budget.epsilon, "delta": ledger.budget.delta},
        "accountant": ledger.accountant.value,
        "spent_epsilon": spent,
        "remaining_epsilon": max(0.0, ledger.budget.epsilon - spent),
        "events": [e.to_dict() for e in events],
    }


def _table(report: dict) -> Table:
    budget = report["budget"]
    table = Table(
        title=f"privacy ledger {report['file']}",
        caption=(
            f"spent epsilon {report['spent_epsilon']:.4f} of {budget['epsilon']:g} "
            f"(delta {budget['delta']:g}, {report['accountant']})"
        ),
    )
    columns = ("seq", "run", "round", "status", "noise", "rate", "steps", "eps after", "UTC")
    for name in columns:
        left = name in ("run", "status", "UTC")
        table.add_column(
            name, justify="left" if left else "right", no_wrap=name in ("status", "time")
        )
    for e in report["events"]:
        table.add_row(
            str(e["seq"]), str(e["run"]), str(e["round"]), e["status"],
            f"{e['noise_multiplier']:.4g}", f"{e['sample_rate']:.4g}", str(e["steps"]),
            f"{e['epsilon_after']:.4f}", e["timestamp"][5:16].replace("T", " "),
        )  # fmt: skip
    return table


@ledger_app.command("show")
def show(
    site_dir: Annotated[Path, typer.Option("--site-dir", help="The site's directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show the budget, the epsilon spent so far and every recorded event."""
    try:
        report = ledger_report(PrivacyLedger.read(site_dir))
    except LedgerError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    if as_json:
        typer.echo(json.dumps(report, sort_keys=True))
    else:
        Console().print(_table(report))
