"""End to end: `privfed simulate` on the in-process backend and on Ray, and its bad inputs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from simulations.scenario import SCENARIO_DIR

SMOKE = SCENARIO_DIR / "smoke.toml"


def privfed(*args, timeout=240):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "out"
    result = privfed("simulate", str(SMOKE), "--out", str(out),
                     "--set", "federation.rounds=2", "--set", "data.samples=500")
    return result, out


def test_smoke_scenario_runs_end_to_end(smoke_run):
    result, out = smoke_run
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0
        assert row["clients_trained"] == 3 and row["clients_failed"] == 0
        # The sites trained on the scenario's data (500 samples -> 400 train, 10% held
        # out), which proves the override reached every virtual site.
        assert 355 <= row["examples_trained"] <= 365
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["wall_seconds"] > 0
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model.pt").stat().st_size > 0
    last = json.loads(result.stdout[result.stdout.index("{"):])
    assert last["final_accuracy"] == summary["final_accuracy"]


#: One scenario run on both backends: 2 of 4 sites sampled per round, some drop out, 3 rounds.
CROSS = ("--set", "federation.rounds=3", "--set", "data.samples=500",
         "--set", "federation.clients=4", "--set", "federation.fraction_train=0.5",
         "--set", "faults.dropout=0.3", "--set", "faults.crash=0.4")  # fmt: skip


@pytest.fixture(scope="module")
def cross_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    results = {}
    for backend in ("inprocess", "ray"):
        result = privfed("simulate", str(SMOKE), "--out", str(root / backend),
                         "--backend", backend, *CROSS)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        results[backend] = root / backend
    return results


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_inprocess_and_ray_give_the_bit_identical_model(cross_runs):
    ours = torch.load(cross_runs["inprocess"] / "model.pt")
    ray = torch.load(cross_runs["ray"] / "model.pt")
    assert list(ours) == list(ray)
    for key in ours:
        assert torch.equal(ours[key], ray[key]), key


def test_inprocess_and_ray_write_the_same_metrics_and_faults(cross_runs):
    ours, ray = _rows(cross_runs["inprocess"]), _rows(cross_runs["ray"])
    assert len(ours) == len(ray) == 3
    assert sum(r["clients_failed"] for r in ours) > 0  # the dropouts happened
    # Node ids differ (Flower draws them at random on Ray) and Ray wraps the site's
    # exception in a RayTaskError with its traceback; which sites failed, and why, do not.
    def strip(failures):
        pattern = r"site \d+ (?:dropped out of|crashed after training in) round \d+"
        return [sorted(set(re.findall(pattern, f))) for f in failures]

    reasons = " ".join(f for r in ours for f in r["failures"])
    assert "dropped out of round" in reasons and "crashed after training in round" in reasons

    for a, b in zip(ours, ray, strict=True):
        for key in ("round", "clients_trained", "clients_failed", "examples_trained",
                    "accuracy"):  # fmt: skip
            assert a[key] == b[key], key
        # The server's own float reductions (central loss) may use another thread count.
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert strip(a["failures"]) == strip(b["failures"])
    summary = json.loads((cross_runs["ray"] / "summary.json").read_text())
    assert summary["backend"] == "ray" and summary["rounds_completed"] == 3


def test_smoke_model_learns_something(smoke_run):
    _, out = smoke_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 2.30  # below chance-level cross-entropy ln(10)


def test_existing_output_folder_is_not_overwritten(smoke_run):
    _, out = smoke_run
    result = privfed("simulate", str(SMOKE), "--out", str(out))
    assert result.returncode != 0
    assert "already holds a run" in result.stderr


def _one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("privfed: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["nope.toml"], ["scenario file not found", "nope.toml"]),
        ([str(SMOKE), "--set", "model.name=vgg"], ["model.name", "unknown model 'vgg'"]),
        ([str(SMOKE), "--set", "data.dataset=imagenet"], ["data.dataset", "imagenet"]),
        ([str(SMOKE), "--set", "federation.rounds=many"], ["federation.rounds", "integer"]),
        ([str(SMOKE), "--set", "federation.clients=0"], ["federation.clients must be >= 1"]),
        ([str(SMOKE), "--set", "federation.rouns=2"], ["unknown config key", "federation.rouns"]),
        ([str(SMOKE), "--set", "rounds"], ["--set expects section.key=value"]),
        ([str(SMOKE), "--backend", "spark"], ["--backend", "'spark'", "inprocess, ray"]),
        ([str(SMOKE), "--workers", "-1"], ["--workers must be >= 0"]),
        ([str(SMOKE), "--backend", "ray", "--workers", "2"], ["--workers", "--backend ray"]),
        ([str(SMOKE), "--ray-address", "auto"], ["--ray-address needs --backend ray"]),
    ],
)
def test_bad_input_gives_one_line_and_no_traceback(args, fragments):
    _one_line_error(privfed("simulate", *args), *fragments)


def test_site_file_without_labels_is_named(tmp_path):
    data = tmp_path / "site.npz"
    np.savez(data, x=np.zeros((20, 4), dtype=np.float32))
    result = privfed("simulate", str(SMOKE), "--set", "data.dataset=npz",
                     "--set", f"data.path={json.dumps(str(data))}", "--set", "model.name=mlp")
    _one_line_error(result, str(data), "no y array")


def test_debug_shows_the_traceback():
    result = privfed("simulate", "nope.toml", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_invalid_toml_scenario(tmp_path):
    bad = Path(tmp_path / "bad.toml")
    bad.write_text("[federation\n")
    _one_line_error(privfed("simulate", str(bad)), "not valid TOML")


def test_smoke_with_privacy_reports_epsilon_per_site(tmp_path):
    out = tmp_path / "dp"
    result = privfed("simulate", str(SMOKE), "--out", str(out), "--set", "privacy.enabled=true",
                     "--set", "privacy.epsilon=4.0", "--set", "data.samples=500")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["epsilon"]) for r in rows] == [["0", "1", "2"]] * 2
    for site in ("0", "1", "2"):
        first, last = rows[0]["epsilon"][site], rows[1]["epsilon"][site]
        assert 0 < first < last <= 4.0
        shown = privfed("ledger", "show", "--site-dir", str(out / "sites" / site), "--json")
        assert shown.returncode == 0, shown.stderr
        ledger = json.loads(shown.stdout)
        assert ledger["budget"] == {"epsilon": 4.0, "delta": 1e-5}
        assert ledger["spent_epsilon"] == pytest.approx(last)
        assert [e["round"] for e in ledger["events"]] == [1, 1, 2, 2]
    assert "epsilon 0:" in result.stdout  # the progress display shows it per site


def test_sigkill_mid_run_then_resume_ends_with_the_uninterrupted_model(tmp_path):
    import signal
    import time

    import torch

    # Every site replies 0.5 s late (a sleep, the model is unchanged): a round lasts longer
    # than the 50 ms poll below, so the kill lands in round 3 (smoke rounds alone take tens
    # of ms: rounds 3 and 4 could finish between two polls).
    args = ["simulate", str(SMOKE), "--set", "federation.rounds=4", "--set", "data.samples=500",
            "--set", "faults.slow=1.0", "--set", "faults.slow_seconds=0.5"]
    clean = tmp_path / "clean"
    assert privfed(*args, "--out", str(clean)).returncode == 0
    crashed = tmp_path / "crashed"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", *args, "--out", str(crashed)],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = crashed / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole simulation, mid round 3
    proc.wait()
    before = metrics.read_text().splitlines()[:2]
    assert not (crashed / "summary.json").exists()

    result = privfed("simulate", "--resume", str(crashed))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["resumed_after_round"] in (2, 3)
    rows = metrics.read_text().splitlines()
    assert rows[:2] == before  # rounds 1 and 2 were not redone
    assert [json.loads(r)["round"] for r in rows] == [1, 2, 3, 4]
    a, b = torch.load(clean / "model.pt"), torch.load(crashed / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_folder_without_checkpoints_is_one_line(tmp_path):
    _one_line_error(privfed("simulate", "--resume", str(tmp_path)), "no checkpoint")


def test_evaluate_every_k_rounds_and_always_the_last(tmp_path):
    out = tmp_path / "out"
    result = privfed("simulate", str(SMOKE), "--out", str(out), "--set", "federation.rounds=5",
                     "--set", "data.samples=500", "--set", "federation.evaluate_every=2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out)
    evaluated = [r["round"] for r in rows if r["accuracy"] is not None]
    assert evaluated == [2, 4, 5]
    assert all(r["clients_trained"] == 3 for r in rows)  # every round still trains
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] == rows[-1]["accuracy"] is not None
