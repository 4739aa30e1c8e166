"""The server's round loop: a strategy's pure steps driven through a Flower ``Grid``.

This mirrors ``flwr.serverapp.strategy.Strategy.start`` (configure, send and
receive, aggregate; for training, then for evaluation; then a centralized
evaluation) but hands each completed round to a callback as it ends, so metrics
reach disk and the progress display while the run goes on, and it logs every
failed reply with its reason. A round whose aggregation yields nothing leaves the
global model unchanged.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.reporting import RoundReport
from server.robust import bound_replies
from server.secagg import SecAggPlus, TrainOutcome
from server.validation import ReplyBounds, split_valid
from shared.training import EvalResult
from shared.wire import (
    NUM_EXAMPLES,
    SITE,
    SITE_EPSILON,
    SITE_NAME,
    first_record,
    record_at,
    record_to_numpy,
)

log = logging.getLogger("flwr.privfed.server")  # Flower's handlers and log stream

CentralEval = Callable[[ArrayRecord], EvalResult]


@dataclass(frozen=True)
class LoopSettings:
    """Rounds to run, reply timeout, and what a plain round accepts.

    ``start_round`` > 1 continues a resumed run. A plain round aggregates only
    replies that pass ``bounds`` (see :mod:`server.validation`), scales updates
    longer than ``norm_bound`` down to it (0: off), and is skipped (model
    unchanged) if fewer than ``min_valid`` replies remain. The global model is evaluated
    after every ``evaluate_every``-th round and after the last.
    """

    rounds: int
    timeout: float = 3600.0
    start_round: int = 1
    bounds: ReplyBounds = field(default_factory=ReplyBounds)
    norm_bound: float = 0.0
    min_valid: int = 1
    evaluate_every: int = 1

    def evaluates(self, rnd: int) -> bool:
        """Whether round ``rnd`` ends with an evaluation of the global model."""
        return rnd % self.evaluate_every == 0 or rnd == self.rounds


def _split_failures(
    replies: Iterable[Message], stage: str, rnd: int
) -> tuple[list[Message], list[str]]:
    ok: list[Message] = []
    reasons: list[str] = []
    for msg in replies:
        if msg.has_error():
            reason = f"node {msg.metadata.src_node_id}: {msg.error.reason}"
            log.warning("round %d %s: reply failed (%s)", rnd, stage, reason)
            reasons.append(reason)
        else:
            ok.append(msg)
    return ok, reasons


def _exchange(
    grid: Grid, messages: list[Message], timeout: float, stage: str, rnd: int
) -> tuple[list[Message], list[str]]:
    """Send ``messages``, wait up to ``timeout`` s; the good replies and every failure,
    a site that did not answer in time included (it is one more failed site)."""
    received = list(grid.send_and_receive(messages, timeout=timeout))
    ok, failures = _split_failures(received, stage, rnd)
    # Every Grid gives each pushed message its id; a reply names it. (Not the reply's
    # source node: Flower answers for an unreachable node from the SuperLink's own id.)
    answered = {m.metadata.reply_to_message_id for m in received}
    for msg in messages:
        if msg.metadata.message_id not in answered:
            reason = f"node {msg.metadata.dst_node_id}: no reply within {timeout:g} s"
            log.warning("round %d %s: %s", rnd, stage, reason)
            failures.append(reason)
    return ok, failures


def _num_examples(reply: Message) -> int:
    metrics = first_record(reply.content, MetricRecord)
    return int(metrics.get(NUM_EXAMPLES, 0)) if metrics is not None else 0  # type: ignore[arg-type]


def site_epsilons(replies: Iterable[Message]) -> dict[str, float]:
    """The cumulative epsilon each replying site reports about itself (DP runs)."""
    out: dict[str, float] = {}
    for reply in replies:
        site = record_at(reply.content, SITE, ConfigRecord)
        if site is not None and SITE_EPSILON in site:
            name = str(site.get(SITE_NAME, reply.metadata.src_node_id))
            out[name] = float(site[SITE_EPSILON])  # type: ignore[arg-type]
    return out


def _metric(record: MetricRecord | None, key: str) -> float:
    if record is None or key not in record:
        return float("nan")
    return float(record[key])  # type: ignore[arg-type]


def canonical_order(replies: list[Message]) -> list[Message]:
    """Replies sorted by site name, then node id: float sums then do not depend on
    the order in which replies happened to arrive."""

    def key(reply: Message) -> tuple[str, int]:
        site = record_at(reply.content, SITE, ConfigRecord)
        name = str(site.get(SITE_NAME, "")) if site is not None else ""
        return (name.zfill(12) if name.isdigit() else name, reply.metadata.src_node_id)

    return sorted(replies, key=key)


def _train_round(
    strategy: Strategy, rnd: int, arrays: ArrayRecord, grid: Grid, settings: LoopSettings
) -> TrainOutcome:
    """A plain round: validate every reply, bound norms, aggregate the accepted ones."""
    messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
    replies, failures = _exchange(grid, messages, settings.timeout, "train", rnd)
    global_arrays = record_to_numpy(arrays)
    valid, rejected = split_valid(canonical_order(replies), global_arrays, settings.bounds,
                                  run_id=grid.run.run_id, server_round=rnd)
    for rejection in rejected:
        log.warning("round %d train: reply rejected (%s)", rnd, rejection)
    counts = dict(Counter(r.reason.value for r in rejected))
    failures += [f"rejected {r}" for r in rejected]
    new_arrays, metrics = None, None
    if len(valid) >= settings.min_valid:
        bound_replies(valid, global_arrays, settings.norm_bound)
        new_arrays, metrics = strategy.aggregate_train(rnd, valid)
    else:
        log.warning("round %d: %d valid replies < minimum %d; round skipped", rnd, len(valid),
                    settings.min_valid)
    return TrainOutcome(new_arrays, metrics, trained=len(valid),
                        failed=len(failures) - len(rejected), rejected=counts,
                        examples=sum(_num_examples(m) for m in valid),
                        failures=failures, replies=valid, round_trips=1)  # fmt: skip


def run_rounds(
    strategy: Strategy | SecAggPlus,
    grid: Grid,
    initial: ArrayRecord,
    settings: LoopSettings,
    central_eval: CentralEval,
    on_round: Callable[[RoundReport, ArrayRecord], None],
    epsilon: dict[str, float] | None = None,
) -> ArrayRecord:
    """Run rounds ``settings.start_round..settings.rounds``; return the final global model.

    ``on_round(report, arrays)`` is called after every round with that round's
    metrics and the global model after it. ``epsilon`` is the per-site spend known
    so far (a resumed run passes its checkpoint's).
    """
    arrays = initial
    epsilon = dict(epsilon or {})
    for rnd in range(settings.start_round, settings.rounds + 1):
        started = time.perf_counter()
        if isinstance(strategy, SecAggPlus):
            train = strategy.train_round(rnd, arrays, grid, last=rnd == settings.rounds)
        else:
            train = _train_round(strategy, rnd, arrays, grid, settings)
        epsilon.update(site_epsilons(train.replies))
        if train.arrays is None:
            log.warning("round %d: no update aggregated; the global model is unchanged", rnd)
        else:
            arrays = train.arrays

        fed_metrics, eval_failures = None, []
        central = EvalResult(math.nan, math.nan, 0)
        if settings.evaluates(rnd):
            eval_messages = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid))
            eval_replies, eval_failures = _exchange(grid, eval_messages, settings.timeout,
                                                    "evaluate", rnd)  # fmt: skip
            fed_metrics = strategy.aggregate_evaluate(rnd, eval_replies)
            central = central_eval(arrays)
        report = RoundReport(
            round=rnd,
            accuracy=central.accuracy,
            loss=central.loss,
            train_loss=_metric(train.metrics, "train_loss"),
            federated_accuracy=_metric(fed_metrics, "eval_accuracy"),
            federated_loss=_metric(fed_metrics, "eval_loss"),
            clients_trained=train.trained,
            clients_failed=train.failed,
            examples_trained=train.examples,
            seconds=time.perf_counter() - started,
            failures=train.failures + eval_failures,
            epsilon=dict(sorted(epsilon.items())),
            rejected=train.rejected,
        )
        log.info("round %d: accuracy %.4f loss %.4f (%d sites trained, %d failed)",
                 rnd, report.accuracy, report.loss, report.clients_trained, report.clients_failed)
        on_round(report, arrays)
    return arrays
