"""`privfed ledger show` (client.ledger_cli.ledger_app) per ../shared/INTERFACES.md."""

import json

import pytest
from typer.testing import CliRunner

from client.ledger import LEDGER_FILENAME, PlannedRound, open_site_ledger
from client.ledger_cli import ledger_app

runner = CliRunner()


@pytest.fixture
def site(tmp_path):
    cfg = {"site-dir": str(tmp_path), "privacy-epsilon": 3.0, "privacy-delta": 1e-5}
    ledger = open_site_ledger(cfg)
    ledger.commit(ledger.reserve(PlannedRound(1, 1, 1.0, 0.01, 100)), 90)
    ledger.reserve(PlannedRound(1, 2, 1.2, 0.01, 100))
    return tmp_path


def test_json_shape(site):
    result = runner.invoke(ledger_app, ["show", "--site-dir", str(site), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["budget"] == {"epsilon": 3.0, "delta": 1e-5}
    assert len(report["events"]) == 3
    for event in report["events"]:
        assert {"run", "round", "noise_multiplier", "sample_rate", "steps", "epsilon_after"} <= set(
            event
        )
    assert report["spent_epsilon"] == pytest.approx(report["events"][-1]["epsilon_after"])
    assert [e["status"] for e in report["events"]] == ["reserved", "committed", "reserved"]


def test_human_table(site):
    result = runner.invoke(ledger_app, ["show", "--site-dir", str(site)])
    assert result.exit_code == 0, result.output
    assert "committed" in result.stdout and "spent epsilon" in result.stdout


def test_missing_ledger_is_one_line_error(tmp_path):
    result = runner.invoke(ledger_app, ["show", "--site-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0
    assert "no privacy ledger at" in result.stderr and "Traceback" not in result.output


def test_corrupt_ledger_is_one_line_error_naming_the_file(site):
    path = site / LEDGER_FILENAME
    path.write_text(path.read_text()[:-40])
    result = runner.invoke(ledger_app, ["show", "--site-dir", str(site), "--json"])
    assert result.exit_code == 1
    assert str(path) in result.stderr and result.stderr.strip().count("\n") == 0
    assert result.stdout == ""
