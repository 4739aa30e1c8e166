"""Provision a federation: a CA, the server's TLS identity, one authentication key per site.

``provision(out, server_name, sites)`` writes::

    OUT/ca/            ca.pem, ca.key          the federation CA (keep offline; no kit has ca.key)
    OUT/server/        ca.pem, server.pem, server.key, sites/<site>.pub, server.toml
    OUT/sites/<site>/  ca.pem, site.key, site.pub, site.toml

Guarantees:

* Every private key file is created with mode 0600 (``O_CREAT | O_EXCL``, never
  chmod-ed after the fact) and exists in exactly one folder: ``server.key`` only in
  the server kit, ``site.key`` only in that site's kit, ``ca.key`` in no kit.
* The server certificate is signed by the CA, is valid for TLS server auth, and
  lists every name and IP given as a SAN, plus ``localhost`` and ``127.0.0.1``
  (the SuperLink's own ServerApp process connects to it through the loopback).
* Site keys are ECDSA P-384 in OpenSSH format: what ``flower-supernode
  --auth-supernode-private-key`` loads and ``flwr supernode register`` accepts.
* Nothing is overwritten: an existing, non-empty ``OUT`` is refused.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Default port of the SuperLink (Fleet, Control and Runtime APIs share it in Flower 1.41).
DEFAULT_PORT = 9092
CA_DAYS = 3650
SERVER_DAYS = 825
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_LOOPBACK_NAMES = ("localhost",)
_LOOPBACK_IPS = ("127.0.0.1",)


class ProvisionError(ValueError):
    """The provisioning request is invalid; the message names the option at fault."""


@dataclass(frozen=True)
class Federation:
    """Where ``provision`` put everything."""

    root: Path
    ca_dir: Path
    server_kit: Path
    site_kits: dict[str, Path]


def parse_sites(text: str) -> list[str]:
    """``"a,b,c"`` -> ``["a", "b", "c"]``; refuses empty, duplicate or unsafe names."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ProvisionError("--sites: give at least one site name, e.g. --sites a,b,c")
    for name in names:
        if not _SITE_NAME.match(name):
            raise ProvisionError(
                f"--sites: invalid site name {name!r} (letters, digits, '.', '_', '-'; "
                "start with a letter or digit)"
            )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ProvisionError(f"--sites: duplicate site name(s): {', '.join(dupes)}")
    return names


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Create ``path`` exclusively; a private file is 0600 from its first byte."""
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # umask may have narrowed a public file; never widens a private one


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA allowed to sign end-entity certificates only (path length 0)."""
    key = _new_ec_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def server_sans(names: Sequence[str], ips: Sequence[str]) -> list[x509.GeneralName]:
    """SANs for the server: the given DNS names and IPs plus the loopback ones, deduplicated."""
    sans: list[x509.GeneralName] = []
    for name in dict.fromkeys([*names, *_LOOPBACK_NAMES]):
        sans.append(x509.DNSName(name))
    for ip in dict.fromkeys([*ips, *_LOOPBACK_IPS]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ProvisionError(f"--server-ip: not an IP address: {ip!r}") from None
    return sans


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: Sequence[str],
    ips: Sequence[str],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for ``names``/``ips`` (plus loopback), signed by the CA."""
    key = _new_ec_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(server_sans(names, ips)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_site_key() -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: (OpenSSH private key, OpenSSH public key line)."""
    key = _new_ec_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def site_toml_template(site: str, server_address: str) -> str:
    """The ``site.toml`` a site admin fills in (data file, budget, ledger folder)."""
    return f"""\
# privfed site configuration for site "{site}".
# Fill in [data] and check [privacy]; then: privfed site start --kit <this folder>
# Relative paths are relative to this file's folder.

[site]
name = "{site}"
superlink = "{server_address}"   # the aggregation server, host:port
runtime_port = 9094              # local port of this SuperNode's ClientApp API (127.0.0.1)
device = "auto"                  # where to train: auto (a GPU if torch sees one), cpu, cuda, cuda:N

[data]
path = "/path/to/{site}.npz"     # this site's data file; it never leaves this machine
format = "npz"                   # npz (arrays x, y) or csv (header row, label column)

[privacy]
epsilon = 8.0                    # this site's total privacy budget, over all runs
delta = 1e-5
accountant = "rdp"               # rdp or prv

[ledger]
dir = "ledger"                   # privacy ledger folder (created 0700)
"""


def write_site_kit(kit: Path, site: str, ca_pem: bytes, server_address: str) -> bytes:
    """Create a site kit in the new folder ``kit``; return the site's public key line."""
    private, public = make_site_key()
    kit.mkdir(parents=True, mode=0o700)
    _write(kit / "ca.pem", ca_pem, private=False)
    _write(kit / "site.key", private, private=True)
    _write(kit / "site.pub", public, private=False)
    _write(kit / "site.toml", site_toml_template(site, server_address).encode(), private=False)
    return public


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ProvisionError(f"--out: {out} exists and is not empty; refusing to overwrite keys")


def provision(
    out: Path, server_name: str, sites: Sequence[str], server_ips: Sequence[str] = (),
    port: int = DEFAULT_PORT,
) -> Federation:
    """Write the CA, the server kit and one kit per site under ``out`` (see module doc).

    Raises:
        ProvisionError: ``out`` is not empty, a site name or IP is invalid.
    """
    if not server_name or any(c.isspace() for c in server_name):
        raise ProvisionError(f"--server-name: invalid host name {server_name!r}")
    sites = parse_sites(",".join(sites))
    server_sans([server_name], server_ips)  # validates the IPs before anything is written
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key, ca_cert = make_ca(f"privfed federation CA ({server_name})")
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ca_dir, server_kit = out / "ca", out / "server"
    ca_dir.mkdir(mode=0o700)
    _write(ca_dir / "ca.pem", ca_pem, private=False)
    _write(ca_dir / "ca.key", _pem_key(ca_key), private=True)

    server_key, server_cert = make_server_cert(ca_key, ca_cert, [server_name], server_ips)
    (server_kit / "sites").mkdir(parents=True, mode=0o700)
    _write(server_kit / "ca.pem", ca_pem, private=False)
    _write(server_kit / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM),
           private=False)
    _write(server_kit / "server.key", _pem_key(server_key), private=True)

    address = f"{server_name}:{port}"
    site_kits = {}
    for site in sites:
        kit = out / "sites" / site
        public = write_site_kit(kit, site, ca_pem, address)
        _write(server_kit / "sites" / f"{site}.pub", public, private=False)
        site_kits[site] = kit
    _write(server_kit / "server.toml", _server_toml(server_name, port, sites).encode(),
           private=False)
    return Federation(out, ca_dir, server_kit, site_kits)


def _server_toml(server_name: str, port: int, sites: Sequence[str]) -> str:
    listed = ", ".join(f'"{s}"' for s in sites)
    return (
        "# privfed server kit: privfed server start --kit <this folder> --state <state folder>\n"
        f'server_name = "{server_name}"\nport = {port}\nsites = [{listed}]\n'
    )
