"""Run the aggregation server: Flower's SuperLink with TLS, site authentication and SQLite state.

``privfed server start --kit DIR --state DIR`` runs ``flower-superlink`` in the
foreground with the kit's TLS files, ``--enable-supernode-auth`` and
``--database STATE/superlink.db``, waits until it listens, then registers every
site public key in ``DIR/sites/*.pub`` through Flower's Control API (``flwr
supernode register``, the 1.41 mechanism: the SuperLink no longer reads a key
list at start). Registration is idempotent: a key already in the state database
is reported as such, so restarting the server on the same state folder works.

Guarantees:

* Without the three TLS files the server does not start, unless ``insecure`` is
  set; then it runs without TLS and without site authentication (Flower allows
  authentication only over TLS) and says so in a warning.
* SIGTERM/SIGINT are forwarded to the SuperLink's process group (which holds its
  ServerApp executor); after ``STOP_GRACE`` seconds or a second signal the group is
  killed. A failed registration stops the SuperLink and is reported.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cryptography import x509

from shared.process import STOP_GRACE, SignalForwarder, die_with_parent, relay, tool_env

CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "server.pem", "server.key"
SITES_DIR = "sites"
DATABASE = "superlink.db"
FLWR_HOME_DIR = "flwr-home"
CONNECTION = "privfed-server"
READY_TIMEOUT = 120.0


class DeployError(ValueError):
    """The server cannot start as asked; the message names the option or file."""


@dataclass(frozen=True)
class ServerKit:
    """The server's TLS files and the sites' public keys (``None`` TLS: insecure mode)."""

    ca: Path | None
    cert: Path | None
    key: Path | None
    site_keys: dict[str, Path]

    @property
    def tls(self) -> bool:
        return self.cert is not None


def _private_ok(path: Path) -> Path:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise DeployError(
            f"{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}"
        )
    return path


def load_server_kit(kit: Path | None, *, insecure: bool) -> ServerKit:
    """Find the TLS files and site keys in ``kit``; refuse to go without TLS unless ``insecure``.

    Raises:
        DeployError: naming the missing file, or asking for ``--insecure``.
    """
    site_keys = {}
    if kit is not None:
        if not kit.is_dir():
            raise DeployError(f"--kit: {kit} is not a folder")
        site_keys = {p.stem: p for p in sorted((kit / SITES_DIR).glob("*.pub"))}
    if insecure:
        return ServerKit(None, None, None, site_keys)
    if kit is None:
        raise DeployError("the server needs TLS: give --kit (a server kit from privfed provision); "
                          "--insecure runs without encryption")
    files = [kit / n for n in (CA_FILE, CERT_FILE, KEY_FILE)]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise DeployError(f"the server needs TLS, but {', '.join(missing)} is missing; "
                          "--insecure runs without encryption")
    if not site_keys:
        raise DeployError(f"--kit: no site public keys in {kit / SITES_DIR} (*.pub)")
    return ServerKit(files[0], files[1], _private_ok(files[2]), site_keys)


def superlink_command(kit: ServerKit, state: Path, host: str, port: int) -> list[str]:
    """The ``flower-superlink`` command line (Fleet, Control and Runtime APIs on ``port``)."""
    cmd = ["flower-superlink"]
    if kit.tls:
        cmd += ["--ssl-ca-certfile", str(kit.ca), "--ssl-certfile", str(kit.cert),
                "--ssl-keyfile", str(kit.key), "--enable-supernode-auth"]
    else:
        cmd.append("--insecure")
    cmd += ["--database", str(state / DATABASE), "--host", host, "--port", str(port)]
    cmd.append("--disable-runtime-dependency-installation")
    return cmd


def connect_host(host: str) -> str:
    """Where a local client reaches a server bound to ``host`` (bind-all -> loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def write_connection(flwr_home: Path, name: str, address: str, ca: Path | None) -> Path:
    """Write (or update) ``FLWR_HOME/config.toml`` with a connection ``name`` to ``address``."""
    import tomli_w  # Flower's own dependency; imported here so `import server.deploy` stays light

    path = flwr_home / "config.toml"
    flwr_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = tomllib.loads(path.read_text()) if path.is_file() else {}
    superlink = config.setdefault("superlink", {})
    superlink.setdefault("default", name)
    entry: dict[str, object] = {"address": address}
    if ca is not None:
        entry["root-certificates"] = str(ca.resolve())
    else:
        entry["insecure"] = True
    superlink[name] = entry
    path.write_text(tomli_w.dumps(config))
    return path


def describe_certificate(path: Path) -> str:
    """``CN=..., SANs ..., valid until ...`` of a PEM certificate (for the start-up banner)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    return (f"{path} ({cert.subject.rfc4514_string()}, SANs {', '.join(names) or 'none'}, "
            f"valid until {cert.not_valid_after_utc:%Y-%m-%d})")


def wait_listening(proc: subprocess.Popen[str], host: str, port: int, timeout: float) -> None:
    """Return once ``host:port`` accepts TCP connections; raise if ``proc`` dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"flower-superlink exited with status {proc.returncode} (log above)")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise DeployError(f"flower-superlink did not listen on {host}:{port} within {timeout:g} s")


def register_sites(site_keys: Mapping[str, Path], env: Mapping[str, str]) -> dict[str, str]:
    """``flwr supernode register`` every key, concurrently; return site -> outcome.

    Outcomes are ``"registered"`` or ``"already registered"``.

    Raises:
        DeployError: a key was refused for another reason (the message quotes Flower).
    """
    procs = {
        site: subprocess.Popen(  # noqa: S603 - fixed executable, paths from the kit
            ["flwr", "supernode", "register", str(pub), CONNECTION, "--name", site],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(env),
        )
        for site, pub in site_keys.items()
    }
    outcomes = {}
    for site, proc in procs.items():
        text, _ = proc.communicate(timeout=120)
        if proc.returncode == 0:
            outcomes[site] = "registered"
        elif "already in use" in text:
            outcomes[site] = "already registered"
        else:
            last = " ".join(" ".join(text.split()).split("│"))[-300:]
            raise DeployError(f"registering site {site!r} ({site_keys[site]}) failed: {last}")
    return outcomes


def start_server(kit_dir: Path | None, state: Path, host: str, port: int, *,
                 insecure: bool = False, out: TextIO = sys.stdout) -> int:
    """Run the SuperLink in the foreground until it exits; return its exit status.

    Raises:
        DeployError: the kit or options are unusable, or registration failed.
    """
    kit = load_server_kit(kit_dir, insecure=insecure)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    address = f"{connect_host(host)}:{port}"
    env = tool_env({"FLWR_HOME": str((state / FLWR_HOME_DIR).resolve())})
    write_connection(state / FLWR_HOME_DIR, CONNECTION, address, kit.ca)
    cmd = superlink_command(kit, state, host, port)
    say = "privfed server:"
    scheme = "https" if kit.tls else "http"
    print(f"{say} SuperLink on {scheme}://{host}:{port} (sites, flwr run and the ServerApp "
          f"all use this port); state {state / DATABASE}", file=out)
    if kit.tls:
        print(f"{say} TLS certificate {describe_certificate(kit.cert)}; CA {kit.ca}", file=out)
    else:
        print(f"{say} WARNING: --insecure: no TLS and no site authentication; anyone who "
              "reaches this port can join the federation and read model updates", file=out)
    out.flush()
    proc = subprocess.Popen(  # noqa: S603 - fixed executable, arguments built above
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, preexec_fn=die_with_parent, env=env,
    )
    relay_thread = relay(proc, out)
    with SignalForwarder(proc, STOP_GRACE) as forwarder:
        try:
            wait_listening(proc, connect_host(host), port, READY_TIMEOUT)
            if kit.tls:
                outcomes = register_sites(kit.site_keys, env)
                listed = ", ".join(f"{s} ({o})" for s, o in outcomes.items())
                print(f"{say} site keys: {listed}", file=out, flush=True)
        except DeployError:
            if not forwarder.stopping.is_set():  # not a SIGTERM during start-up
                forwarder.stop()
                forwarder.wait()
                raise
        status = forwarder.wait()
    relay_thread.join(timeout=5)
    print(f"{say} SuperLink exited with status {status}", file=out, flush=True)
    return status

