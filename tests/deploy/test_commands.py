"""site.toml validation (one line naming the key), node config, and the daemons' command lines."""

import tomllib

import numpy as np
import pytest
import torch
from flwr.common.config import parse_config_args

from client.site import (
    SiteConfigError,
    format_config,
    load_site_config,
    node_config,
    supernode_command,
)
from server.deploy import DeployError, load_server_kit, superlink_command
from server.provision import provision
from tests.deploy.helpers import privfed


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return provision(tmp_path_factory.mktemp("cmd") / "fed", "fl.example.org", ["a"])


@pytest.fixture
def kit(fed, tmp_path):
    """Site a's kit with a filled-in site.toml and a data file whose path has a space."""
    data = tmp_path / "site data" / "a.npz"
    data.parent.mkdir()
    np.savez(data, x=np.zeros((4, 3), np.float32), y=np.array([0, 1, 0, 1]))
    kit = tmp_path / "kit"
    kit.mkdir()
    for name in ("ca.pem", "site.key"):
        (kit / name).write_bytes((fed.site_kits["a"] / name).read_bytes())
        (kit / name).chmod((fed.site_kits["a"] / name).stat().st_mode)
    text = (fed.site_kits["a"] / "site.toml").read_text()
    (kit / "site.toml").write_text(text.replace('"/path/to/a.npz"', f'"{data}"'))
    return kit


def _edit(kit, old, new):
    text = (kit / "site.toml").read_text()
    assert old in text
    (kit / "site.toml").write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('path = "', 'path = "/nowhere/x.npz" #', "data.path"),
        ('format = "npz"', 'format = "parquet"', "data.format"),
        ('format = "npz"', 'format = "csv"', "data.path"),  # suffix disagrees with format
        ("epsilon = 8.0", "epsilon = 0", "privacy.epsilon"),
        ("epsilon = 8.0", "epsilon = -1.5", "privacy.epsilon"),
        ("delta = 1e-5", "delta = 0.0", "privacy.delta"),
        ("epsilon = 8.0", 'epsilon = "eight"', "privacy.epsilon"),
        ('accountant = "rdp"', 'accountant = "gdp"', "privacy.accountant"),
        ('superlink = "fl.example.org:9092"', 'superlink = "fl.example.org"', "site.superlink"),
        ('device = "auto"', 'device = "gpu"', "site.device"),
        ('device = "auto"', "device = 1", "site.device"),
    ],
)
def test_a_bad_site_toml_gives_one_line_naming_the_key(kit, old, new, key):
    _edit(kit, old, new)
    with pytest.raises(SiteConfigError) as err:
        load_site_config(kit)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_site_device_asking_for_a_gpu_torch_cannot_see_is_refused_by_key(kit, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _edit(kit, 'device = "auto"', 'device = "cuda"')
    with pytest.raises(SiteConfigError, match=r"site\.device: 'cuda' asked for, but torch sees no"):
        load_site_config(kit)
    _edit(kit, 'device = "cuda"', 'device = "CPU"')
    assert load_site_config(kit).device == "cpu"


def test_cli_reports_a_bad_site_toml_in_one_line_before_starting_anything(kit):
    _edit(kit, "epsilon = 8.0", "epsilon = -1.0")
    result = privfed("site", "start", "--kit", str(kit))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "privfed: error: site.toml: privacy.epsilon must be > 0, got -1"]
    assert not (kit / "ledger").exists()


def test_node_config_survives_flowers_parser_with_spaces_and_quotes(kit):
    cfg = load_site_config(kit)
    assert parse_config_args([format_config(node_config(cfg))]) == node_config(cfg)
    tricky = {"data-path": "/srv/it's here/a.npz", "site-dir": "/srv/x y", "privacy-epsilon": 2.5}
    assert parse_config_args([format_config(tricky)]) == tricky
    with pytest.raises(SiteConfigError, match="data-path"):
        format_config({"data-path": "/a'b\"c"})


def test_supernode_command_line(kit):
    cfg = load_site_config(kit)
    cmd = supernode_command(kit, cfg)
    assert cmd[:3] == ["flower-supernode", "--superlink", "fl.example.org:9092"]
    assert cmd[cmd.index("--root-certificates") + 1] == str(kit / "ca.pem")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(kit / "site.key")
    assert cmd[cmd.index("--port") + 1] == "9094"
    parsed = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert parsed == {"site-name": "a", "data-path": str(cfg.data_path),
                      "site-dir": str(kit.resolve() / "ledger"), "privacy-epsilon": 8.0,
                      "privacy-delta": 1e-5, "privacy-accountant": "rdp", "device": "auto"}
    assert "--insecure" not in cmd
    insecure = supernode_command(kit, cfg, superlink="10.1.1.1:1", insecure=True)
    assert "--insecure" in insecure and "--root-certificates" not in insecure
    (kit / "site.key").chmod(0o644)
    with pytest.raises(SiteConfigError, match="chmod 600"):
        supernode_command(kit, cfg)


def test_superlink_command_line_has_tls_auth_and_sqlite(fed, tmp_path):
    kit = load_server_kit(fed.server_kit, insecure=False)
    assert list(kit.site_keys) == ["a"]
    cmd = superlink_command(kit, tmp_path, "127.0.0.1", 9999)
    for flag, value in [("--ssl-ca-certfile", fed.server_kit / "ca.pem"),
                        ("--ssl-certfile", fed.server_kit / "server.pem"),
                        ("--ssl-keyfile", fed.server_kit / "server.key"),
                        ("--database", tmp_path / "superlink.db"), ("--port", 9999)]:
        assert cmd[cmd.index(flag) + 1] == str(value)
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    insecure = superlink_command(load_server_kit(None, insecure=True), tmp_path, "127.0.0.1", 1)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure


def test_server_refuses_to_start_without_tls(fed, tmp_path):
    with pytest.raises(DeployError, match="--insecure"):
        load_server_kit(None, insecure=False)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "ca.pem").write_bytes((fed.server_kit / "ca.pem").read_bytes())
    with pytest.raises(DeployError, match="server.pem"):
        load_server_kit(partial, insecure=False)
    result = privfed("server", "start", "--state", str(tmp_path / "state"), "--port", "1")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "needs TLS" in result.stderr and "--insecure" in result.stderr


def test_provisioned_template_is_valid_toml(fed):
    table = tomllib.loads((fed.site_kits["a"] / "site.toml").read_text())
    assert table["site"]["superlink"] == "fl.example.org:9092"
