"""Stage loops with the transport injected: what a ServerApp / client mod runs per round.

The server loop takes an ``exchange(stage, ins_by_client)`` callable that sends each client
its message and yields the replies that arrived (as message objects or as dicts straight from
a record); in a Flower ServerApp it wraps ``Grid.send_and_receive``. Replies that fail
validation are logged (index and reason only, never contents) and treated as that client
dropping out at that stage, which the protocol tolerates up to its threshold.

The client step parses one incoming stage dict, advances the session, and returns the reply
dict; the encoded input is requested lazily, only when the masked-input stage arrives, so a
client trains only after key setup succeeded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import numpy as np

from shared.secagg.client import SecAggClient
from shared.secagg.contract import (
    AdvertiseKeysIns,
    CollectMaskedIns,
    Direction,
    ShareKeysIns,
    Stage,
    UnmaskIns,
    parse,
)
from shared.secagg.errors import ContractError
from shared.secagg.server import Reply, SecAggServer

log = logging.getLogger(__name__)

Ins = AdvertiseKeysIns | ShareKeysIns | CollectMaskedIns | UnmaskIns
Exchange = Callable[[Stage, Mapping[int, Ins]], Iterable[Reply | dict[str, Any]]]


def run_server_round(session: SecAggServer, exchange: Exchange) -> np.ndarray:
    """Run all four stages of ``session`` over ``exchange``; return the ring sum.

    Returns:
        ``session.finalize()``: the exact ring sum of the encoded inputs of
        ``session.survivors``.

    Raises:
        SecAggAbort: too few clients survived a stage (the reason names them).
    """
    stages = (
        (Stage.ADVERTISE_KEYS, session.advertise_keys_ins),
        (Stage.SHARE_KEYS, session.share_keys_ins),
        (Stage.COLLECT_MASKED, session.collect_masked_ins),
        (Stage.UNMASK, session.unmask_ins),
    )
    for stage, make_ins in stages:
        for reply in exchange(stage, make_ins()):
            try:
                msg = parse(reply, Direction.RES) if isinstance(reply, dict) else reply
                session.receive(cast(Reply, msg))  # parse(RES) yields only reply types
            except ContractError as exc:
                log.warning("SecAgg+ %s: reply rejected, counted as dropout: %s", stage.value, exc)
    return session.finalize()


def client_step(
    session: SecAggClient, ins: dict[str, Any], encoded_input: Callable[[], np.ndarray]
) -> dict[str, Any]:
    """Advance a client session by one server message (a dict from a record).

    Args:
        session: this client's session for the message's (run, round).
        ins: the stage message as received.
        encoded_input: called once, at the masked-input stage, for ``encoding.encode(...)``.

    Returns:
        The reply as a dict, ready for a record under ``record_name(stage, Direction.RES)``.

    Raises:
        ContractError: the message is malformed, stale, replayed or out of order.
        SecAggAbort: this client's neighbourhood fell below the threshold.
    """
    msg = parse(ins, Direction.INS)
    if isinstance(msg, AdvertiseKeysIns):
        return session.advertise_keys(msg).to_dict()
    if isinstance(msg, ShareKeysIns):
        return session.share_keys(msg).to_dict()
    if isinstance(msg, CollectMaskedIns):
        return session.collect_masked(msg, encoded_input()).to_dict()
    if isinstance(msg, UnmaskIns):
        return session.unmask(msg).to_dict()
    raise ContractError(f"not a server-to-client SecAgg message: {type(msg).__name__}")
