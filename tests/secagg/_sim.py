"""In-process driver for SecAgg+ sessions: the transport is a dict, dropouts are omissions."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shared.secagg.client import SecAggClient
from shared.secagg.contract import Direction, Stage, parse
from shared.secagg.params import SecAggParams
from shared.secagg.server import SecAggServer


@dataclass
class Transcript:
    """Every serialised message of a round, for leak scans."""

    messages: list[bytes] = field(default_factory=list)


def drbg(seed: int | bytes) -> Callable[[int], bytes]:
    """Deterministic byte source for reproducible tests (SHA-256 in counter mode).

    Not a CSPRNG choice for production: the protocol defaults to ``secrets.token_bytes``.
    """
    key = seed if isinstance(seed, bytes) else seed.to_bytes(16, "little")
    counter = 0

    def randbytes(n: int) -> bytes:
        nonlocal counter
        out = bytearray()
        while len(out) < n:
            out += hashlib.sha256(key + counter.to_bytes(8, "little")).digest()
            counter += 1
        return bytes(out[:n])

    return randbytes


def _wire(msg, direction: Direction, transcript: Transcript | None):
    """Serialise and parse back, as a transport would."""
    raw = msg.to_bytes()
    if transcript is not None:
        transcript.messages.append(raw)
    return parse(msg.from_bytes(raw).to_dict(), direction)


def run_round(
    params: SecAggParams,
    inputs: np.ndarray,
    drops: dict[Stage, set[int]] | None = None,
    run_id: int = 7,
    round_: int = 3,
    transcript: Transcript | None = None,
    seed: int | None = None,
    unmask_order: Callable[[list[int]], list[int]] | None = None,
    before_finalize: Callable[[SecAggServer], None] | None = None,
) -> tuple[np.ndarray, SecAggServer, list[SecAggClient]]:
    """One full round; clients in ``drops[stage]`` do not reply at that stage (and after).

    ``inputs`` is ``(n, vector_len)`` uint32 (the encoded inputs). ``seed`` makes every
    client's randomness reproducible (tests only). ``unmask_order`` reorders the unmask
    replies (given the repliers' indices in index order); ``before_finalize`` sees the
    server after the last reply.
    """
    drops = drops or {}
    n, length = inputs.shape
    server = SecAggServer(params, run_id, round_, n_params=length - 1)
    clients = [
        SecAggClient(run_id, round_)
        if seed is None
        else SecAggClient(run_id, round_, drbg(seed * 1000 + i))
        for i in range(n)
    ]
    gone: set[int] = set()
    steps = [
        (Stage.ADVERTISE_KEYS, server.advertise_keys_ins, lambda c, m: c.advertise_keys(m)),
        (Stage.SHARE_KEYS, server.share_keys_ins, lambda c, m: c.share_keys(m)),
        (
            Stage.COLLECT_MASKED,
            server.collect_masked_ins,
            lambda c, m: c.collect_masked(m, inputs[m.client]),
        ),
        (Stage.UNMASK, server.unmask_ins, lambda c, m: c.unmask(m)),
    ]
    for stage, make_ins, act in steps:
        gone |= drops.get(stage, set())
        replies = {}
        for u, ins in make_ins().items():
            if u in gone:
                continue
            res = act(clients[u], _wire(ins, Direction.INS, transcript))
            replies[u] = _wire(res, Direction.RES, transcript)
        order = list(replies)
        if stage is Stage.UNMASK and unmask_order is not None:
            order = unmask_order(order)
        for u in order:
            server.receive(replies[u])
    if before_finalize is not None:
        before_finalize(server)
    return server.finalize(), server, clients
