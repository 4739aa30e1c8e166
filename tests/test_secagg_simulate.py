"""SecAgg+ with privfed's own apps: in process against plain FedAvg, and end to end on Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from client.app import app as client_app
from kernels import dequantization_error_bound
from server.app import build_strategy
from server.loop import LoopSettings, run_rounds
from server.secagg import SecAggPlus
from shared.config import RunConfig
from shared.data import load
from shared.models import get_model
from shared.training import EvalResult
from shared.wire import from_record, to_record
from tests.fake_grid import FakeGrid
from tests.test_simulate import SMOKE, privfed

SMOKE_FLAT = {"federation.clients": 3, "federation.rounds": 1, "data.samples": 600,
              "data.partitioner": "iid", "model.name": "cnn1d"}  # fmt: skip


def _one_round(flat: dict) -> dict[str, np.ndarray]:
    config = RunConfig.from_flat(flat)
    torch.manual_seed(0)
    model = get_model(config.model.name, load(config.data).spec)
    initial = to_record(model.state_dict())
    strategy = build_strategy(config)
    if config.secagg.enabled:
        strategy = SecAggPlus(strategy, config.secagg, expected_sites=3, poll_interval=0.0)
    grid = FakeGrid(client_app, 3, config.to_flat())
    final = run_rounds(strategy, grid, initial, LoopSettings(rounds=1),
                       lambda a: EvalResult(0.0, 0.0, 0), lambda r, a: None)  # fmt: skip
    return {k: v.numpy() for k, v in from_record(final).items()}


def test_privfed_apps_secure_round_matches_plain_fedavg_within_quantization():
    plain = _one_round(SMOKE_FLAT)
    secure = _one_round({**SMOKE_FLAT, "secagg.enabled": True})
    config = RunConfig.from_flat({**SMOKE_FLAT, "secagg.enabled": True}).secagg
    examples = 3 * 144  # 600 samples: 480 train, 3 iid sites
    bound = dequantization_error_bound(config.clip_range, config.bits, examples) / examples
    err = max(float(np.abs(secure[k] - plain[k]).max()) for k in plain)
    print(f"max |secure - plain FedAvg| after one round: {err:.3g} (bound {bound:.3g})")
    assert 0 < err <= bound + 1e-6


@pytest.fixture(scope="module")
def ray_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("secagg")
    out = {}
    for name, extra in {
        "plain": [],
        "secure": ["--set", "secagg.enabled=true"],
        "dropout": ["--set", "secagg.enabled=true", "--set", "federation.clients=5",
                    "--set", "federation.rounds=3", "--set", "faults.dropout=0.3",
                    "--set", 'faults.dropout_stage="any"'],
    }.items():  # fmt: skip
        result = privfed("simulate", str(SMOKE), "--out", str(base / name), *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(x) for x in (base / name / "metrics.jsonl").read_text().splitlines()]
        out[name] = (rows, json.loads((base / name / "summary.json").read_text()))
    return out


def test_ray_secure_smoke_writes_the_files_and_learns_like_plain(ray_runs):
    rows, summary = ray_runs["secure"]
    plain_rows, plain_summary = ray_runs["plain"]
    assert [r["round"] for r in rows] == [1, 2] and summary["rounds_completed"] == 2
    assert all(r["clients_trained"] == 3 and r["failures"] == [] for r in rows)
    assert abs(summary["final_accuracy"] - plain_summary["final_accuracy"]) <= 0.02
    assert abs(rows[-1]["loss"] - plain_rows[-1]["loss"]) <= 0.01
    assert summary["config"]["secagg.enabled"] is True


def test_ray_secure_run_with_dropouts_at_any_stage_completes(ray_runs):
    rows, summary = ray_runs["dropout"]
    assert summary["rounds_completed"] == 3
    assert sum(r["clients_failed"] for r in rows) > 0  # sites did drop
    assert all(r["clients_trained"] >= 1 or r["failures"] for r in rows)
