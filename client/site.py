"""A deployed site: ``site.toml`` -> a validated config -> a ``flower-supernode`` process.

``privfed site start --kit DIR`` reads ``DIR/site.toml`` (written by ``privfed
provision``, filled in by the site admin), checks it, and runs Flower's SuperNode in
the foreground with the kit's CA certificate (``--root-certificates``), the site's
authentication key (``--auth-supernode-private-key``) and a ``--node-config`` that
carries only what the site decides: its data file, its privacy budget and its
ledger folder. The run config (the server's side) never sets those.

Guarantees:

* A bad ``site.toml`` is refused before anything starts, with one line naming the
  key (``data.path``, ``data.format``, ``privacy.epsilon``, ...).
* The ledger folder exists with mode 0700 before the SuperNode starts.
* SIGTERM/SIGINT are forwarded to the SuperNode's process group; the process
  group is killed if it has not exited ``STOP_GRACE`` seconds later.
"""

from __future__ import annotations

import enum
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from client.data import DATA_PATH
from client.ledger import NODE_CONFIG_KEYS
from shared.config import AccountantName
from shared.process import STOP_GRACE, SignalForwarder, die_with_parent, relay, tool_env
from shared.training import DEVICE_KEY, resolve_device
from shared.wire import SITE_NAME_KEY

SITE_TOML = "site.toml"
CA_FILE = "ca.pem"
KEY_FILE = "site.key"
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class SiteConfigError(ValueError):
    """``site.toml`` or the kit is unusable; the message names the key or file."""


class DataFormat(enum.StrEnum):
    """Site data file formats (see :func:`shared.data.load_site_file`)."""

    NPZ = "npz"
    CSV = "csv"


@dataclass(frozen=True)
class SiteConfig:
    """What a site decides for itself, parsed once from ``site.toml``."""

    name: str
    superlink: str
    runtime_port: int
    data_path: Path
    data_format: DataFormat
    epsilon: float
    delta: float
    accountant: AccountantName
    ledger_dir: Path
    device: str = "auto"


def _get(table: Mapping[str, Any], dotted: str, kind: type | tuple[type, ...]) -> Any:
    section, _, key = dotted.partition(".")
    sub = table.get(section, {})
    if not isinstance(sub, dict) or key not in sub:
        raise SiteConfigError(f"site.toml: {dotted} is missing")
    value = sub[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SiteConfigError(f"site.toml: {dotted} must be a {names}, got {value!r}")
    return value


def check_address(key: str, address: str) -> str:
    """``host:port`` with a port in 1..65535, else a one-line error naming ``key``."""
    match = _HOST_PORT.match(address)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise SiteConfigError(f"{key} must be host:port, got {address!r}")
    return address


def _budget(table: Mapping[str, Any]) -> tuple[float, float]:
    epsilon = float(_get(table, "privacy.epsilon", (int, float)))
    delta = float(_get(table, "privacy.delta", (int, float)))
    if not 0 < epsilon < float("inf"):
        raise SiteConfigError(f"site.toml: privacy.epsilon must be > 0, got {epsilon:g}")
    if not 0 < delta < 1:
        raise SiteConfigError(f"site.toml: privacy.delta must be in (0, 1), got {delta:g}")
    return epsilon, delta


def _choice(kind: type[enum.StrEnum], key: str, what: str, raw: str) -> Any:
    """``raw`` as a member of ``kind``, or one error line naming ``key`` and the options."""
    try:
        return kind(raw.lower())
    except ValueError:
        options = ", ".join(m.value for m in kind)
        raise SiteConfigError(
            f"site.toml: {key}: unknown {what} {raw!r}; expected one of: {options}"
        ) from None


def _data(table: Mapping[str, Any], base: Path) -> tuple[Path, DataFormat]:
    fmt = _choice(DataFormat, "data.format", "format", _get(table, "data.format", str))
    path = (base / Path(_get(table, "data.path", str)).expanduser()).resolve()
    if not path.is_file():
        raise SiteConfigError(f"site.toml: data.path: data file not found: {path}")
    if path.suffix.lower() != f".{fmt.value}":
        raise SiteConfigError(
            f"site.toml: data.path: {path.name} does not end in .{fmt.value} (data.format)"
        )
    return path, fmt


def parse_site_config(table: Mapping[str, Any], base: Path) -> SiteConfig:
    """Validate a parsed ``site.toml``; relative paths are relative to ``base``.

    Raises:
        SiteConfigError: naming the first key at fault.
    """
    epsilon, delta = _budget(table)
    data_path, fmt = _data(table, base)
    raw_acc = str(table.get("privacy", {}).get("accountant", AccountantName.RDP.value))
    accountant = _choice(AccountantName, "privacy.accountant", "accountant", raw_acc)
    has_port = "runtime_port" in table.get("site", {})
    port = _get(table, "site.runtime_port", int) if has_port else 9094
    if not 1 <= port <= 65535:
        raise SiteConfigError(f"site.toml: site.runtime_port must be in 1..65535, got {port}")
    device = _device(table)
    return SiteConfig(
        name=_get(table, "site.name", str),
        superlink=check_address("site.toml: site.superlink", _get(table, "site.superlink", str)),
        runtime_port=port,
        data_path=data_path,
        data_format=fmt,
        epsilon=epsilon,
        delta=delta,
        accountant=accountant,
        ledger_dir=(base / Path(_get(table, "ledger.dir", str)).expanduser()).resolve(),
        device=device,
    )


def _device(table: Mapping[str, Any]) -> str:
    """``site.device`` (default ``auto``), checked against what torch sees on this machine."""
    raw = _get(table, "site.device", str) if "device" in table.get("site", {}) else "auto"
    try:
        resolve_device(raw, key="site.toml: site.device")
    except ValueError as err:
        raise SiteConfigError(str(err)) from None
    return raw.strip().lower()


def load_site_config(kit: Path) -> SiteConfig:
    """Read and validate ``kit/site.toml``."""
    path = kit / SITE_TOML
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteConfigError(f"--kit: no {SITE_TOML} in {kit}") from None
    except tomllib.TOMLDecodeError as err:
        raise SiteConfigError(f"{path}: not valid TOML: {err}") from None
    return parse_site_config(table, kit.resolve())


def node_config(cfg: SiteConfig) -> dict[str, str | float]:
    """The SuperNode's node config: name, data file, ledger folder, budget (the site's own)
    and the device it trains on."""
    keys = NODE_CONFIG_KEYS
    return {
        DEVICE_KEY: cfg.device,
        SITE_NAME_KEY: cfg.name,
        DATA_PATH: str(cfg.data_path),
        keys["site_dir"]: str(cfg.ledger_dir),
        keys["epsilon"]: cfg.epsilon,
        keys["delta"]: cfg.delta,
        keys["accountant"]: cfg.accountant.value,
    }


def toml_value(key: str, value: str | float | int | bool) -> str:
    """A value as Flower's ``key=value`` config parser reads it (a TOML scalar).

    Flower splits on ``key=('...'|"..."|\\S+)`` without escapes, so a string is
    written as a literal '...' string, or "..." when it contains a single quote;
    one containing both quotes (or a backslash in the double-quoted case, or a
    newline) cannot be expressed and is refused.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if "\n" not in value and "'" not in value:
        return f"'{value}'"
    if "\n" not in value and '"' not in value and "\\" not in value:
        return f'"{value}"'
    raise SiteConfigError(f"{key}: value {value!r} cannot be passed to Flower (quotes/newline)")


def format_config(config: Mapping[str, str | float | int | bool]) -> str:
    """``{"a": "x", "b": 1.5}`` -> ``"a='x' b=1.5"`` (Flower ``--node-config`` syntax)."""
    return " ".join(f"{k}={toml_value(k, v)}" for k, v in config.items())


def kit_file(kit: Path, name: str, *, private: bool = False) -> Path:
    """A file of the kit; a private key must not be readable by group or others."""
    path = kit / name
    if not path.is_file():
        raise SiteConfigError(
            f"--kit: {path} is missing (is {kit} a site kit from privfed provision?)"
        )
    if private and path.stat().st_mode & 0o077:
        raise SiteConfigError(
            f"{path} is readable by other users (mode {path.stat().st_mode & 0o777:o}); "
            f"run: chmod 600 {path}"
        )
    return path


def supernode_command(
    kit: Path, cfg: SiteConfig, *, superlink: str | None = None, insecure: bool = False,
    max_wait_time: float | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line for this site."""
    cmd = ["flower-supernode", "--superlink", superlink or cfg.superlink]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(kit_file(kit, CA_FILE))]
        cmd += ["--auth-supernode-private-key", str(kit_file(kit, KEY_FILE, private=True))]
    cmd += ["--host", "127.0.0.1", "--port", str(cfg.runtime_port)]
    # Flower's SuperNode installs no app dependencies unless --allow-runtime-dependency-
    # installation is given: a site runs only what its admin installed.
    cmd += ["--node-config", format_config(node_config(cfg))]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", f"{max_wait_time:g}"]
    return cmd


def prepare_ledger_dir(path: Path) -> None:
    """Create the ledger folder with mode 0700 (an existing one is narrowed to 0700)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


#: Log lines of flower-supernode that explain a refused connection, and what to say.
HINTS = (
    ("CERTIFICATE_VERIFY_FAILED",
     "the server's TLS certificate is not signed by this kit's CA (ca.pem): wrong kit "
     "or wrong server"),
    ("Failed to activate SuperNode",
     "the server refused this site's key: site.pub is not registered on the server"),
    ("Connection refused", "nothing listens at the server address"),
)


def supervise(cmd: Sequence[str], out: TextIO, hints: Sequence[tuple[str, str]] = HINTS,
              env: Mapping[str, str] | None = None) -> tuple[int, str | None]:
    """Run ``cmd`` in the foreground in its own process group; relay its log to ``out``.

    SIGTERM and SIGINT are forwarded to the child's process group (a second signal,
    or ``STOP_GRACE`` seconds without exit, kills it). Returns the exit status and
    the first hint whose marker appeared in the log (``None`` if none did).
    """
    proc = subprocess.Popen(  # noqa: S603 - a fixed executable, arguments from a parsed config
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, preexec_fn=die_with_parent,
        env=dict(env) if env is not None else tool_env(),
    )
    found: list[str] = []

    def spot_hints(line: str) -> None:
        for marker, hint in hints:
            if marker in line and hint not in found:
                found.append(hint)

    reader = relay(proc, out, spot_hints)
    with SignalForwarder(proc, STOP_GRACE) as forwarder:
        status = forwarder.wait()
    reader.join(timeout=5)
    return status, (found[0] if found else None)


@dataclass(frozen=True)
class SiteExit:
    """How the SuperNode ended: its exit status and, if it was refused, why."""

    status: int
    refused: str | None


def start_site(kit: Path, *, superlink: str | None = None, insecure: bool = False,
               max_wait_time: float | None = None, out: TextIO = sys.stdout) -> SiteExit:
    """Validate the kit, then run the SuperNode in the foreground until it exits.

    Raises:
        SiteConfigError: ``site.toml`` or the kit is unusable (nothing was started).
    """
    cfg = load_site_config(kit)
    if superlink is not None:
        check_address("--superlink", superlink)
    cmd = supernode_command(kit, cfg, superlink=superlink, insecure=insecure,
                            max_wait_time=max_wait_time)
    prepare_ledger_dir(cfg.ledger_dir)
    say = f"privfed site {cfg.name}:"
    print(f"{say} connecting to {superlink or cfg.superlink}", file=out)
    if insecure:
        print(f"{say} WARNING: --insecure: no TLS, no site authentication; the server and "
              "the network see this site's model updates in the clear", file=out)
    else:
        print(f"{say} TLS trusting CA certificate {kit / CA_FILE}; authenticating with key "
              f"{kit / KEY_FILE}", file=out)
    print(f"{say} data {cfg.data_path} ({cfg.data_format.value}); privacy budget "
          f"epsilon={cfg.epsilon:g} delta={cfg.delta:g} ({cfg.accountant.value}); ledger "
          f"{cfg.ledger_dir}; ClientApp API on 127.0.0.1:{cfg.runtime_port}", file=out)
    out.flush()
    status, hint = supervise(cmd, out)
    print(f"{say} SuperNode exited with status {status}", file=out)
    return SiteExit(status, hint if status not in (0, -signal.SIGTERM) else None)
