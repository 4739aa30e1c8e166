"""End-to-end SecAgg+ rounds driven in process: exactness, dropouts, aborts, replays."""

import dataclasses

import numpy as np
import pytest

from shared.secagg.client import SecAggClient
from shared.secagg.contract import (
    CollectMaskedIns,
    CollectMaskedRes,
    ShareKeysIns,
    Stage,
    UnmaskIns,
)
from shared.secagg.errors import ContractError, SecAggAbort, ShareDecryptionError, StaleMessageError
from shared.secagg.params import SecAggParams
from shared.secagg.server import SecAggServer
from tests.secagg._sim import drbg, run_round

STAGES = list(Stage)


def _inputs(n, length, seed):
    # Test data only: full-range ring elements, so every wrap-around is exercised.
    return np.random.default_rng(seed).integers(0, 2**32, (n, length), dtype=np.uint32)


def _ring_sum(x, rows):
    return x[sorted(rows)].sum(axis=0, dtype=np.uint64).astype(np.uint32)  # mod 2**32


@pytest.mark.parametrize(
    ("n", "k", "t"), [(5, 4, 3), (6, 3, 2), (7, 6, 4), (8, 4, 3), (9, 4, 3), (10, 6, 4)]
)
def test_secure_sum_equals_plain_ring_sum(n, k, t):
    x = _inputs(n, 13, seed=n)
    out, server, _ = run_round(SecAggParams(n=n, k=k, t=t), x)
    assert out.dtype == np.uint32
    assert np.array_equal(out, _ring_sum(x, range(n)))
    assert server.survivors == tuple(range(n))


def _drop_set(n, m, seed):
    return set(np.random.default_rng(seed).choice(n, m, replace=False).tolist())


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.value)
def test_plain_secagg_dropouts_up_to_n_minus_t_give_survivors_sum(stage):
    n, t = 7, 4
    params = SecAggParams.plain(n=n, t=t)
    x = _inputs(n, 9, seed=1)
    for m in range(1, n - t + 1):
        dropped = _drop_set(n, m, seed=10 * m + STAGES.index(stage))
        out, server, _ = run_round(params, x, {stage: dropped})
        survivors = set(range(n)) - (dropped if stage is not Stage.UNMASK else set())
        assert set(server.survivors) == survivors
        assert np.array_equal(out, _ring_sum(x, survivors)), (stage, dropped)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.value)
def test_more_than_n_minus_t_dropouts_abort_cleanly(stage):
    n, t = 7, 4
    params = SecAggParams.plain(n=n, t=t)
    dropped = _drop_set(n, n - t + 1, seed=3)
    with pytest.raises(SecAggAbort, match="fewer than t=4") as info:
        run_round(params, _inputs(n, 9, seed=2), {stage: dropped})
    assert info.value.stage == stage.value


def test_dropouts_spread_over_stages():
    n, t = 9, 5
    x = _inputs(n, 7, seed=4)
    drops = {Stage.ADVERTISE_KEYS: {0}, Stage.SHARE_KEYS: {3}, Stage.COLLECT_MASKED: {5},
             Stage.UNMASK: {8}}  # fmt: skip
    out, server, _ = run_round(SecAggParams.plain(n=n, t=t), x, drops)
    assert np.array_equal(out, _ring_sum(x, set(range(n)) - {0, 3, 5}))
    drops[Stage.UNMASK] = {7, 8}
    with pytest.raises(SecAggAbort, match="unmask"):
        run_round(SecAggParams.plain(n=n, t=t), x, drops)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.value)
def test_secagg_plus_neighbourhood_threshold(stage):
    n, k, t = 10, 4, 3
    params = SecAggParams(n=n, k=k, t=t)
    x = _inputs(n, 5, seed=5)
    probe = SecAggServer(params, 7, 3, n_params=4)
    victim_nbrs = sorted(probe.neighbours[0])
    # k - t + 1 = 2 of client 0's k + 1 holders gone: t remain, the round completes.
    ok = set(victim_nbrs[: k - t + 1])
    out, server, _ = run_round(params, x, {stage: ok})
    expected = set(range(n)) - (ok if stage is not Stage.UNMASK else set())
    assert np.array_equal(out, _ring_sum(x, expected))
    # k - t + 2 = 3 gone: client 0 has t - 1 surviving holders, the round aborts.
    with pytest.raises(SecAggAbort, match=r"\{0: 2"):
        run_round(params, x, {stage: set(victim_nbrs[: k - t + 2])})


def test_masked_upload_bytes_are_uniform():
    n, length = 5, 20_000
    x = np.zeros((n, length), dtype=np.uint32)  # worst case: a constant input
    x[:, : length // 2] = 7
    params = SecAggParams.plain(n=n, t=3)
    captured = {}
    server = SecAggServer(params, 1, 1, n_params=length - 1)
    clients = [SecAggClient(1, 1, drbg(u)) for u in range(n)]  # reproducible
    for u, ins in server.advertise_keys_ins().items():
        server.receive(clients[u].advertise_keys(ins))
    for u, ins in server.share_keys_ins().items():
        server.receive(clients[u].share_keys(ins))
    for u, ins in server.collect_masked_ins().items():
        captured[u] = clients[u].collect_masked(ins, x[u]).to_dict()["masked"]
    for raw in (captured[0], captured[4]):
        assert _chi_square_bytes(raw) < 330.5  # df = 255, p = 0.001
    assert _chi_square_bytes(x[0].tobytes()) > 10_000  # the unmasked input is far from it


def _chi_square_bytes(raw):
    counts = np.bincount(np.frombuffer(raw, dtype=np.uint8), minlength=256)
    expected = len(raw) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _setup(n=5, t=3, run_id=1, round_=1):
    params = SecAggParams.plain(n=n, t=t)
    server = SecAggServer(params, run_id, round_, n_params=3)
    clients = [SecAggClient(run_id, round_) for _ in range(n)]
    for u, ins in server.advertise_keys_ins().items():
        server.receive(clients[u].advertise_keys(ins))
    for u, ins in server.share_keys_ins().items():
        server.receive(clients[u].share_keys(ins))
    return server, clients, server.collect_masked_ins()


def test_tampered_or_misrouted_share_ciphertexts_rejected():
    server, clients, ins = _setup()
    zero = np.zeros(4, dtype=np.uint32)
    msg = ins[0]
    bad = bytearray(msg.ciphertexts[0])
    bad[20] ^= 0x40
    tampered = dataclasses.replace(msg, ciphertexts=(bytes(bad), *msg.ciphertexts[1:]))
    with pytest.raises(ShareDecryptionError):
        clients[0].collect_masked(tampered, zero)
    swapped = dataclasses.replace(msg, ciphertexts=(msg.ciphertexts[1], msg.ciphertexts[0],
                                                    *msg.ciphertexts[2:]))  # fmt: skip
    with pytest.raises(ShareDecryptionError):
        clients[0].collect_masked(swapped, zero)
    foreign = dataclasses.replace(msg, ciphertexts=(ins[1].ciphertexts[1], *msg.ciphertexts[1:]))
    with pytest.raises(ShareDecryptionError):  # a bundle for client 1, under 1's key
        clients[0].collect_masked(foreign, zero)
    clients[0].collect_masked(msg, zero)  # the session was left intact by the rejections


def test_messages_replayed_from_another_round_rejected():
    old_server, old_clients, old_ins = _setup(round_=1)
    server, clients, ins = _setup(round_=2)
    zero = np.zeros(4, dtype=np.uint32)
    with pytest.raises(StaleMessageError, match="replayed or stale"):
        clients[0].collect_masked(old_ins[0], zero)
    # The old ciphertexts re-wrapped as a round-2 message still fail: AD and keys differ.
    rewrapped = CollectMaskedIns(1, 2, 0, old_ins[0].senders, old_ins[0].ciphertexts)
    with pytest.raises(ShareDecryptionError):
        clients[0].collect_masked(rewrapped, zero)
    old_reply = old_clients[0].collect_masked(old_ins[0], zero)
    with pytest.raises(StaleMessageError, match="replayed or stale"):
        server.receive(old_reply)
    reply = clients[0].collect_masked(ins[0], zero)
    server.receive(reply)
    with pytest.raises(StaleMessageError, match="duplicate"):
        server.receive(reply)
    with pytest.raises(StaleMessageError, match="stage 'collect-masked' expected"):
        clients[1].share_keys(ShareKeysIns(1, 2, 1, (), (), ()))  # stage 2 replayed in stage 3


def test_invalid_replies_leave_the_server_unchanged():
    server, clients, ins = _setup()
    bad = CollectMaskedRes(1, 1, 0, np.zeros(7, dtype=np.uint32))
    with pytest.raises(ContractError, match="shape"):
        server.receive(bad)
    for u, msg in ins.items():
        server.receive(clients[u].collect_masked(msg, np.full(4, u, dtype=np.uint32)))
    for u, msg in server.unmask_ins().items():
        server.receive(clients[u].unmask(msg))
    assert np.array_equal(server.finalize(), np.full(4, 10, dtype=np.uint32))
    with pytest.raises(RuntimeError, match="cannot open"):
        server.finalize()


def test_client_refuses_to_reveal_own_key_or_both_shares():
    server, clients, ins = _setup()
    for u, msg in ins.items():
        server.receive(clients[u].collect_masked(msg, np.zeros(4, dtype=np.uint32)))
    unmask = server.unmask_ins()
    with pytest.raises(ContractError, match="not a survivor"):
        clients[0].unmask(UnmaskIns(1, 1, 0, (1, 2, 3, 4), (0,)))
    with pytest.raises(SecAggAbort, match="surviving holders"):
        clients[0].unmask(UnmaskIns(1, 1, 0, (0, 1), (2, 3, 4)))
    res = clients[1].unmask(unmask[1])
    assert not set(res.seed_owners) & set(res.key_owners)


def test_abort_is_sticky():
    params = SecAggParams.plain(n=5, t=4)
    server = SecAggServer(params, 1, 1, n_params=1)
    clients = [SecAggClient(1, 1) for _ in range(5)]
    for u, ins in server.advertise_keys_ins().items():
        if u > 1:
            server.receive(clients[u].advertise_keys(ins))
    with pytest.raises(SecAggAbort) as first:
        server.share_keys_ins()
    with pytest.raises(SecAggAbort) as again:
        server.collect_masked_ins()
    assert again.value is first.value


def test_server_rejects_bad_layout():
    with pytest.raises(ValueError, match="n_params must be an int >= 0, got -1"):
        SecAggServer(SecAggParams.plain(n=3, t=2), 1, 1, n_params=-1)
    with pytest.raises(TypeError, match="params must be SecAggParams"):
        SecAggServer({"n": 3}, 1, 1, n_params=1)
