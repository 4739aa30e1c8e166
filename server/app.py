"""The privfed ServerApp: FedAvg over the sites, evaluated every round.

Reads the run config once, builds the model and a FedAvg strategy, evaluates the
global model centrally on the data set's held-out test split and federatedly on
the sites' validation hold-outs every round, and writes ``metrics.jsonl``,
``summary.json``, ``metrics.png`` and ``model.pt`` to the run's output folder
(``output.dir``; default ``~/.privfed/runs/<run-id>``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from server.checkpoint import Checkpoint, CheckpointError, CheckpointStore, CheckpointWriter
from server.handback import send_results
from server.loop import LoopSettings, run_rounds
from server.reporting import RoundReport, RunRecorder
from server.robust import aggregation_strategy
from server.secagg import SecAggPlus
from server.validation import ReplyBounds
from shared.config import RunConfig
from shared.data import load
from shared.models import get_model
from shared.training import EvalResult, evaluate
from shared.wire import NUM_EXAMPLES, first_record, from_record, to_record

log = logging.getLogger("flwr.privfed.server")  # Flower's handlers and log stream

app = ServerApp()


def output_dir(config: RunConfig, run_id: int) -> Path:
    """Where this run's files go."""
    if config.output.dir:
        return Path(config.output.dir)
    return Path.home() / ".privfed" / "runs" / str(run_id)


def weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of every metric; replies with zero weight are skipped, not divided by."""
    totals: dict[str, float] = {}
    total_weight = 0.0
    for record in records:
        metrics = first_record(record, MetricRecord)
        weight = float(metrics[weight_key])  # type: ignore[arg-type]
        if weight <= 0:
            continue
        total_weight += weight
        for key, value in metrics.items():
            if key != weight_key and isinstance(value, int | float):
                totals[key] = totals.get(key, 0.0) + weight * float(value)
    if total_weight == 0:
        return MetricRecord()
    return MetricRecord({k: v / total_weight for k, v in totals.items()})


def build_strategy(config: RunConfig) -> FedAvg:
    """FedAvg (or ``[robust]``'s median / trimmed mean) with the run's sampling fractions;
    waits for every configured site."""
    fed = config.federation
    return aggregation_strategy(
        config,
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        # Sample the full cohort once every site is connected (FedAvg sizes the sample
        # from the sites connected *before* it waits for min_available_nodes).
        min_train_nodes=fed.train_cohort(),
        min_evaluate_nodes=max(1, int(fed.clients * fed.fraction_evaluate)),
        min_available_nodes=fed.clients,
        weighted_by_key=NUM_EXAMPLES,
        train_metrics_aggr_fn=weighted_mean,
        evaluate_metrics_aggr_fn=weighted_mean,
    )


def loop_settings(config: RunConfig, start_round: int) -> LoopSettings:
    """The round loop's limits, from ``[federation]`` and ``[robust]``."""
    robust = config.robust
    return LoopSettings(
        rounds=config.federation.rounds,
        timeout=config.federation.round_timeout,
        start_round=start_round,
        bounds=ReplyBounds(max_update_norm=robust.max_update_norm or math.inf,
                           max_examples=robust.max_examples),
        norm_bound=robust.norm_bound,
        min_valid=min(config.federation.min_train, config.federation.clients),
        evaluate_every=config.federation.evaluate_every,
    )


#: Run-config keys a resumed run may change: they do not affect the model.
_NOT_COMPARED = ("output.resume", "output.return_max_bytes")


def _resume(config: RunConfig, store: CheckpointStore, recorder: RunRecorder) -> Checkpoint:
    """The last good checkpoint of the run in ``output.dir``, with the metrics file and
    RNG states put back as they were after that round.

    Raises:
        CheckpointError: nothing to resume, or the run config changed.
    """
    checkpoint = store.latest()
    if checkpoint is None:
        raise CheckpointError(f"output.resume: no checkpoint in {store.directory}")
    changed = sorted(k for k, v in config.to_flat().items()
                     if k not in _NOT_COMPARED and checkpoint.run_config.get(k) != v)
    if changed:
        raise CheckpointError(f"output.resume: the run config differs from the checkpoint's "
                              f"in {', '.join(changed)}")
    recorder.restore_rounds(checkpoint.rounds)
    checkpoint.restore_rng()
    log.info("resuming after round %d from %s", checkpoint.round, store.directory)
    return checkpoint


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation the run config describes (or continue it: ``output.resume``)."""
    started = time.perf_counter()
    config = RunConfig.from_flat(context.run_config, complete=True)
    dataset = load(config.data)  # first: generating MNIST-1D reseeds Python's `random`
    seed = config.federation.seed
    random.seed(seed)  # Flower's node sampling draws from `random`
    torch.manual_seed(seed)
    model = get_model(config.model.name, dataset.spec)
    recorder = RunRecorder(output_dir(config, context.run_id))
    store = CheckpointStore(recorder.out_dir, keep=config.output.checkpoint_keep)
    log.info("privfed run %s: writing to %s", context.run_id, recorder.out_dir)
    resumed = _resume(config, store, recorder) if config.output.resume else None
    initial = to_record(resumed.model if resumed else model.state_dict())

    def central_eval(arrays: ArrayRecord) -> EvalResult:
        model.load_state_dict(from_record(arrays))
        return evaluate(model, dataset.test)

    rows = [asdict(r) for r in recorder.rounds]  # the checkpoints' copy, one row per round
    flat_config = config.to_flat()

    def on_round(report: RoundReport, arrays: ArrayRecord) -> None:
        python_rng, torch_rng = Checkpoint.capture_rng()
        rows.append(asdict(report))
        checkpoint = Checkpoint(round=report.round, model=dict(from_record(arrays)),
                                run_config=flat_config, rounds=list(rows),
                                site_epsilon=report.epsilon, python_rng=python_rng,
                                strategy_state=strategy_state(strategy), torch_rng=torch_rng)
        recorder.rounds.append(report)
        # Both files are written (fsynced) while the next round trains; a resume rebuilds
        # metrics.jsonl from the checkpoint, so its line goes after it.
        writer.submit(checkpoint, then=lambda: recorder.write_round(report))

    strategy = build_strategy(config)
    settings = loop_settings(config, start_round=resumed.round + 1 if resumed else 1)
    if config.secagg.enabled:
        strategy = SecAggPlus(strategy, config.secagg, timeout=settings.timeout,
                              expected_sites=config.federation.train_cohort())  # fmt: skip
    if resumed:
        restore_strategy_state(strategy, resumed.strategy_state)
    writer = CheckpointWriter(store)  # each round's checkpoint is written during the next
    try:
        final = run_rounds(strategy, grid, initial, settings, central_eval, on_round,
                           epsilon=resumed.site_epsilon if resumed else None)
    finally:
        writer.close()
    recorder.save_model(from_record(final))
    recorder.plot()
    last = recorder.rounds[-1] if recorder.rounds else None
    recorder.write_summary(
        {
            "run_id": context.run_id,
            "final_accuracy": last.accuracy if last else None,
            "final_loss": last.loss if last else None,
            "rounds_completed": len(recorder.rounds),
            "resumed_after_round": resumed.round if resumed else None,
            "epsilon": last.epsilon if last else {},
            "rejected": _total_rejected(recorder.rounds),
            "wall_seconds": time.perf_counter() - started,
            "config": config.to_flat(),
        }
    )
    send_results(recorder.out_dir, config.output.return_max_bytes)  # to the submitter's log


#: Attributes that hold a strategy's own state across rounds (Flower's FedOpt family:
#: FedAdam, FedYogi, FedAdagrad keep the current model and the optimizer moments).
_STRATEGY_STATE = ("current_arrays", "m_t", "v_t")


def strategy_state(strategy: object) -> dict[str, dict[str, torch.Tensor]]:
    """The strategy's state for a checkpoint (empty for stateless FedAvg/median/trimmed)."""
    inner = getattr(strategy, "strategy", strategy)  # SecAggPlus wraps the real one
    out = {}
    for name in _STRATEGY_STATE:
        value = getattr(inner, name, None)
        if value:
            out[name] = {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
    return out


def restore_strategy_state(strategy: object, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put a checkpoint's strategy state back (the inverse of :func:`strategy_state`)."""
    inner = getattr(strategy, "strategy", strategy)
    for name, arrays in state.items():
        setattr(inner, name, {k: v.numpy() for k, v in arrays.items()})


def _total_rejected(rounds: list[RoundReport]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for report in rounds:
        total.update(report.rejected)
    return dict(total)
