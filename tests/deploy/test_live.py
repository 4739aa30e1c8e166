"""A real federation on 127.0.0.1: SuperLink + SuperNodes with TLS and site authentication.

Everything here is a real process (``python -m simulations.cli ...``) in its own process
group, stopped by PID at the end. One SuperLink and three sites (a, b, c) serve the
whole module; sites d and e join for the tests that kill them mid-round. Killing a
site with SIGKILL is detected by Flower's heartbeat (30 s interval, patience 2), so
each of those tests waits up to a minute by design.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from client.ledger import LEDGER_FILENAME, load
from server.provision import provision, write_site_kit
from tests.deploy.helpers import (
    PYTHON,
    SMOKE,
    Daemon,
    env,
    fill_site_toml,
    free_port,
    wait_online,
    write_site_data,
)

SITES = ["a", "b", "c", "d", "e"]


def _app_hands_back() -> bool:
    """Whether this checkout's ServerApp hands its files back through its log
    (server/app.py calls server.handback.send_results with output.return_max_bytes)."""
    root = Path(__file__).resolve().parents[2]
    return ("send_results(" in (root / "server" / "app.py").read_text()
            and "output.return_max_bytes" in (root / "pyproject.toml").read_text())


HANDS_BACK = _app_hands_back()
#: Whether the run config can declare the model's input (data.input_shape, data.num_classes).
DECLARES_SPEC = "data.input_shape" in (Path(__file__).resolve().parents[2] / "pyproject.toml"
                                       ).read_text()


class Federation:
    def __init__(self, root):
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.fed = provision(root / "fed", "localhost", SITES, ["127.0.0.1"], port=self.port)
        self.state = root / "state"
        self.flwr_home = self.state / "flwr-home"
        self.daemons: dict[str, Daemon] = {}
        self.data = {}
        for i, site in enumerate(SITES):
            self.data[site] = write_site_data(root / f"{site}.npz", i, len(SITES))
            fill_site_toml(self.fed.site_kits[site], self.data[site], self.address, free_port())

    def start_server(self):
        self.daemons["server"] = Daemon("server", [
            "server", "start", "--kit", str(self.fed.server_kit), "--state", str(self.state),
            "--host", "127.0.0.1", "--port", str(self.port)], self.root / "server.log")
        self.daemons["server"].wait_for("site keys:", timeout=120)

    def start_site(self, site):
        self.daemons[site] = Daemon(site, ["site", "start", "--kit", str(self.fed.site_kits[site])],
                                    self.root / f"{site}.log", flwr_home=self.root / f"home-{site}")
        return self.daemons[site]

    def submit(self, name, *sets, background=False):
        out = self.root / name
        args = [PYTHON, "-m", "simulations.cli", "run", "--server", self.address, "--kit",
                str(self.fed.site_kits["a"]), "--out", str(out / "local"), "--server-output",
                str(out / "server"), "--flwr-home", str(self.root / "researcher-flwr")]
        for text in [*SMOKE, *sets]:
            args += ["--set", text]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env(), start_new_session=True)
        return (proc, out) if background else (_finish(proc), out)

    def stop_all(self):
        codes = {}
        for name in [n for n in self.daemons if n != "server"] + ["server"]:
            if name in self.daemons:
                codes[name] = self.daemons[name].stop()
        return codes


def _finish(proc, timeout=400):
    text, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, text[-4000:]
    return text


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("live"))
    try:
        fed.start_server()
        for site in "abc":
            fed.start_site(site)
        wait_online(fed.flwr_home, 3)
        yield fed
    finally:
        codes = fed.stop_all()
        # Stopped cleanly by SIGTERM (the killed sites excepted).
        assert codes.get("server") in (0, None), fed.daemons["server"].text()[-2000:]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_daemons_say_which_port_and_certificate(federation):
    server = federation.daemons["server"].text()
    assert f"https://127.0.0.1:{federation.port}" in server
    assert str(federation.fed.server_kit / "server.pem") in server
    assert "site keys: a (registered), b (registered), c (registered)" in server
    site = federation.daemons["a"].text()
    assert f"connecting to {federation.address}" in site
    assert str(federation.fed.site_kits["a"] / "ca.pem") in site


def test_unregistered_key_and_wrong_ca_are_refused(federation, tmp_path):
    rogue = tmp_path / "rogue"  # same CA, but its key was never registered
    write_site_kit(rogue, "rogue", (federation.fed.ca_dir / "ca.pem").read_bytes(),
                   federation.address)
    fill_site_toml(rogue, federation.data["a"], federation.address, free_port())
    other = provision(tmp_path / "other", "localhost", ["b"])  # another federation's CA
    stranger = other.site_kits["b"]
    fill_site_toml(stranger, federation.data["b"], federation.address, free_port())
    procs = {name: subprocess.Popen(
        [PYTHON, "-m", "simulations.cli", "site", "start", "--kit", str(kit),
         "--max-wait-time", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env(), start_new_session=True) for name, kit in [("rogue", rogue),
                                                             ("stranger", stranger)]}
    results = {name: p.communicate(timeout=120) for name, p in procs.items()}
    assert procs["rogue"].returncode != 0
    assert "not registered" in results["rogue"][1], results["rogue"]
    assert procs["stranger"].returncode != 0
    assert "not signed by this kit's CA" in results["stranger"][1], results["stranger"]
    assert "No SuperNode found with the given public key" in federation.daemons["server"].text()


def test_two_rounds_over_tls_with_dp_each_site_keeps_its_data_and_its_ledger(federation):
    text, out = federation.submit("dp", "federation.clients=3", "privacy.enabled=true",
                                  "federation.fraction_evaluate=0.0")
    local = json.loads((out / "local" / "run.json").read_text())
    assert local["status"] == "finished:completed"
    assert local["rounds_completed"] == 2
    rows = _rows(out / "server" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_trained"] == 3 and r["clients_failed"] == 0 for r in rows)
    assert sorted(rows[-1]["epsilon"]) == ["a", "b", "c"]
    server_model = (out / "server" / "model.pt").read_bytes()
    assert (out / "local" / "model.pt").read_bytes() == server_model
    if HANDS_BACK:  # through the log stream alone: no file was read from the server's disk
        assert local["copied_from_server"] == []
        assert sorted(local["handed_back"]) == sorted(
            ["summary.json", "metrics.jsonl", "model.pt", "metrics.png"])
        assert local["handed_back"]["model.pt"] == {
            "bytes": len(server_model), "sha256": hashlib.sha256(server_model).hexdigest()}
        assert _rows(out / "local" / "metrics.jsonl") == rows  # the server's full rows
        run_log = (out / "local" / "run.log").read_text()
        assert "privfed-result/1" not in run_log and "receiving model.pt" in run_log
    else:  # same host: the server's files are copied
        assert "model.pt" in local["copied_from_server"]
    assert [r["round"] for r in _rows(out / "local" / "metrics.jsonl")] == [1, 2]
    for site in "abc":
        state = load(federation.fed.site_kits[site] / "ledger" / LEDGER_FILENAME)
        events = [e for e in state.events if str(e.run) == str(local["run_id"])]
        assert {e.round for e in events} == {1, 2}
        assert max(e.epsilon_after for e in events) == pytest.approx(rows[-1]["epsilon"][site])
    # No site's raw examples reach the server: its state database and outputs hold none.
    server_bytes = b"".join(p.read_bytes() for p in federation.state.glob("superlink.db*"))
    server_bytes += b"".join(p.read_bytes() for p in (out / "server").rglob("*") if p.is_file())
    for site in "abc":
        with np.load(federation.data[site]) as npz:
            assert npz["x"][0].tobytes()[:64] not in server_bytes


@pytest.mark.skipif(not DECLARES_SPEC, reason="the run config has no data.input_shape yet")
def test_the_run_declares_the_input_spec_and_each_site_checks_its_file_against_it(federation):
    import torch

    # The server holds no data file: the run states the sites' spec (MNIST-1D rows of 40).
    spec = ["federation.clients=3", "federation.rounds=1", "federation.fraction_evaluate=0.0",
            "data.dataset=npz", "data.num_classes=10", "model.name=mlp"]
    _, out = federation.submit("spec", *spec, "data.input_shape=40")
    rows = _rows(out / "server" / "metrics.jsonl")
    assert rows[0]["clients_trained"] == 3 and rows[0]["clients_failed"] == 0
    if HANDS_BACK:
        model = torch.load(out / "local" / "model.pt")
        shapes = [tuple(v.shape) for k, v in model.items() if k.endswith("weight")]
        assert shapes[0] == (256, 40) and shapes[-1] == (10, 100)
    # A declaration the sites' files do not fit: each site refuses with the reason.
    text, out = federation.submit("bad-spec", *spec, "data.input_shape=39")
    rows = _rows(out / "server" / "metrics.jsonl")
    assert rows[0]["clients_trained"] == 0 and rows[0]["clients_failed"] == 3
    assert text.count("examples have shape '40', but the run declares data.input_shape = "
                      "'39'") >= 3, text[-3000:]


def _kill_during_round(federation, site, *sets):
    daemon = federation.start_site(site)
    wait_online(federation.flwr_home, 4)
    # One round, no federated evaluation: the round the site dies in is what is tested.
    proc, out = federation.submit(f"kill-{site}", "federation.clients=3", "federation.rounds=1",
                                  "federation.fraction_evaluate=0.0", *sets, background=True)
    daemon.wait_for("Receiving: train message", timeout=240)
    (supernode,) = daemon.children()
    os.killpg(supernode, signal.SIGKILL)  # the SuperNode and its ClientApp, as in a crash
    _finish(proc)
    return _rows(out / "server" / "metrics.jsonl"), out


def test_a_site_killed_mid_round_without_secagg_the_round_completes_with_the_rest(federation):
    limit = ["output.return_max_bytes=4096"] if HANDS_BACK else []  # the model is ~26 KB
    rows, out = _kill_during_round(federation, "d", *limit)
    assert len(rows) == 1
    assert rows[0]["clients_trained"] == 3 and rows[0]["clients_failed"] == 1
    if HANDS_BACK:  # over the limit: the model stays on the server and run.json says where
        local = json.loads((out / "local" / "run.json").read_text())
        model = out / "server" / "model.pt"
        assert "model.pt" not in local["handed_back"]
        assert local["held_on_server"]["model.pt"]["path"] == str(model.resolve())
        assert local["held_on_server"]["model.pt"]["sha256"] == hashlib.sha256(
            model.read_bytes()).hexdigest()
        assert "summary.json" in local["handed_back"]


def test_a_site_killed_mid_round_with_secagg_dropout_tolerance_completes_it(federation):
    rows, _ = _kill_during_round(federation, "e", "secagg.enabled=true")
    assert len(rows) == 1
    assert rows[0]["clients_trained"] == 3 and rows[0]["clients_failed"] == 1


def test_server_without_tls_starts_only_with_insecure_and_warns(tmp_path):
    port = str(free_port())
    server = Daemon("insecure", ["server", "start", "--state", str(tmp_path / "state"),
                                 "--host", "127.0.0.1", "--port", port, "--insecure"],
                    tmp_path / "insecure.log")
    try:
        server.wait_for("Uvicorn running on http://127.0.0.1:" + port, timeout=120)
        assert "WARNING: --insecure: no TLS and no site authentication" in server.text()
    finally:
        assert server.stop() == 0, server.text()[-2000:]  # SIGTERM: a clean stop
