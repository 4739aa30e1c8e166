"""The real apps on an in-process Grid: byzantine sites are caught, a crashed server resumes."""

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from client.app import app as client_app
from server.app import app as server_app
from server.checkpoint import CheckpointStore
from simulations.scenario import app_defaults
from tests.fake_grid import FakeGrid

SITES = 5


def flat(out, **overrides):
    return {**app_defaults(), "output.dir": str(out), "federation.clients": SITES,
            "federation.rounds": 3, "data.dataset": "digits", "model.name": "mlp",
            "data.partitioner": "iid", "train.epochs": 2,
            "train.lr": 0.01, **overrides}


def run(config, grid=None):
    grid = grid or FakeGrid(client_app, SITES, config)
    context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(config))
    server_app(grid, context)
    out = Path(config["output.dir"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text()), torch.load(out / "model.pt")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return run(flat(tmp_path_factory.mktemp("clean")))


@pytest.mark.parametrize("kind, reason", [("nan", "non_finite"), ("shape", "wrong_shape"),
                                          ("norm", "norm_too_large")])
def test_byzantine_replies_are_rejected_and_accuracy_holds(tmp_path, clean, kind, reason):
    config = flat(tmp_path, **{"faults.byzantine": 0.2, "faults.byzantine_kind": kind,
                               "robust.max_update_norm": 50.0})
    rows, summary, _ = run(config)
    assert all(r["rejected"] == {reason: 1} for r in rows)
    assert all(r["clients_trained"] == SITES - 1 for r in rows)
    assert summary["rejected"] == {reason: 3}
    assert abs(summary["final_accuracy"] - clean[1]["final_accuracy"]) <= 0.01  # 1 point


def test_a_crashing_site_is_a_failed_reply_not_a_failed_round(tmp_path):
    rows, _, _ = run(flat(tmp_path, **{"faults.byzantine": 0.2, "faults.byzantine_kind": "crash"}))
    assert all(r["clients_failed"] == 1 and r["clients_trained"] == SITES - 1 for r in rows)
    assert all("simulated crash" in " ".join(r["failures"]) for r in rows)


def test_too_few_valid_replies_skip_the_round_and_keep_the_model(tmp_path):
    config = flat(tmp_path, **{"faults.byzantine": 0.6, "faults.byzantine_kind": "nan",
                               "federation.min_train": 3, "federation.rounds": 2})
    rows, _, model = run(config)
    assert [r["clients_trained"] for r in rows] == [2, 2]
    assert rows[0]["accuracy"] == rows[1]["accuracy"]  # the model never moved
    assert all(torch.isfinite(v).all() for v in model.values())


def test_norm_bounding_limits_every_update(tmp_path):
    config = flat(tmp_path, **{"faults.byzantine": 0.2, "faults.byzantine_kind": "norm",
                               "robust.norm_bound": 1.0, "federation.rounds": 1})
    rows, summary, _ = run(config)
    assert rows[0]["rejected"] == {}  # accepted but scaled down to the bound
    assert summary["final_accuracy"] > 0.1


class CrashAfter(FakeGrid):
    """A server host that dies after ``rounds`` training exchanges."""

    def __init__(self, *args, rounds, **kwargs):
        super().__init__(*args, **kwargs)
        self.left = 2 * rounds  # one train and one evaluate exchange per round

    def send_and_receive(self, messages, *, timeout=None):
        if self.left == 0:
            raise SystemExit("server host lost power")
        self.left -= 1
        return super().send_and_receive(messages, timeout=timeout)


def test_resume_continues_after_the_last_checkpoint_and_ends_where_an_uninterrupted_run_does(
    tmp_path, clean
):
    config = flat(tmp_path)
    with pytest.raises(SystemExit):
        run(config, CrashAfter(client_app, SITES, config, rounds=2))
    assert [p.name for p in CheckpointStore(tmp_path).files()][-1] == "round-000002.ckpt"
    resumed = {**config, "output.resume": True}
    rows, summary, model = run(resumed)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert summary["resumed_after_round"] == 2
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in clean[0]]
    assert all(torch.equal(model[k], clean[2][k]) for k in model)  # bit-identical


def test_resume_refuses_a_changed_run_config(tmp_path):
    config = flat(tmp_path, **{"federation.rounds": 1})
    run(config)
    changed = {**config, "output.resume": True, "train.lr": 0.5}
    with pytest.raises(Exception, match="differs from the checkpoint's in train.lr"):
        run(changed)


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    config = flat(tmp_path, **{"federation.rounds": 2})
    run(config)
    store = CheckpointStore(tmp_path)
    newest = store.files()[-1]
    newest.write_bytes(newest.read_bytes()[:-7])
    rows, summary, _ = run({**config, "output.resume": True})
    assert summary["resumed_after_round"] == 1 and [r["round"] for r in rows] == [1, 2]
