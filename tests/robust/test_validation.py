import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from server.robust import bound_replies, bound_update
from server.validation import Reason, ReplyBounds, check_reply, split_valid, update_norm
from shared.wire import ARRAYS, METRICS, NUM_EXAMPLES, SITE, SITE_ROUND

GLOBAL = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
RUN = 5  # the flower_task fixture's run id


def reply(arrays=None, examples=10, site_round=1, node=3):
    arrays = GLOBAL if arrays is None else arrays
    ins = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({
        ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        METRICS: MetricRecord({"train_loss": 1.0, NUM_EXAMPLES: examples}),
        SITE: ConfigRecord({"name": str(node), SITE_ROUND: site_round}),
    })
    return Message(content=content, reply_to=ins)


NO_BOUNDS = ReplyBounds()


def check(msg, bounds=NO_BOUNDS, server_round=1):
    return check_reply(msg, GLOBAL, bounds, run_id=RUN, server_round=server_round)


def with_(key, value):
    return {**GLOBAL, key: value}


def test_a_good_reply_passes(flower_task):
    assert check(reply(with_("w", np.ones((3, 4), np.float32)))) is None


@pytest.mark.parametrize(
    "arrays, reason",
    [
        ({"w": GLOBAL["w"]}, Reason.WRONG_KEYS),
        ({**GLOBAL, "extra": np.zeros(1, np.float32)}, Reason.WRONG_KEYS),
        (with_("w", np.zeros((4, 3), np.float32)), Reason.WRONG_SHAPE),
        (with_("w", np.zeros((3, 4), np.float64)), Reason.WRONG_DTYPE),
        (with_("b", np.array([0, np.nan, 0, 0], np.float32)), Reason.NON_FINITE),
        (with_("b", np.array([0, np.inf, 0, 0], np.float32)), Reason.NON_FINITE),
        (with_("b", np.array([0, -np.inf, 0, 0], np.float32)), Reason.NON_FINITE),
    ],
)
def test_structural_and_value_faults_are_rejected_with_their_reason(flower_task, arrays, reason):
    rejection = check(reply(arrays))
    assert rejection is not None and rejection.reason is reason
    assert "node 3" in str(rejection)


def test_norm_bound(flower_task):
    big = with_("w", np.full((3, 4), 10.0, np.float32))  # norm = sqrt(12) * 10
    rejection = check(reply(big), ReplyBounds(max_update_norm=30.0))
    assert rejection.reason is Reason.NORM_TOO_LARGE and "34.64" in rejection.detail
    assert check(reply(big), ReplyBounds(max_update_norm=40.0)) is None


@pytest.mark.parametrize("count", [0, -5, 2.5, math.nan, math.inf, 10_001])
def test_bad_example_counts(flower_task, count):
    rejection = check(reply(examples=count), ReplyBounds(max_examples=10_000))
    assert rejection is not None and rejection.reason is Reason.BAD_EXAMPLE_COUNT


def test_a_reply_to_another_round_is_stale(flower_task):
    rejection = check(reply(site_round=2), server_round=3)
    assert rejection.reason is Reason.STALE and "expected 3" in rejection.detail


def test_a_reply_from_another_run_is_stale(flower_task):
    msg = reply()
    rejection = check_reply(msg, GLOBAL, ReplyBounds(), run_id=RUN + 1, server_round=1)
    assert rejection.reason is Reason.STALE


def test_split_valid_counts_each_kind(flower_task):
    replies = [reply(), reply(with_("w", np.full((3, 4), np.nan, np.float32))),
               reply(examples=0), reply()]
    valid, rejected = split_valid(replies, GLOBAL, ReplyBounds(), run_id=RUN, server_round=1)
    assert len(valid) == 2
    assert sorted(r.reason for r in rejected) == [Reason.BAD_EXAMPLE_COUNT, Reason.NON_FINITE]


def test_update_norm_handles_zero_inf_and_nan():
    assert update_norm(GLOBAL, GLOBAL) == 0.0
    assert math.isinf(update_norm(with_("b", np.array([np.inf, 0, 0, 0], np.float32)), GLOBAL))
    assert math.isnan(update_norm(with_("b", np.array([np.nan, 0, 0, 0], np.float32)), GLOBAL))


def test_bound_update_scales_long_updates_and_keeps_short_ones():
    long = with_("w", np.full((3, 4), 3.0, np.float32))
    bounded, norm = bound_update(long, GLOBAL, 1.0)
    assert norm == pytest.approx(math.sqrt(12) * 3)
    assert update_norm(bounded, GLOBAL) == pytest.approx(1.0, rel=1e-6)
    assert bounded["w"].dtype == np.float32
    same, _ = bound_update(GLOBAL, GLOBAL, 1.0)  # norm 0: untouched, no division
    assert all(np.array_equal(same[k], GLOBAL[k]) for k in GLOBAL)


def test_bound_replies_rewrites_only_the_long_ones(flower_task):
    replies = [reply(with_("w", np.full((3, 4), 3.0, np.float32))), reply()]
    assert bound_replies(replies, GLOBAL, 1.0) == 1
    first = {k: v.numpy() for k, v in replies[0].content[ARRAYS].items()}
    assert update_norm(first, GLOBAL) == pytest.approx(1.0, rel=1e-6)
    assert bound_replies(replies, GLOBAL, 0.0) == 0  # 0 = off


def test_weighted_fedavg_equals_flowers_fedavg_bit_for_bit(flower_task):
    from flwr.serverapp.strategy import FedAvg

    from server.robust import WeightedFedAvg
    from shared.wire import record_to_numpy

    g = np.random.default_rng(4)
    replies = [reply({"w": g.standard_normal((3, 4)).astype(np.float32),
                      "b": g.standard_normal(4).astype(np.float32)},
                     examples=int(g.integers(1, 500)), node=n)
               for n in range(2, 9)]  # fmt: skip
    ours, our_metrics = WeightedFedAvg(weighted_by_key=NUM_EXAMPLES).aggregate_train(1, replies)
    flowers, their_metrics = FedAvg(weighted_by_key=NUM_EXAMPLES).aggregate_train(1, replies)
    mine, theirs = record_to_numpy(ours), record_to_numpy(flowers)
    assert list(mine) == list(theirs)
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype
        assert mine[key].tobytes() == theirs[key].tobytes(), key
    assert dict(our_metrics) == dict(their_metrics)
    assert WeightedFedAvg().aggregate_train(1, []) == (None, None)
