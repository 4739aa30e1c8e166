"""``privfed provision | server start | site start | run``: the deployment commands.

Mounted on the ``privfed`` app by :mod:`simulations.cli`. User errors (a bad
option, kit or ``site.toml``) end with one line naming the option, key or file
and status 2; ``--debug`` shows the traceback. A daemon's own exit status is
passed through.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from client.site import SiteConfigError, start_site
from server.deploy import DeployError, start_server
from server.provision import DEFAULT_PORT, ProvisionError, provision
from server.submit import handback_overrides, submit
from shared.config import ConfigError
from simulations.scenario import (
    PROJECT_DIR,
    ScenarioError,
    app_defaults,
    compose,
    parse_override,
)

DEPLOY_ERRORS = (ProvisionError, DeployError, SiteConfigError, ConfigError, ScenarioError)

server_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="The aggregation server (Flower SuperLink).")
site_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="A data-holding site (Flower SuperNode).")

Debug = Annotated[bool, typer.Option(help="show tracebacks")]


@contextlib.contextmanager
def one_line_errors(debug: bool) -> Iterator[None]:
    """Turn a user error into ``privfed: error: <one line>`` and exit status 2."""
    try:
        yield
    except DEPLOY_ERRORS as exc:
        if debug:
            raise
        sys.stderr.write(f"privfed: error: {' '.join(str(exc).split())}\n")
        raise typer.Exit(2) from None


def provision_command(
    out: Annotated[Path, typer.Option(help="new folder for the CA and the kits")],
    server_name: Annotated[str, typer.Option(help="the server's DNS name (certificate SAN)")],
    sites: Annotated[str, typer.Option(help="site names, comma separated: a,b,c")],
    server_ip: Annotated[list[str] | None, typer.Option(
        help="the server's IP address (certificate SAN); repeat or comma-separate")] = None,
    port: Annotated[int, typer.Option(help="the server's port (written into site.toml)")] =
        DEFAULT_PORT,
    debug: Debug = False,
) -> None:
    """Create a federation CA, the server's TLS kit and one kit per site."""
    ips = [ip.strip() for item in server_ip or [] for ip in item.split(",") if ip.strip()]
    with one_line_errors(debug):
        fed = provision(out, server_name, sites.split(","), ips, port=port)
    print(f"CA (keep offline, in no kit): {fed.ca_dir}")
    print(f"server kit (give to the server operator): {fed.server_kit}")
    for site, kit in fed.site_kits.items():
        print(f"site kit for {site} (give to that site only): {kit}")


@server_app.command("start")
def server_start(
    state: Annotated[Path, typer.Option(help="state folder (SQLite database, connection)")],
    kit: Annotated[Path | None, typer.Option(help="server kit from privfed provision")] = None,
    host: Annotated[str, typer.Option(help="address to bind (0.0.0.0: all interfaces)")] =
        "127.0.0.1",
    port: Annotated[int, typer.Option(help="port for sites, flwr run and the ServerApp")] =
        DEFAULT_PORT,
    insecure: Annotated[bool, typer.Option(
        help="run WITHOUT TLS and site authentication (testing only)")] = False,
    debug: Debug = False,
) -> None:
    """Run the aggregation server in the foreground (stop with Ctrl-C or SIGTERM)."""
    with one_line_errors(debug):
        status = start_server(kit, state, host, port, insecure=insecure)
    raise typer.Exit(0 if status in (0, -15) else 1)


@site_app.command("start")
def site_start(
    kit: Annotated[Path, typer.Option(help="this site's kit (with a filled-in site.toml)")],
    superlink: Annotated[str | None, typer.Option(
        help="server host:port (default: site.superlink in site.toml)")] = None,
    insecure: Annotated[bool, typer.Option(help="connect WITHOUT TLS (testing only)")] = False,
    max_wait_time: Annotated[float | None, typer.Option(
        help="give up after this many seconds without the server (default: retry forever)")]
        = None,
    debug: Debug = False,
) -> None:
    """Run this site's client in the foreground (stop with Ctrl-C or SIGTERM)."""
    with one_line_errors(debug):
        result = start_site(kit, superlink=superlink, insecure=insecure,
                            max_wait_time=max_wait_time)
    if result.refused:
        sys.stderr.write(f"privfed: error: site could not join the federation: "
                         f"{result.refused}\n")
    raise typer.Exit(0 if result.status in (0, -15) else 1)


def run_command(
    server: Annotated[str, typer.Option(help="the server, host:port")],
    kit: Annotated[Path | None, typer.Option(
        help="a folder with the federation's ca.pem (any kit)")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="run config override: section.key=value")] = None,
    out: Annotated[Path | None, typer.Option(help="local folder for the run's results")] = None,
    server_output: Annotated[Path | None, typer.Option(
        help="folder ON THE SERVER HOST for the run's files (files the server did not "
             "hand back are copied into --out when readable from here)")] = None,
    flwr_home: Annotated[Path | None, typer.Option(
        help="Flower CLI home for the connection (default: ~/.privfed/flwr)")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="folder ON THE SERVER HOST of an interrupted run: continue it from its last "
             "good checkpoint (same --set overrides as the first submission)")] = None,
    app_dir: Annotated[Path, typer.Option("--app", help="the Flower App to submit")] =
        PROJECT_DIR,
    insecure: Annotated[bool, typer.Option(help="server runs without TLS")] = False,
    debug: Debug = False,
) -> None:
    """Submit a run to a live server, stream its progress, keep its results locally."""
    from client.site import check_address

    with one_line_errors(debug):
        check_address("--server", server)
        if resume is not None:
            if server_output is not None and server_output != resume:
                raise DeployError("--resume DIR continues the run in DIR: drop --server-output")
            server_output, set_ = resume, [*(set_ or []), "output.resume=true"]
        compose({}, set_ or [])  # every override checked here, before anything is sent
        defaults = app_defaults(app_dir)
        overrides = handback_overrides(
            defaults, dict(parse_override(text, defaults) for text in set_ or []))
        ca = None
        if not insecure:
            if kit is None or not (kit / "ca.pem").is_file():
                raise DeployError("--kit: give a folder holding the federation's ca.pem "
                                  "(or --insecure for a server without TLS)")
            ca = kit / "ca.pem"
        out_dir = out or Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
        home = flwr_home or Path.home() / ".privfed" / "flwr"
        summary = submit(server, ca, app_dir, overrides, out_dir, home,
                         server_output=server_output.resolve() if server_output else None)
    print(json.dumps(summary, indent=2))


def mount(app: typer.Typer) -> None:
    """Add the deployment commands to the ``privfed`` app."""
    app.command("provision")(provision_command)
    app.add_typer(server_app, name="server")
    app.add_typer(site_app, name="site")
    app.command("run")(run_command)
