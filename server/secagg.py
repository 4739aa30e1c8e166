"""SecAgg+ on the server: a wrapper that trains a weighted-mean strategy's round securely.

``SecAggPlus(strategy, config)`` takes a Flower strategy whose aggregate is a weighted mean
(FedAvg and its server-optimizer and proximal relatives) and replaces its train exchange:
each sampled site's weighted update travels masked in Z_2^32 and is folded into one running
accumulator the moment its reply is pulled (``server.grid_exchange``), so server memory does
not grow with the number of sites. The strategy still chooses the train config and turns the
decoded mean into the new global model (its ``aggregate_train`` sees one reply holding the
mean, with weight 1). Evaluation is the strategy's own.

Round trips (Grid exchanges) per round: round 1 takes 4 (advertise keys, share keys, collect
masked inputs, unmask). From then on 2: round r + 1's key advertisement rides on round r's
collect messages and its key shares on round r's unmask messages (each stage message names its
round). This fixes round r + 1's cohort during round r: it is sampled then, with the
strategy's fraction and minimum (with ``fraction_train = 1`` it is every connected site). A
site that drops out of round r's collect or unmask stage also misses round r + 1 (its key
setup for r + 1 travelled in the lost message); if round r + 1's key setup cannot go on, round
r + 1 sets up afresh with 2 extra round trips.

Dropouts: a site that fails, times out or sends an invalid reply at any stage is dropped. With
at least t surviving share holders around every site whose secret is needed, the round's sum
is exactly the survivors' encoded inputs; otherwise the round aborts: the global model is
unchanged, the reason is logged and reported, and the next round starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from server.grid_exchange import exchange
from shared.config import SecAggConfig
from shared.secagg import SecAggAbort, SecAggServer, decode
from shared.secagg.contract import Direction, _Message
from shared.secagg.errors import ContractError
from shared.secagg.transport import SECURE_METRICS, apply_update, is_stage_record, pack, unpack
from shared.wire import array_view, numpy_to_array

log = logging.getLogger("flwr.privfed.server")

#: Strategies whose aggregate is a function of the weighted mean of the updates only.
WEIGHTED_MEAN_STRATEGIES = (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad)


class SecAggIncompatibleStrategy(TypeError):
    """The strategy needs individual updates (e.g. Krum, median), which SecAgg hides."""


def check_strategy(strategy: Strategy) -> None:
    """Refuse strategies that need individual updates (exact types only: a subclass may
    aggregate differently; set ``secagg_compatible = True`` on it to vouch that it does not)."""
    if type(strategy) in WEIGHTED_MEAN_STRATEGIES or getattr(strategy, "secagg_compatible", 0):
        return
    names = ", ".join(s.__name__ for s in WEIGHTED_MEAN_STRATEGIES)
    raise SecAggIncompatibleStrategy(
        f"secure aggregation reveals only the weighted mean of the updates, but "
        f"{type(strategy).__name__} needs individual updates; use one of {names} "
        f"or set secagg.enabled = false"
    )


@dataclass
class _Session:
    """A round's protocol session and its cohort (round-local index -> node id)."""

    server: SecAggServer
    nodes: tuple[int, ...]
    abort: SecAggAbort | None = None

    def __post_init__(self) -> None:
        self.index = {node: i for i, node in enumerate(self.nodes)}

    def ins(self, make: Callable[[], Mapping[int, _Message]]) -> dict[int, _Message]:
        """Next stage's messages by node id; ``{}`` once the session is aborted."""
        if self.abort is None:
            try:
                return {self.nodes[i]: m for i, m in make().items()}
            except SecAggAbort as exc:
                self.abort = exc
                log.warning("round %d: %s", self.server.round, exc)
        return {}


@dataclass
class TrainOutcome:
    """What one training round produced (arrays None: the global model is unchanged)."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    trained: int = 0
    failed: int = 0
    examples: int = 0
    failures: list[str] = field(default_factory=list)
    #: The successful replies, stripped of model and masked data (their public records).
    replies: list[Message] = field(default_factory=list)
    round_trips: int = 0
    #: Replies dropped by validation, counted by reason (plain rounds only).
    rejected: dict[str, int] = field(default_factory=dict)


class SecAggPlus:
    """Secure training rounds for a weighted-mean ``strategy`` (see the module doc).

    Args:
        strategy: FedAvg or another weighted-mean strategy (``check_strategy``).
        config: the run's ``[secagg]`` section; parameters are resolved per round from the
            cohort size by ``SecAggConfig.params_for``.
        expected_sites: cohort size to validate the parameters against before round 1.
        timeout: seconds to wait for the replies of one exchange.
        poll_interval: sleep between two pulls of replies.

    Raises:
        SecAggIncompatibleStrategy: the strategy needs individual updates.
        ConfigError: the parameters are invalid for ``expected_sites`` sites.
    """

    def __init__(self, strategy: Strategy, config: SecAggConfig, *, expected_sites: int,
                 timeout: float = 3600.0, poll_interval: float = 0.01) -> None:  # fmt: skip
        check_strategy(strategy)
        config.params_for(expected_sites)
        self.strategy, self.config = strategy, config
        self.timeout, self.poll_interval = timeout, poll_interval
        self._next: _Session | None = None

    # -- the strategy's evaluation is untouched -------------------------------------------------
    def configure_evaluate(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return self.strategy.configure_evaluate(*args, **kwargs)

    def aggregate_evaluate(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return self.strategy.aggregate_evaluate(*args, **kwargs)

    # -- one round -------------------------------------------------------------------------------
    def train_round(self, rnd: int, arrays: ArrayRecord, grid: Grid, *, last: bool) -> TrainOutcome:
        """Run round ``rnd`` securely (and set up round ``rnd + 1`` unless ``last``)."""
        out = TrainOutcome(None, None)
        cur, self._next = self._next, None
        collect: dict[int, _Message] = {}
        if cur is not None and cur.server.round == rnd:
            collect = cur.ins(cur.server.collect_masked_ins)
        if not collect:  # no session set up in the last round, or its setup fell short
            cur = self._open(rnd, grid, arrays)
            for make in (cur.server.advertise_keys_ins, cur.server.share_keys_ins):
                out.round_trips += self._trip(grid, [(cur, cur.ins(make))], None, out)
            collect = cur.ins(cur.server.collect_masked_ins)
        template = next(iter(self.strategy.configure_train(rnd, arrays, ConfigRecord(), grid)))
        nxt = None if last else self._open(rnd + 1, grid, arrays)
        legs = [(cur, collect)]
        if nxt is not None:
            legs.append((nxt, nxt.ins(nxt.server.advertise_keys_ins)))
        out.round_trips += self._trip(grid, legs, template.content, out)
        legs = [(cur, cur.ins(cur.server.unmask_ins))]
        if nxt is not None:
            legs.append((nxt, nxt.ins(nxt.server.share_keys_ins)))
        out.round_trips += self._trip(grid, legs, None, out)
        self._next = nxt
        self._finish(cur, rnd, arrays, out)
        log.info("round %d: secure aggregation took %d round trip(s)", rnd, out.round_trips)
        return out

    def _open(self, rnd: int, grid: Grid, arrays: ArrayRecord) -> _Session:
        """Sample round ``rnd``'s cohort (the strategy's rule) and start its session.

        Nodes are drawn with Python's ``random`` like Flower's strategies (the server seeds
        it); with ``fraction_train = 1`` the cohort is every connected node, sorted.
        """
        fraction = getattr(self.strategy, "fraction_train", 1.0)
        size = max(int(len(list(grid.get_node_ids())) * fraction),
                   getattr(self.strategy, "min_train_nodes", 2))  # fmt: skip
        nodes, _ = sample_nodes(grid, getattr(self.strategy, "min_available_nodes", 2), size)
        nodes = sorted(nodes) if fraction >= 1.0 else nodes
        params = self.config.params_for(len(nodes))
        n_params = sum(int(np.prod(a.shape)) for a in arrays.values())
        server = SecAggServer(params, grid.run.run_id, rnd, n_params, len(SECURE_METRICS))
        return _Session(server, tuple(nodes))

    def _trip(self, grid: Grid, legs: list[tuple[_Session, dict[int, _Message]]],
              payload: RecordDict | None, out: TrainOutcome) -> int:  # fmt: skip
        """One exchange carrying every leg's stage messages; returns 1 (0 if nothing to send).

        ``payload`` (the train records: model and config) goes to the nodes of the first leg.
        """
        by_node: dict[int, list[_Message]] = {}
        for _, ins in legs:
            for node, msg in ins.items():
                by_node.setdefault(node, []).append(msg)
        if not by_node:
            return 0
        first = legs[0][1]
        messages = [self._message(node, msgs, payload if node in first else None)
                    for node, msgs in by_node.items()]  # fmt: skip
        sessions = {s.server.round: s for s, _ in legs}
        left = exchange(grid, messages, lambda r: self._receive(r, sessions, out),
                        timeout=self.timeout, poll_interval=self.poll_interval)  # fmt: skip
        if left:
            out.failures.append(f"{left} site(s) did not reply within {self.timeout} s")
        return 1

    @staticmethod
    def _message(node: int, msgs: list[_Message], payload: RecordDict | None) -> Message:
        content = RecordDict(dict(payload) if payload is not None else {})
        for name, record in pack(msgs).items():
            content[name] = ConfigRecord(record, keep_input=False)
        return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)

    def _receive(self, reply: Message, sessions: dict[int, _Session], out: TrainOutcome) -> None:
        """Validate one reply and hand its stage messages to their sessions (fold on arrival)."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            reason = f"node {node}: {reply.error.reason}"
            log.warning("secagg: reply failed, counted as dropout (%s)", reason)
            out.failures.append(reason)
            return
        records = reply.content.config_records
        try:
            stage_msgs = unpack(records, Direction.RES)
            for name in [n for n in records if is_stage_record(n)]:
                del records[name]  # the masked input is a view of its bytes until folded
            for res in stage_msgs:
                session = sessions.get(res.round)
                if session is None or session.index.get(node) != res.client:
                    raise ContractError(f"round {res.round} index {res.client} is not node {node}")
                if session.abort is None:
                    session.server.receive(res)
        except (ContractError, SecAggAbort) as exc:
            log.warning("secagg: reply of node %d rejected, counted as dropout: %s", node, exc)
            out.failures.append(f"node {node}: rejected: {exc}")
            return
        out.replies.append(reply)

    def _finish(self, cur: _Session, rnd: int, arrays: ArrayRecord, out: TrainOutcome) -> None:
        """Unmask, decode, and let the strategy turn the mean into the new global model."""
        out.failed = len(cur.nodes)
        try:
            if cur.abort is not None:
                raise cur.abort
            total = cur.server.finalize()
            agg = decode(total, cur.server.params, cur.server.n_params, len(SECURE_METRICS))
        except (SecAggAbort, ValueError) as exc:
            log.warning("round %d: secure aggregation aborted, global model unchanged: %s",
                        rnd, exc)  # fmt: skip
            out.failures.append(f"secagg: {exc}")
            return
        keys = list(arrays)
        new = apply_update([array_view(arrays[k]) for k in keys], agg.mean_update)
        metrics = {k: float(v) for k, v in zip(SECURE_METRICS, agg.mean_metrics, strict=True)}
        weight_key = getattr(self.strategy, "weighted_by_key", "num-examples")
        array_key = getattr(self.strategy, "arrayrecord_key", "arrays")
        mean = RecordDict({
            array_key: ArrayRecord({k: numpy_to_array(v) for k, v in zip(keys, new, strict=True)}),
            "metrics": MetricRecord({**metrics, weight_key: 1}),
        })  # fmt: skip
        probe = Message(RecordDict(), dst_node_id=0, message_type=MessageType.TRAIN)
        out.arrays, out.metrics = self.strategy.aggregate_train(
            rnd, [Message(mean, reply_to=probe)]
        )
        out.trained, out.examples = len(cur.server.survivors), agg.total_weight
        out.failed = len(cur.nodes) - out.trained
