"""The in-process simulation backend: worker-count independence, 1,000 sites, crashes, order."""

import json
import os
import re
import time

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from server.reporting import METRICS_FILE, MODEL_FILE
from shared.config import RunConfig
from shared.data import load
from simulations.inprocess import NODE_ID_BASE, InProcessGrid, VirtualSites, run_inprocess
from simulations.ordering import InOrderReplies
from simulations.scenario import SCENARIO_DIR, compose, read_scenario
from simulations.workers import InlineSites, SitePool, make_executor

SMOKE = SCENARIO_DIR / "smoke.toml"


@pytest.fixture
def task_identity(flower_task):
    """run_inprocess sets the ServerApp's task identity; put the test's back after."""
    yield flower_task


def simulate(out, workers, *overrides):
    """Run the smoke scenario in this process; return (metrics rows, sites)."""
    flat = compose(read_scenario(SMOKE), list(overrides))
    flat["output.dir"] = str(out)
    # As `privfed simulate` does: load the data first. (mnist1d's generator reseeds Python's
    # `random`, so a ServerApp that loads it uncached after seeding samples other sites.)
    load(RunConfig.from_flat(flat).data)
    executor = make_executor(workers)
    try:
        run_inprocess(flat, flat["federation.clients"], executor)
    finally:
        executor.close()
    rows = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    return rows


def comparable(rows):
    """Metrics rows without timings."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


SAMPLED = ("federation.clients=6", "federation.fraction_train=0.5",
           "federation.fraction_evaluate=0.5", "data.samples=600", "faults.dropout=0.3")


def test_same_model_and_metrics_for_0_1_2_workers(tmp_path, task_identity):
    runs = {w: simulate(tmp_path / f"w{w}", w, *SAMPLED) for w in (0, 1, 2)}
    models = {w: (tmp_path / f"w{w}" / MODEL_FILE).read_bytes() for w in runs}
    assert models[0] == models[1] == models[2]
    assert comparable(runs[0]) == comparable(runs[1]) == comparable(runs[2])
    # The scenario exercised sampling (3 of 6) and dropouts.
    assert all(r["clients_trained"] + r["clients_failed"] == 3 for r in runs[0])
    assert sum(r["clients_failed"] for r in runs[0]) > 0


def test_a_thousand_sites_ten_per_round_in_seconds(tmp_path, task_identity):
    flat = compose({}, [
        "federation.clients=1000", "federation.rounds=2", "federation.fraction_train=0.01",
        "federation.fraction_evaluate=0.01", "data.samples=12500", "data.partitioner=iid",
        "model.name=mlp",
    ])  # fmt: skip
    flat["output.dir"] = str(tmp_path)
    load(RunConfig.from_flat(flat).data)
    started = time.perf_counter()
    sites = InlineSites()
    original = VirtualSites.__init__
    seen: list[VirtualSites] = []

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VirtualSites, "__init__", spy)
        run_inprocess(flat, 1000, sites)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["clients_trained"] for r in rows] == [10, 10]
    # Only the sites that were contacted have a context; no model is kept for any.
    assert seen[0].num_sites == 1000 and seen[0].contacted() <= 40
    assert seconds < 120, f"1,000 sites took {seconds:.0f} s"


def crashing_app(message: Message, context: Context) -> Message:
    """A ClientApp whose partition 1 kills its process in round 1; otherwise it answers."""
    if context.node_config["partition-id"] == 1 and message.metadata.group_id == "1":
        os._exit(7)
    context.state.metric_records["calls"] = MetricRecord(
        {"n": int(context.state.metric_records.get("calls", {"n": 0})["n"]) + 1})
    return Message(RecordDict({"m": MetricRecord({"pid": context.node_config["partition-id"]})}),
                   reply_to=message)  # fmt: skip


def _messages(grid, nodes, rnd):
    return [Message(RecordDict(), node, "train", group_id=str(rnd)) for node in nodes]


def test_a_crashed_worker_fails_only_its_call_and_is_replaced(task_identity):
    from flwr.supercore.run import Run

    sites = VirtualSites(4, run_id=5, run_config={"federation.seed": 0})
    pool = SitePool(2, "tests.test_simulate_backends:crashing_app")
    try:
        grid = InProcessGrid(sites, pool)
        grid.set_run(Run.create_empty(run_id=5))
        nodes = list(grid.get_node_ids())
        first_error = ""
        for rnd in (1, 2):
            replies = list(grid.send_and_receive(_messages(grid, reversed(nodes), rnd)))
            first_error = first_error or replies[1].error.reason
            assert [r.metadata.src_node_id for r in replies] == nodes  # partition order
            assert [r.has_error() for r in replies] == [False, rnd == 1, False, False]
        assert "exited with code 7" in first_error
    finally:
        pool.close()
    # State persisted per site across rounds (the crashed call kept none).
    calls = {n: int(sites.context(n).state.metric_records.get("calls", {"n": 0})["n"])
             for n in nodes}  # fmt: skip
    assert calls == {nodes[0]: 2, nodes[1]: 1, nodes[2]: 2, nodes[3]: 2}


def test_pool_that_cannot_load_the_app_says_so(task_identity):
    with pytest.raises(ModuleNotFoundError):
        SitePool(1, "tests.no_such_module:app")


def test_replies_are_released_in_partition_order():
    order = InOrderReplies()
    for msg_id, partition in (("a", 2), ("b", 0), ("c", 1)):
        order.expect(msg_id, partition)
    order.arrived("a", "reply-a")
    assert order.release(["a", "b", "c"], prefix=True) == []  # b (partition 0) is missing
    order.arrived("b", "reply-b")
    assert order.release(["a", "b", "c"], prefix=True) == ["reply-b"]
    assert order.release(["a", "b", "c"], prefix=False) == ["reply-a"]
    assert order.forget(["a", "b", "c"]) == ["c"]


def test_unknown_node_gets_no_message_id(task_identity):
    sites = InlineSites("tests.test_simulate_backends:crashing_app")
    grid = InProcessGrid(VirtualSites(2, 5, {}), sites)
    msg = Message(RecordDict(), NODE_ID_BASE + 5, "train", group_id="1")
    assert list(grid.push_messages([msg])) == []


def test_failure_reasons_name_the_site_not_the_backend(tmp_path, task_identity):
    rows = simulate(tmp_path / "drop", 0, "federation.rounds=2", "data.samples=500",
                    "faults.dropout=0.5")  # fmt: skip
    reasons = [f for r in rows for f in r["failures"]]
    assert reasons, "expected dropouts"
    assert all(re.match(r"node \d+: <class 'flwr.clientapp.client_app.ClientAppException'>", f)
               for f in reasons)  # fmt: skip


def _secagg_wired() -> bool:
    import server.app

    return hasattr(server.app, "SecAggPlus")


@pytest.mark.skipif(not _secagg_wired(), reason="secagg.enabled is not wired into server.app yet")
def test_secagg_runs_in_process_with_state_travelling_between_workers(tmp_path, task_identity):
    # Each site's SecAgg session lives in context.state across the round's stages; with two
    # workers consecutive stages of one site may run in different processes.
    rows = simulate(tmp_path / "secagg", 2, "federation.rounds=2", "data.samples=500",
                    "secagg.enabled=true")  # fmt: skip
    assert [r["clients_trained"] for r in rows] == [3, 3]
    assert all(r["clients_failed"] == 0 for r in rows)


def test_stragglers_past_the_round_timeout_count_as_failed_and_the_run_goes_on(
    tmp_path, task_identity
):
    from client.faults import straggler_delay

    overrides = ("federation.rounds=2", "data.samples=500", "faults.slow=0.4",
                 "faults.slow_seconds=2.0", "federation.round_timeout=1.5")  # fmt: skip
    started = time.perf_counter()
    rows = simulate(tmp_path / "slow", 2, *overrides)
    config = RunConfig.from_flat(compose(read_scenario(SMOKE), list(overrides)))
    late = {(rnd, site) for rnd in (1, 2) for site in range(3)
            if straggler_delay(config, rnd, site) > 0}  # fmt: skip
    assert late, "the scenario should draw at least one straggler"
    for row in rows:
        reasons = [f for f in row["failures"] if "no reply within 1.5 s" in f]
        expected = sum(1 for rnd, _ in late if rnd == row["round"])
        assert len(reasons) == row["clients_failed"] == expected
        assert row["clients_trained"] == 3 - expected
    assert time.perf_counter() - started < 30  # the server waited 1.5 s, not the 3600 s default


def test_a_crash_after_training_fails_that_site_in_that_round(tmp_path, task_identity):
    from client.faults import crashes

    overrides = ("federation.rounds=2", "data.samples=500", "faults.crash=0.5")
    rows = simulate(tmp_path / "crash", 0, *overrides)
    config = RunConfig.from_flat(compose(read_scenario(SMOKE), list(overrides)))
    for row in rows:
        crashed = sorted(s for s in range(3) if crashes(config, row["round"], s))
        found = sorted(int(m) for f in row["failures"]
                       for m in re.findall(r"site (\d+) crashed after training", f))  # fmt: skip
        assert found == crashed and row["clients_failed"] == len(crashed)
    assert sum(r["clients_failed"] for r in rows) > 0


def test_wait_replies_blocks_until_a_call_finishes_then_pull_has_it(task_identity):
    from flwr.supercore.run import Run

    pool = SitePool(1, "tests.test_simulate_backends:crashing_app")
    try:
        grid = InProcessGrid(VirtualSites(2, run_id=5, run_config={}), pool)
        grid.set_run(Run.create_empty(run_id=5))
        ids = list(grid.push_messages(_messages(grid, [NODE_ID_BASE], 2)))
        replies = []
        deadline = time.monotonic() + 60
        while not replies and time.monotonic() < deadline:
            grid.wait_replies(5.0)
            replies = list(grid.pull_messages(ids))
        assert [r.metadata.reply_to_message_id for r in replies] == ids
        started = time.monotonic()
        grid.wait_replies(0.2)  # nothing outstanding: returns at once
        assert time.monotonic() - started < 0.2
    finally:
        pool.close()


def test_call_queue_hands_out_whole_items_in_order_even_larger_than_its_pipe():
    import multiprocessing as mp
    import select
    import threading

    from simulations.callqueue import CallQueue

    queue = CallQueue(mp.get_context("spawn"))
    items = [b"a" * 10, bytes(3 << 20), b"b" * 300_000, None]  # 3 MiB > the 1 MiB pipe
    got = []
    reader = threading.Thread(target=lambda: got.extend(queue.reader.get() for _ in items))
    reader.start()
    for item in items:
        queue.put(item)
    deadline = time.monotonic() + 30
    while queue.backlog and time.monotonic() < deadline:
        queue.flush()
        select.select([], [queue.writer_fd] if queue.writing else [], [], 0.01)
    reader.join(timeout=30)
    assert got == items
    queue.close()
