"""SecAgg+ over Flower's Message API, driven through an in-process Grid (no Ray).

Sites run ``client.secagg_mod`` in front of a train handler whose update is known, so the
secure aggregate can be checked against the plain sum of the very encoded inputs the sites
produced (bit for bit in Z_2^32) and against plain FedAvg (within the quantization bound).
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, Krum

import client.secagg_mod as mod
import server.secagg as srv
from kernels import dequantization_error_bound
from server.loop import LoopSettings, run_rounds
from server.secagg import SecAggIncompatibleStrategy, SecAggPlus
from shared.config import ConfigError, DropoutStage, RunConfig, SecAggConfig
from shared.secagg import SecAggAbort, SecAggClient
from shared.secagg.contract import LOCAL_STATE_RECORD
from shared.training import EvalResult
from shared.wire import NUM_EXAMPLES, PARTITION_ID, array_view
from tests.fake_grid import FakeGrid

N = 5  # k = 4 (everyone), t = 3: up to N - t = 2 dropouts are tolerated
SHAPES = {"w": (7, 5), "b": (5,)}
CLIP, BITS = 1.0, 16
STAGES = [DropoutStage.ADVERTISE, DropoutStage.SHARE, DropoutStage.COLLECT, DropoutStage.UNMASK]


def delta(site: int, rnd: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([site, rnd])
    return {k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}


def examples(site: int) -> int:
    return 10 + 7 * site


def loss(site: int, rnd: int) -> float:
    return 1.0 + site / 10 + rnd / 100


def make_app(before_train=None) -> ClientApp:
    """A site whose training adds ``delta(site, round)`` to the global model
    (``before_train(msg)`` is called first, if given; a Message it returns is the reply)."""
    app = ClientApp(mods=[mod.secagg_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        early = before_train(msg) if before_train is not None else None
        if isinstance(early, Message):
            return early
        site = int(context.node_config[PARTITION_ID])
        rnd = int(msg.content.config_records["config"]["server-round"])
        arrays = msg.content.array_records["arrays"]
        d = delta(site, rnd)
        new = ArrayRecord({k: Array(arrays[k].numpy() + d[k]) for k in SHAPES})
        metrics = MetricRecord({"train_loss": loss(site, rnd), NUM_EXAMPLES: examples(site)})
        return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)

    return app


def initial() -> ArrayRecord:
    rng = np.random.default_rng(99)
    return ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()})


class Spy:
    """Records what the sites encoded and what the server summed, per round."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.encoded: dict[int, dict[int, np.ndarray]] = {}
        self.totals: dict[int, np.ndarray] = {}
        self.states: list[dict] = []
        enc, dec, save = mod.encode, srv.decode, mod._save

        def encode(update, weight, params, metrics=None):
            out = enc(update, weight, params, metrics=metrics)
            self._last = out.copy()
            return out

        def collect_hook(ins, msg, context, call_next, public):
            res = answer(ins, msg, context, call_next, public)
            if hasattr(res, "masked"):
                site = int(context.node_config[PARTITION_ID])
                self.encoded.setdefault(ins.round, {})[site] = self._last
            return res

        def decode(total, params, n_params, n_metrics=0):
            self.totals[self._round] = total.copy()
            return dec(total, params, n_params, n_metrics)

        def save_state(context, session):
            self.states.append(session.to_local_state())
            save(context, session)

        answer = mod._answer
        monkeypatch.setattr(mod, "encode", encode)
        monkeypatch.setattr(mod, "_answer", collect_hook)
        monkeypatch.setattr(srv, "decode", decode)
        monkeypatch.setattr(mod, "_save", save_state)
        finish = SecAggPlus._finish

        def finish_hook(s, cur, rnd, arrays, out):
            self._round = rnd
            finish(s, cur, rnd, arrays, out)

        monkeypatch.setattr(SecAggPlus, "_finish", finish_hook)


def run(monkeypatch, rounds=2, drops=None, strategy=None, n=N, app=None, **secagg):
    """Run ``rounds`` secure rounds; ``drops[(round, site)]`` is a simulated dropout stage."""
    drops = drops or {}
    monkeypatch.setattr(mod, "dropout_stage", lambda cfg, rnd, site: drops.get((rnd, site)))
    flat = RunConfig.from_flat({"federation.clients": n, "secagg.enabled": True}).to_flat()
    grid = FakeGrid(app or make_app(), n, flat)
    strategy = strategy or FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    cfg = SecAggConfig(enabled=True, clip_range=CLIP, bits=BITS, **secagg)
    secure = SecAggPlus(strategy, cfg, expected_sites=n, timeout=5.0, poll_interval=0.0)
    reports, models = [], []
    start = initial()

    def on_round(report, arrays):
        reports.append(report)
        models.append(arrays)

    run_rounds(secure, grid, start, LoopSettings(rounds=rounds, timeout=5.0),
               lambda a: EvalResult(loss=0.0, accuracy=0.0, num_examples=0), on_round)  # fmt: skip
    return grid, reports, [start, *models]


def plain_fedavg(prev: ArrayRecord, sites: list[int], rnd: int) -> dict[str, np.ndarray]:
    w = np.array([examples(s) for s in sites], dtype=np.float64)
    pairs = list(zip(w, sites, strict=True))
    return {k: prev[k].numpy() + sum(wi * delta(s, rnd)[k] for wi, s in pairs) / w.sum()
            for k in SHAPES}  # fmt: skip


def ring_sum(vectors) -> np.ndarray:
    return np.sum(np.stack(list(vectors)).astype(np.uint64), axis=0).astype(np.uint32)


def test_secure_sum_is_the_plain_ring_sum_and_the_model_matches_fedavg(monkeypatch):
    spy = Spy(monkeypatch)
    grid, reports, models = run(monkeypatch, rounds=3)
    for rnd in (1, 2, 3):
        assert sorted(spy.encoded[rnd]) == list(range(N))
        np.testing.assert_array_equal(spy.totals[rnd], ring_sum(spy.encoded[rnd].values()))
        expected = plain_fedavg(models[rnd - 1], list(range(N)), rnd)
        total_w = sum(examples(s) for s in range(N))
        bound = dequantization_error_bound(CLIP, BITS, total_w) / total_w + 1e-6
        for k in SHAPES:
            err = np.abs(models[rnd][k].numpy() - expected[k]).max()
            assert err <= bound, (rnd, k, err, bound)
        mean_loss = sum(examples(s) * loss(s, rnd) for s in range(N)) / total_w
        assert reports[rnd - 1].train_loss == pytest.approx(mean_loss, abs=200 / 2**BITS)
        assert reports[rnd - 1].examples_trained == total_w
        assert reports[rnd - 1].clients_trained == N and reports[rnd - 1].failures == []
    # round 1: advertise, share, collect, unmask; then 2 per round (setup rides along)
    assert grid.pushes == 4 + 2 + 2


def test_replies_are_folded_as_they_arrive(monkeypatch):
    events = []
    fold = srv.SecAggServer._on_masked
    monkeypatch.setattr(srv.SecAggServer, "_on_masked",
                        lambda s, res: (events.append("fold"), fold(s, res)))  # fmt: skip
    pull = FakeGrid.pull_messages
    monkeypatch.setattr(FakeGrid, "pull_messages",
                        lambda g, ids: (events.append("pull"), pull(g, ids))[1])  # fmt: skip
    run(monkeypatch, rounds=1)
    folds = [i for i, e in enumerate(events) if e == "fold"]
    assert len(folds) == N
    assert "pull" in events[folds[0] : folds[-1]]  # folding began before the last pull


@pytest.mark.parametrize("stage", STAGES, ids=str)
@pytest.mark.parametrize("count", [1, N - 3])  # N - t = 2
@pytest.mark.parametrize("rnd", [1, 2], ids=["bootstrap", "piggybacked"])
def test_tolerated_dropouts_give_the_exact_survivors_sum(monkeypatch, stage, count, rnd):
    spy = Spy(monkeypatch)
    dropped = list(range(N))[-count:]
    _, reports, models = run(monkeypatch, drops={(rnd, s): stage for s in dropped})
    survivors = sorted(spy.encoded[rnd])
    sent = stage is DropoutStage.UNMASK  # these sites sent their masked input first
    assert survivors == (list(range(N)) if sent else [s for s in range(N) if s not in dropped])
    np.testing.assert_array_equal(spy.totals[rnd], ring_sum(spy.encoded[rnd].values()))
    expected = plain_fedavg(models[rnd - 1], survivors, rnd)
    for k in SHAPES:
        np.testing.assert_allclose(models[rnd][k].numpy(), expected[k], atol=1e-3)
    assert reports[rnd - 1].clients_trained == len(survivors)
    assert len(reports) == 2 and models[2] is not models[1]  # both rounds trained


@pytest.mark.parametrize("stage", STAGES, ids=str)
def test_too_many_dropouts_abort_the_round_and_keep_the_model(monkeypatch, caplog, stage):
    spy = Spy(monkeypatch)
    caplog.set_level(logging.WARNING)
    dropped = [2, 3, 4]  # N - t + 1
    _, reports, models = run(monkeypatch, drops={(1, s): stage for s in dropped})
    assert 1 not in spy.totals
    assert models[1] is models[0]  # unchanged global model
    assert any("aborted" in r.message and "global model unchanged" in r.message
               for r in caplog.records)  # fmt: skip
    assert any(f.startswith("secagg: ") for f in reports[0].failures)
    # the next round starts and trains every site again
    assert sorted(spy.encoded[2]) == list(range(N))
    np.testing.assert_array_equal(spy.totals[2], ring_sum(spy.encoded[2].values()))


def test_secret_keys_appear_in_no_message_and_no_log(monkeypatch, caplog):
    spy = Spy(monkeypatch)
    caplog.set_level(logging.DEBUG)
    grid, _, _ = run(monkeypatch, drops={(2, 4): DropoutStage.COLLECT})  # key shares revealed
    secrets_ = {s[k] for s in spy.states for k in ("channel_sk", "mask_sk", "seed") if k in s}
    assert len(secrets_) >= 3 * N * 2 - 3
    wire = b"".join(grid.wire)
    logs = caplog.text
    for secret in secrets_:
        assert secret not in wire
        assert secret.hex() not in logs and str(secret) not in logs
    # and the sites' state record itself never travels
    assert LOCAL_STATE_RECORD.encode() not in wire


def test_upload_is_four_bytes_per_parameter(monkeypatch):
    grid, _, _ = run(monkeypatch, rounds=1)
    d = sum(int(np.prod(s)) for s in SHAPES.values())
    sizes = [len(m) for m in grid.wire if b"collect-masked.res" in m]
    assert len(sizes) == N
    assert max(sizes) <= 4 * (d + 2) + 600  # vector (+ weight, loss) and small metadata


@pytest.mark.parametrize(
    "secagg, key",
    [
        ({"threshold": 2}, "secagg.threshold"),  # k = 4: t must be > 2
        ({"threshold": 5}, "secagg.threshold"),  # t <= k
        ({"k": 5}, "secagg.k"),  # k <= n - 1
        ({"max_weight": 20_000}, "secagg.max_weight"),  # 5 * 20000 * 65535 > 2**32
    ],
)
def test_bad_parameters_are_one_error_before_round_one(monkeypatch, secagg, key):
    with pytest.raises(ConfigError, match=key) as info:
        run(monkeypatch, **secagg)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "flat, key",
    [({"secagg.clip_range": 0.0}, "secagg.clip_range"), ({"secagg.bits": 30}, "secagg.bits"),
     ({"federation.clients": 3, "secagg.k": 1, "secagg.threshold": 1},
      "secagg.threshold"),  # n * k odd: k -> 2, and t = 1 is not > k / 2
     ({"federation.clients": 1}, "sites per round")],
)  # fmt: skip
def test_run_config_refuses_bad_secagg_settings(flat, key):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_flat({"secagg.enabled": True, **flat})


def test_strategies_that_need_individual_updates_are_refused(monkeypatch):
    for strategy in (Krum(), FedMedian()):
        with pytest.raises(SecAggIncompatibleStrategy, match=type(strategy).__name__):
            SecAggPlus(strategy, SecAggConfig(enabled=True), expected_sites=N)
    SecAggPlus(FedAdam(), SecAggConfig(enabled=True), expected_sites=N)


def test_server_optimizer_strategies_see_the_secure_mean(monkeypatch):
    strategy = FedAdam(fraction_evaluate=0.0, min_train_nodes=N, min_available_nodes=N)
    _, reports, models = run(monkeypatch, rounds=1, strategy=strategy)
    assert reports[0].clients_trained == N
    assert any(np.abs(models[1][k].numpy() - models[0][k].numpy()).max() > 0 for k in SHAPES)


def test_masks_are_drawn_on_another_thread_while_the_handler_trains(monkeypatch):
    # A rendezvous: the mask drawing waits until the handler has started and the handler
    # waits until the drawing has started. Run one after the other (either order), one of
    # the two waits times out.
    masks_on, training_on, threads, waited = threading.Event(), threading.Event(), set(), []
    prepare = SecAggClient.prepare_masks

    def spy(self, ins):
        threads.add(threading.get_ident())
        masks_on.set()
        waited.append(("masks", training_on.wait(timeout=10.0)))
        return prepare(self, ins)

    def before_train(msg):
        training_on.set()
        waited.append(("handler", masks_on.wait(timeout=10.0)))

    def reset(rnd, *args, **kwargs):
        masks_on.clear()
        training_on.clear()

    monkeypatch.setattr(SecAggClient, "prepare_masks", spy)
    monkeypatch.setattr(mod, "_encoded_input", _after(mod._encoded_input, reset))
    grid, reports, models = run(monkeypatch, rounds=2, app=make_app(before_train))
    assert sorted(waited) == [("handler", True)] * (2 * N) + [("masks", True)] * (2 * N)
    assert threading.get_ident() not in threads
    assert all(r.clients_trained == N and r.failures == [] for r in reports)
    expected = plain_fedavg(models[1], list(range(N)), 2)
    bound = dequantization_error_bound(CLIP, BITS, N * max(examples(s) for s in range(N)))
    for k in SHAPES:
        assert np.max(np.abs(models[2][k].numpy() - expected[k])) <= bound


def _after(fn, hook):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        hook(*args, **kwargs)
        return out

    return wrapped


@pytest.mark.parametrize("how", ["error reply", "exception"])
def test_a_failing_handler_is_the_reply_even_when_the_masks_fail_too(monkeypatch, how):
    def refuse(self, ins):
        raise SecAggAbort("collect-masked", "test: masks refused")

    def fail(msg):
        if how == "exception":
            raise RuntimeError("test: training failed")
        return Message(Error(code=0, reason="test: training failed"), reply_to=msg)

    monkeypatch.setattr(SecAggClient, "prepare_masks", refuse)
    _, reports, models = run(monkeypatch, rounds=1, app=make_app(fail))
    assert reports[0].clients_trained == 0
    assert all("training failed" in f for f in reports[0].failures[:N])
    assert models[1] is None or all(np.array_equal(models[1][k].numpy(), models[0][k].numpy())
                                    for k in SHAPES)  # fmt: skip


def test_sessions_do_not_pile_up_in_site_state(monkeypatch):
    grid, _, _ = run(monkeypatch, rounds=3)
    for context in grid.contexts.values():
        kept = [k for k in context.state.config_records if k.startswith(LOCAL_STATE_RECORD)]
        assert kept == []  # the last round finished; nothing of it is kept


@pytest.mark.parametrize(
    "values",
    [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(3.5), np.zeros((0, 5), np.float32),
     np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.arange(5, dtype=">i4"),
     np.arange(7, dtype=np.int64), np.arange(10**6 + 3, dtype=np.float32)],
    ids=["f32-2d", "0-d", "empty", "fortran", "big-endian", "int64", "1M+3"],
)  # fmt: skip
def test_array_view_equals_flower_numpy(values):
    array = Array(values)
    view, ref = array_view(array), array.numpy()
    assert view.dtype == ref.dtype and view.shape == ref.shape
    assert np.array_equal(view, ref)
