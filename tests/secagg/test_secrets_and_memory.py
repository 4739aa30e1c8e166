"""No secret in any serialised message or log; server memory flat in the number of clients."""

import logging
import tracemalloc

import numpy as np

from shared.secagg._masking import pair_mask_key, self_mask_key
from shared.secagg.client import SecAggClient
from shared.secagg.contract import Stage
from shared.secagg.params import SecAggParams
from shared.secagg.server import SecAggServer
from tests.secagg._sim import Transcript, run_round


def _windows(secret, size=8):
    return {secret[i : i + size] for i in range(0, len(secret) - size + 1)}


def test_no_secret_bytes_in_any_message_or_log(caplog):
    caplog.set_level(logging.DEBUG)
    n = 6
    transcript = Transcript()
    x = np.random.default_rng(0).integers(0, 2**32, (n, 64), dtype=np.uint32)
    drops = {Stage.COLLECT_MASKED: {2}, Stage.UNMASK: {4}}  # exercise both unmask paths
    _, _, clients = run_round(SecAggParams(n=n, k=4, t=3), x, drops, transcript=transcript)
    secrets_ = []
    for c in clients:
        secrets_ += [c._channel.secret_bytes(), c._mask.secret_bytes(), c._seed]
        secrets_.append(self_mask_key(c._seed, c.run_id, c.round).key)
        for v, (_, mask_pk) in c._peers.items():
            secret = c._mask.agree(mask_pk)
            secrets_ += [secret, pair_mask_key(secret, c.run_id, c.round, c.index, v).key]
    blob = b"".join(transcript.messages)
    assert len(transcript.messages) > 4 * n
    leaks = [s.hex()[:16] for s in secrets_ if any(w in blob for w in _windows(s))]
    assert leaks == []
    logged = "".join(r.getMessage() for r in caplog.records)
    assert not any(s.hex() in logged or repr(s) in logged for s in secrets_)
    assert not any(s.hex() in repr(c) for c in clients for s in secrets_)


def _fold_all(n, length):
    params = SecAggParams.plain(n=n, t=n // 2 + 1)
    server = SecAggServer(params, 1, 1, n_params=length - 1)
    clients = [SecAggClient(1, 1) for _ in range(n)]
    for u, ins in server.advertise_keys_ins().items():
        server.receive(clients[u].advertise_keys(ins))
    for u, ins in server.share_keys_ins().items():
        server.receive(clients[u].share_keys(ins))
    masked = [
        clients[u].collect_masked(ins, np.zeros(length, dtype=np.uint32))
        for u, ins in server.collect_masked_ins().items()
    ]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    while masked:
        server.receive(masked.pop())  # the reply is dropped after folding
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return grown


def test_server_folds_without_keeping_masked_vectors():
    length = 50_000  # 200 kB per masked vector
    for n in (4, 10):
        assert _fold_all(n, length) < 4 * length // 2  # far below one extra vector
