"""privfed provision: file modes, key custody, SANs, a chain that verifies, Flower-loadable keys."""

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from server.provision import ProvisionError, provision

SITES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    out = tmp_path_factory.mktemp("prov") / "fed"
    return provision(out, "fl.example.org", SITES, ["10.0.0.7"])


def _files(root):
    return [p for p in root.rglob("*") if p.is_file()]


def test_private_keys_are_0600_and_everything_else_is_not_private(fed):
    for path in _files(fed.root):
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.suffix == ".key":
            assert mode == 0o600, path
        else:
            assert mode & 0o077 != 0o077, path  # readable certificates, configs, public keys


def test_each_private_key_lives_in_exactly_one_kit(fed):
    keys = {p: p.read_bytes() for p in _files(fed.root) if p.suffix == ".key"}
    assert len(keys) == 2 + len(SITES)  # ca.key, server.key, one per site
    for path, content in keys.items():
        holders = [p for p in _files(fed.root) if p.read_bytes() == content]
        assert holders == [path]
    assert [p.name for p in fed.server_kit.rglob("*.key")] == ["server.key"]
    for kit in fed.site_kits.values():
        assert sorted(p.name for p in kit.iterdir()) == ["ca.pem", "site.key", "site.pub",
                                                         "site.toml"]
    assert not any(p.name == "ca.key" for kit in [fed.server_kit, *fed.site_kits.values()]
                   for p in kit.rglob("*"))


def test_server_certificate_chains_to_the_ca_with_the_requested_sans(fed):
    ca = x509.load_pem_x509_certificate((fed.ca_dir / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((fed.server_kit / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)  # raises on a bad signature or issuer
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("127.0.0.1")}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    for kit in [fed.server_kit, *fed.site_kits.values()]:
        assert (kit / "ca.pem").read_bytes() == (fed.ca_dir / "ca.pem").read_bytes()


def test_site_keys_are_what_flower_loads_and_the_server_holds_their_public_halves(fed):
    for site, kit in fed.site_kits.items():
        private = load_ssh_private_key((kit / "site.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        public = load_ssh_public_key((fed.server_kit / "sites" / f"{site}.pub").read_bytes())
        assert uses_nist_ec_curve(public)
        assert public.public_numbers() == private.public_key().public_numbers()


def test_refuses_to_overwrite_and_bad_input_names_the_option(tmp_path, fed):
    with pytest.raises(ProvisionError, match="--out"):
        provision(fed.root, "x", ["a"])
    with pytest.raises(ProvisionError, match="--sites"):
        provision(tmp_path / "n1", "x", ["a", "a"])
    with pytest.raises(ProvisionError, match="--sites"):
        provision(tmp_path / "n2", "x", ["../evil"])
    with pytest.raises(ProvisionError, match="--server-ip"):
        provision(tmp_path / "n3", "x", ["a"], ["not-an-ip"])
    assert not (tmp_path / "n3").exists()  # nothing written on bad input
