"""Simulation throughput: privfed in-process vs privfed on Ray vs pfl-research, one run.

``python -m benchmarks.simulation [--json] [--rounds N] [--pfl-python PATH] [--skip ARM ...]``

The workload of ``../shared/baselines/flwr_throughput.py``: 100 sites x 200 samples of
100 Gaussian features and 10 labels, the MLP 100-256-100-10 (52,566 parameters), 10 sites
per round, 1 local epoch of SGD (batch 32, lr 0.05, no momentum), 10 rounds, no federated
evaluation. privfed runs its unchanged ServerApp and ClientApp; like the pfl baseline (which
never evaluates) it evaluates only at the end: ``federation.evaluate_every`` = rounds, so
the server evaluates the final model on its 5,000-example test split once, after the last
round (inside the timed rounds). pfl-research runs ``pfl_throughput.py`` from the
baselines in its own virtual environment.

Every arm is one fresh process (``privfed simulate`` or the pfl script). Figures:

* ``updates_per_s``: client updates / seconds from the start of round 1 to the end of the
  last round (privfed: the server's round times, start-up of workers or Ray actors
  included in round 1; pfl: its algorithm run);
* ``steady_updates_per_s``: the same without round 1 (privfed arms);
* ``process_s``: the whole process, interpreter start and imports included.

The in-process arms (all cores, one worker) and pfl run ``--repeat`` times, interleaved,
and report medians (other users' load drifts during a run); Ray, DP and SecAgg run once.
pfl-research needs its own environment (it pins its own torch), e.g.
``python3 -m venv /tmp/pflvenv && /tmp/pflvenv/bin/pip install torch==2.13.0
'pfl[pytorch]'``; pass ``--pfl-python`` (default ``/tmp/pflvenv/bin/python`` or
``$PRIVFED_PFL_PYTHON``).

The last stdout line is one JSON object: ``updates_per_s`` per arm, ``vs_pfl`` and
``vs_flower_ray`` (in-process all cores / the other arm; > 1 means privfed in-process is
faster), ``process_s`` per arm, and the DP and SecAgg arms on the in-process backend.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import emit

SITES, PER_SITE, FEATURES, CLASSES, COHORT = 100, 200, 100, 10, 10
BASELINES = Path(__file__).resolve().parents[2] / "shared" / "baselines"
DEFAULT_PFL_PYTHON = Path("/tmp/pflvenv/bin/python")
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}  # fmt: skip


def write_data(folder: Path) -> Path:
    """The pooled site file: 100 x 200 training rows plus a 20% test split (25,000 rows).

    Rows are drawn like the baselines' ``user_data``: Gaussian features, uniform labels.
    """
    rows = SITES * PER_SITE * 5 // 4  # privfed holds out 20% of a pooled file as test set
    g = np.random.default_rng(0)
    path = folder / "throughput.npz"
    np.savez(path, x=g.standard_normal((rows, FEATURES), dtype=np.float32),
             y=g.integers(0, CLASSES, rows))  # fmt: skip
    return path


def overrides(data: Path, rounds: int) -> list[str]:
    """``--set`` arguments that give privfed the baseline workload."""
    keys = {
        "federation.clients": SITES, "federation.rounds": rounds,
        "federation.fraction_train": COHORT / SITES, "federation.fraction_evaluate": 0.0,
        "federation.min_train": COHORT, "federation.evaluate_every": rounds,
        "data.dataset": "npz", "data.path": json.dumps(str(data)),
        "data.partitioner": "iid", "data.val_fraction": 0.0, "model.name": "mlp",
        "train.epochs": 1, "train.batch_size": 32, "train.lr": 0.05, "train.optimizer": "sgd",
        "train.momentum": 0.0, "train.centralized_baseline": "false",
    }  # fmt: skip
    return [arg for k, v in keys.items() for arg in ("--set", f"{k}={v}")]


def run_privfed(name: str, args: list[str], out: Path) -> dict[str, Any]:
    """One ``privfed simulate`` process; its throughput from the server's round times."""
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--out", str(out / name), *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
    process_s = time.perf_counter() - started
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    updates = [r["clients_trained"] for r in rows]
    seconds = [r["seconds"] for r in rows]
    return {
        "updates_per_s": sum(updates) / sum(seconds),
        "steady_updates_per_s": sum(updates[1:]) / sum(seconds[1:]) if len(rows) > 1 else None,
        "process_s": process_s,
        "updates": sum(updates),
        "final_loss": rows[-1]["loss"],
    }


def run_pfl(python: Path, rounds: int) -> dict[str, Any]:
    """``pfl_throughput.py`` in pfl's own environment (one torch thread, as the baseline)."""
    script = BASELINES / "pfl_throughput.py"
    if not python.exists():
        return {"error": f"no pfl environment at {python} (pip install 'pfl[pytorch]')"}
    if rounds != 10:
        return {"error": "the pfl baseline script runs 10 rounds only"}
    started = time.perf_counter()
    proc = subprocess.run([str(python), str(script)], capture_output=True, text=True,
                          env={**os.environ, "TORCH_THREADS": "1"})  # fmt: skip
    process_s = time.perf_counter() - started
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    result = json.loads(lines[-1][len("RESULT "):])
    return {"updates_per_s": result["updates_per_s"], "process_s": process_s,
            "run_s": result["run_s"]}  # fmt: skip


def arms(data: Path, rounds: int) -> dict[str, list[str]]:
    """privfed arms: backend and settings, all on the same workload."""
    base = overrides(data, rounds)
    return {
        "inprocess": [*base],
        "inprocess_1worker": [*base, "--workers", "1"],
        "ray": [*base, "--backend", "ray"],
        "inprocess_dp": [*base, "--set", "privacy.enabled=true",
                         "--set", "privacy.noise_multiplier=1.0"],  # fmt: skip
        "inprocess_secagg": [*base, "--set", "secagg.enabled=true"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="only the JSON line")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--pfl-python", type=Path,
                        default=Path(os.environ.get("PRIVFED_PFL_PYTHON", DEFAULT_PFL_PYTHON)))
    parser.add_argument("--skip", nargs="*", default=[], help="arms to leave out")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of the in-process and pfl arms, interleaved (medians)")
    opts = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="privfed-bench-") as tmp:
        folder = Path(tmp)
        data = write_data(folder)
        plan = {name: args for name, args in arms(data, opts.rounds).items()
                if name not in opts.skip}  # fmt: skip
        for rep in range(opts.repeat):  # load on a shared machine drifts: interleave
            for name in ("inprocess", "inprocess_1worker", "pfl"):
                if name in plan or (name == "pfl" and "pfl" not in opts.skip):
                    result = (run_pfl(opts.pfl_python, opts.rounds) if name == "pfl" else
                              run_privfed(f"{name}-{rep}", plan[name], folder))  # fmt: skip
                    runs.setdefault(name, []).append(result)
                    if not opts.json:
                        print(name, result, file=sys.stderr)
        for name in ("ray", "inprocess_dp", "inprocess_secagg"):
            if name in plan:
                runs[name] = [run_privfed(name, plan[name], folder)]
                if not opts.json:
                    print(name, runs[name][0], file=sys.stderr)
    emit(summarise({k: median_run(v) for k, v in runs.items()}, opts.rounds), as_json=opts.json)


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the median over the runs that succeeded (the first error otherwise)."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    keys = {k for r in ok for k, v in r.items() if isinstance(v, int | float)}
    return {k: statistics.median(r[k] for r in ok if r.get(k) is not None) for k in keys}


def summarise(results: dict[str, dict[str, Any]], rounds: int) -> dict[str, Any]:
    """The issue's figures: updates/s and process seconds per arm, and the two ratios."""
    rate = {k: v.get("updates_per_s") for k, v in results.items()}
    ours = rate.get("inprocess")

    def ratio(other: str) -> float | None:
        return ours / rate[other] if ours and rate.get(other) else None

    return {
        "workload": f"{SITES} sites x {PER_SITE} samples, MLP 52,566 params, {COHORT}/round, "
                    f"1 epoch, batch 32, {rounds} rounds",
        "cores": os.cpu_count(),
        "updates_per_s": rate,
        "steady_updates_per_s": {k: v.get("steady_updates_per_s") for k, v in results.items()
                                 if "steady_updates_per_s" in v},
        "process_s": {k: v.get("process_s") for k, v in results.items()},
        "errors": {k: v["error"] for k, v in results.items() if "error" in v},
        "vs_pfl": ratio("pfl"),
        "vs_pfl_1worker": (rate["inprocess_1worker"] / rate["pfl"]
                           if rate.get("inprocess_1worker") and rate.get("pfl") else None),
        "vs_flower_ray": ratio("ray"),
        "dp_updates_per_s": rate.get("inprocess_dp"),
        "secagg_updates_per_s": rate.get("inprocess_secagg"),
    }  # fmt: skip


if __name__ == "__main__":
    main()
