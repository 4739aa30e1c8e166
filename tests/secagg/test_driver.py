"""Transport-injected stage loops, client state persistence, and piggybacked setup."""

import logging

import numpy as np
import pytest

from shared.secagg.client import SecAggClient
from shared.secagg.contract import (
    LOCAL_STATE_RECORD,
    AdvertiseKeysRes,
    Direction,
    Stage,
    parse,
    record_name,
)
from shared.secagg.driver import client_step, run_server_round
from shared.secagg.errors import ContractError, SecAggAbort
from shared.secagg.params import SecAggParams
from shared.secagg.server import SecAggServer


class FakeSite:
    """A client whose session lives only in a dict between messages, like ``context.state``."""

    def __init__(self, run_id, round_, encoded):
        self.state = {LOCAL_STATE_RECORD: SecAggClient(run_id, round_).to_local_state()}
        self.encoded = encoded
        self.trained = 0

    def handle(self, ins):
        session = SecAggClient.from_local_state(self.state[LOCAL_STATE_RECORD])
        reply = client_step(session, ins, self._train)
        self.state[LOCAL_STATE_RECORD] = session.to_local_state()
        return reply

    def _train(self):
        self.trained += 1
        return self.encoded


def _exchange(sites, drop=None, corrupt=None):
    def exchange(stage, ins_by_client):
        for u, ins in ins_by_client.items():
            if drop and u in drop.get(stage, ()):
                continue
            record = {record_name(stage, Direction.INS): ins.to_dict()}
            reply = sites[u].handle(record[record_name(stage, Direction.INS)])
            if corrupt and (stage, u) == corrupt:
                reply = {**reply, "round": reply["round"] + 1}
            yield reply

    return exchange


def test_server_round_over_injected_transport_with_stateless_clients(caplog):
    n, d = 6, 10
    x = np.random.default_rng(0).integers(0, 2**32, (n, d + 1), dtype=np.uint32)
    sites = [FakeSite(9, 4, x[u]) for u in range(n)]
    server = SecAggServer(SecAggParams(n=n, k=4, t=3), 9, 4, n_params=d)
    drop = {Stage.SHARE_KEYS: {1}}
    with caplog.at_level(logging.WARNING):
        total = run_server_round(server, _exchange(sites, drop, (Stage.COLLECT_MASKED, 3)))
    assert server.survivors == (0, 2, 4, 5)  # 1 dropped, 3's reply was rejected
    assert np.array_equal(total, x[[0, 2, 4, 5]].sum(0, dtype=np.uint64).astype(np.uint32))
    assert "reply rejected, counted as dropout" in caplog.text
    assert [s.trained for s in sites] == [1, 0, 1, 1, 1, 1]  # training only after setup


def test_abort_propagates_from_the_loop():
    n = 5
    sites = [FakeSite(1, 1, np.zeros(2, dtype=np.uint32)) for _ in range(n)]
    server = SecAggServer(SecAggParams.plain(n=n, t=4), 1, 1, n_params=1)
    with pytest.raises(SecAggAbort, match="share-keys"):
        run_server_round(server, _exchange(sites, {Stage.SHARE_KEYS: {0, 1}}))


def test_garbage_state_and_misdirected_messages_rejected():
    with pytest.raises(ContractError, match="malformed SecAgg client state"):
        SecAggClient.from_local_state({"run_id": "1"})
    reply = AdvertiseKeysRes(1, 1, 0, bytes(32), bytes(range(32))).to_dict()
    with pytest.raises(ContractError, match="AdvertiseKeysIns: missing field"):
        client_step(SecAggClient(1, 1), reply, lambda: None)  # a reply is not an instruction


def test_next_round_setup_can_ride_on_this_rounds_messages():
    """Round r + 1's advertise and share-keys run while round r is mid-flight."""
    n, d = 5, 4
    params = SecAggParams.plain(n=n, t=3)
    x = np.random.default_rng(1).integers(0, 2**32, (2, n, d + 1), dtype=np.uint32)
    servers = [SecAggServer(params, 1, r, n_params=d) for r in (1, 2)]
    clients = [[SecAggClient(1, r) for _ in range(n)] for r in (1, 2)]

    def stage(r, make, act):
        for u, ins in make().items():
            servers[r].receive(act(clients[r][u], parse(ins.to_dict(), Direction.INS)))

    stage(0, servers[0].advertise_keys_ins, lambda c, m: c.advertise_keys(m))
    stage(0, servers[0].share_keys_ins, lambda c, m: c.share_keys(m))
    # One transport message per client now carries round 1's masked input AND round 2's
    # key advertisement; the next carries round 1's unmask AND round 2's share keys.
    stage(0, servers[0].collect_masked_ins, lambda c, m: c.collect_masked(m, x[0, m.client]))
    stage(1, servers[1].advertise_keys_ins, lambda c, m: c.advertise_keys(m))
    stage(0, servers[0].unmask_ins, lambda c, m: c.unmask(m))
    stage(1, servers[1].share_keys_ins, lambda c, m: c.share_keys(m))
    assert np.array_equal(servers[0].finalize(), x[0].sum(0, dtype=np.uint64).astype(np.uint32))
    stage(1, servers[1].collect_masked_ins, lambda c, m: c.collect_masked(m, x[1, m.client]))
    stage(1, servers[1].unmask_ins, lambda c, m: c.unmask(m))
    assert np.array_equal(servers[1].finalize(), x[1].sum(0, dtype=np.uint64).astype(np.uint32))
