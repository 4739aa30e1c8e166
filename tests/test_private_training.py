"""DP-SGD inside the ClientApp: budget from the site, reserve before training, refusal."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app as client_app
from client.ledger import BudgetExhaustedError, PrivacyLedger
from client.privacy import site_node_config, train_privately
from shared.config import RunConfig
from shared.data import ArrayDataset
from shared.models import get_model
from shared.privacy import epsilon as accountant_epsilon
from shared.wire import (
    ARRAYS,
    CONFIG,
    ERROR_PRIVACY_BUDGET_EXHAUSTED,
    SERVER_ROUND,
    SITE,
    to_record,
)
from simulations.scenario import app_defaults


def run_config(tmp_path, **overrides):
    flat = {**app_defaults(), "output.dir": str(tmp_path), "data.samples": 300,
            "model.name": "logistic", "privacy.enabled": True, "federation.rounds": 3,
            **overrides}
    return flat


def small_data(n=64):
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.normal(size=(n, 40)).astype(np.float32),
                        rng.integers(0, 10, n).astype(np.int64))


def deployed_site(tmp_path, epsilon=3.0):
    return {"site-dir": str(tmp_path / "site"), "privacy-epsilon": epsilon,
            "privacy-delta": 1e-5}


def test_a_deployed_site_keeps_its_own_budget(tmp_path):
    config = RunConfig.from_flat(run_config(tmp_path, **{"privacy.epsilon": 1000.0}))
    node = deployed_site(tmp_path, epsilon=3.0)
    assert site_node_config(config, node) == node  # the run config cannot raise it


def test_a_simulated_site_gets_the_scenario_budget_and_folder(tmp_path):
    config = RunConfig.from_flat(run_config(tmp_path, **{"privacy.epsilon": 5.0}))
    node = site_node_config(config, {"partition-id": 4, "num-partitions": 10})
    assert node["site-dir"] == str(tmp_path / "sites" / "4")
    assert node["privacy-epsilon"] == 5.0 and node["privacy-delta"] == 1e-5


def test_rounds_are_recorded_and_epsilon_accumulates(tmp_path):
    config = RunConfig.from_flat(run_config(tmp_path, **{"privacy.noise_multiplier": 1.5}))
    node = deployed_site(tmp_path, epsilon=50.0)
    model, data = get_model("logistic"), small_data()
    results = [train_privately(model, data, config, node, run_id=7, server_round=r, seed=r)
               for r in (1, 2)]
    steps = config.train.epochs * 2  # 64 examples, batch 32
    assert [r.steps for r in results] == [steps, steps]
    q = 1 / 2
    expected = accountant_epsilon([(1.5, q, steps)] * 2, 1e-5)
    assert results[1].epsilon == pytest.approx(expected, rel=1e-9)
    assert results[0].epsilon < results[1].epsilon
    ledger = PrivacyLedger.read(tmp_path / "site")
    assert ledger.spent_epsilon() == pytest.approx(expected, rel=1e-9)
    assert [e.round for e in ledger.events()] == [1, 1, 2, 2]


def test_calibrated_noise_spends_the_budget_over_the_planned_rounds(tmp_path):
    config = RunConfig.from_flat(run_config(tmp_path, **{"federation.rounds": 2}))
    node = deployed_site(tmp_path, epsilon=4.0)
    model, data = get_model("logistic"), small_data()
    first = train_privately(model, data, config, node, run_id=1, server_round=1, seed=1)
    last = train_privately(model, data, config, node, run_id=1, server_round=2, seed=2)
    assert first.epsilon < 4.0 and last.epsilon == pytest.approx(4.0, rel=5e-3)
    assert last.epsilon <= 4.0


def test_budget_exhausted_refuses_without_training(tmp_path):
    config = RunConfig.from_flat(run_config(tmp_path, **{"privacy.noise_multiplier": 0.5}))
    node = deployed_site(tmp_path, epsilon=0.5)
    model, data = get_model("logistic"), small_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetExhaustedError, match="privacy budget exhausted"):
        train_privately(model, data, config, node, run_id=1, server_round=1, seed=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert PrivacyLedger.read(tmp_path / "site").events() == ()


def train_message(config_flat, server_round=1):
    torch.manual_seed(0)
    model = get_model(config_flat["model.name"])
    content = RecordDict({ARRAYS: to_record(model.state_dict()),
                          CONFIG: ConfigRecord({SERVER_ROUND: server_round})})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_client_app_replies_with_an_error_when_the_budget_is_spent(tmp_path, flower_task):
    flat = run_config(tmp_path, **{"privacy.noise_multiplier": 0.3})
    node = {**deployed_site(tmp_path, epsilon=0.2), "partition-id": 0, "num-partitions": 3}
    context = Context(run_id=5, node_id=1, node_config=node, state=RecordDict(), run_config=flat)
    reply = client_app(train_message(flat), context)
    assert reply.has_error()
    assert reply.error.code == ERROR_PRIVACY_BUDGET_EXHAUSTED
    assert "privacy budget exhausted" in reply.error.reason
    assert "budget epsilon=0.2" in reply.error.reason


def test_client_app_reports_the_sites_epsilon(tmp_path, flower_task):
    flat = run_config(tmp_path, **{"privacy.noise_multiplier": 1.0})
    node = {"partition-id": 1, "num-partitions": 3}
    context = Context(run_id=5, node_id=1, node_config=node, state=RecordDict(), run_config=flat)
    reply = client_app(train_message(flat), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    site = reply.content.config_records[SITE]
    ledger = json.loads((tmp_path / "sites" / "1" / "privacy_ledger.json").read_text())
    assert site["name"] == "1"
    assert site["epsilon"] == pytest.approx(ledger["events"][-1]["epsilon_after"])
