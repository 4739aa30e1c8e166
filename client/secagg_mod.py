"""SecAgg+ at a site: a Flower mod for the train handler (``ClientApp(mods=[secagg_mod])``).

A train message that carries SecAgg stage records (``shared.secagg.transport``) is answered
here; any other message goes straight to the handler. Per stage record:

* advertise-keys / share-keys / unmask: answered by the site's ``SecAggClient`` session of
  that round, without training.
* collect-masked: the handler trains as usual (with or without DP); its new weights become
  ``update = new - global``, which is clipped, quantized, weighted by the example count
  (capped at ``max_weight``) together with the train loss, masked, and sent as 4 bytes per
  element. The handler's arrays and metrics never leave the site; its public ``site``
  record (name, cumulative epsilon) is forwarded. The neighbours' share bundles are opened
  and the masks drawn on a second thread while the handler trains (they depend only on the
  round's keys, not on the update).

One message may carry two rounds' stages (round r's masked-input request and round r + 1's
key advertisement); they are answered in (round, stage) order, into one reply.

Guarantees:
    * Session state, private keys included, lives only in ``context.state`` under
      ``LOCAL_STATE_RECORD.<round>``; it is never put into a reply or a log line.
    * A failure in round r's collect or unmask stage (or a simulated dropout there) fails
      the whole reply, so the server counts the site as dropped; a failure in a piggybacked
      key setup only omits that part (the site then sits out that round).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from client.faults import SimulatedDropout, dropout_stage
from shared.config import DropoutStage, RunConfig
from shared.secagg import SecAggAbort, SecAggClient, encode
from shared.secagg.contract import (
    LOCAL_STATE_RECORD,
    AdvertiseKeysIns,
    CollectMaskedIns,
    Direction,
    ShareKeysIns,
    Stage,
    UnmaskIns,
)
from shared.secagg.errors import ContractError
from shared.secagg.transport import SECURE_METRICS, flat_update, is_stage_record, pack, unpack
from shared.wire import NUM_EXAMPLES, PARTITION_ID, SITE, array_view

log = logging.getLogger(__name__)

_DROP_STAGE = {
    Stage.ADVERTISE_KEYS: DropoutStage.ADVERTISE,
    Stage.SHARE_KEYS: DropoutStage.SHARE,
    Stage.COLLECT_MASKED: DropoutStage.COLLECT,
    Stage.UNMASK: DropoutStage.UNMASK,
}
_SETUP = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS)


def _state_key(round_: int) -> str:
    return f"{LOCAL_STATE_RECORD}.{round_}"


def _load(context: Context, round_: int) -> SecAggClient:
    record = context.state.config_records.get(_state_key(round_))
    if record is None:
        raise ContractError(f"no SecAgg session for round {round_} at this site")
    return SecAggClient.from_local_state(dict(record))


def _save(context: Context, session: SecAggClient) -> None:
    key = _state_key(session.round)
    state = session.to_local_state()
    if state["next"]:
        context.state.config_records[key] = ConfigRecord(state)
    else:  # finished: nothing of it is kept
        context.state.config_records.pop(key, None)


def _forget_before(context: Context, round_: int) -> None:
    prefix = LOCAL_STATE_RECORD + "."
    for key in list(context.state.config_records):
        if key.startswith(prefix) and int(key[len(prefix) :]) < round_:
            del context.state.config_records[key]


def _bounded(update: np.ndarray, norm_bound: float) -> np.ndarray:
    """``update`` scaled to L2 norm ``norm_bound`` if longer (0: off). Under SecAgg the
    server never sees one update, so the site bounds its own before encoding."""
    if norm_bound <= 0:
        return update
    norm = float(np.linalg.norm(update.astype(np.float64)))
    return update if norm <= norm_bound else (update * (norm_bound / norm)).astype(update.dtype)


def _encoded_input(
    msg: Message, reply: Message, session: SecAggClient, norm_bound: float = 0.0
) -> np.ndarray:
    """The site's weighted input from the handler's reply (layout: ``transport``), its
    update first norm-bounded to ``norm_bound`` (``robust.norm_bound``; 0: off)."""
    global_arrays = next(iter(msg.content.array_records.values()))
    new_arrays = next(iter(reply.content.array_records.values()))
    if list(new_arrays) != list(global_arrays):
        raise ValueError(f"trained model keys {list(new_arrays)} != {list(global_arrays)}")
    update = flat_update([array_view(new_arrays[k]) for k in global_arrays],
                         [array_view(global_arrays[k]) for k in global_arrays])  # fmt: skip
    update = _bounded(update, norm_bound)
    metrics = next(iter(reply.content.metric_records.values()))
    missing = [k for k in (NUM_EXAMPLES, *SECURE_METRICS) if k not in metrics]
    if missing:
        raise ValueError(f"train reply lacks metrics {missing} that SecAgg averages")
    weight = min(int(metrics[NUM_EXAMPLES]), session.params.max_weight)  # type: ignore[arg-type]
    values = np.array([float(metrics[k]) for k in SECURE_METRICS])  # type: ignore[arg-type]
    return encode(update, weight, session.params, metrics=values)


class _Background:
    """``fn(*args)`` on its own thread; ``result()`` waits and returns or re-raises.

    The masks are ChaCha20 keystreams drawn by OpenSSL, which releases the GIL: they take
    another core while the handler trains, instead of adding to the call's time.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._out: Any = None
        self._exc: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True,
                                        name="privfed-secagg-masks")  # fmt: skip
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._out = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._exc = exc

    def result(self) -> Any:
        self._thread.join()
        if self._exc is not None:
            raise self._exc
        return self._out

    def discard(self) -> None:
        """Wait for the thread and drop what it made (its error too)."""
        self._thread.join()
        self._out = self._exc = None


def _answer(ins, msg, context, call_next, public: RecordDict) -> object | Message:
    """One stage message -> its reply (or the handler's error reply, at collect)."""
    if isinstance(ins, AdvertiseKeysIns):
        _forget_before(context, ins.round - 1)
        session = SecAggClient(ins.run_id, ins.round)
        res = session.advertise_keys(ins)
    elif isinstance(ins, ShareKeysIns):
        session = _load(context, ins.round)
        res = session.share_keys(ins)
    elif isinstance(ins, CollectMaskedIns):
        session = _load(context, ins.round)
        masks = _Background(session.prepare_masks, ins)  # drawn while the handler trains
        reply = call_next(msg, context)
        if reply.has_error():
            masks.discard()
            return reply
        prepared = masks.result()
        norm_bound = RunConfig.from_flat(context.run_config, complete=True).robust.norm_bound
        encoded = _encoded_input(msg, reply, session, norm_bound)
        res = session.collect_masked(ins, encoded, prepared)
        if SITE in reply.content.config_records:
            public.config_records[SITE] = reply.content.config_records[SITE]
    elif isinstance(ins, UnmaskIns):
        session = _load(context, ins.round)
        res = session.unmask(ins)
    else:  # unpack(INS) yields only the four types
        raise ContractError(f"unexpected SecAgg message {type(ins).__name__}")
    _save(context, session)
    return res


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer the SecAgg+ stage records of a train message (Flower mod signature)."""
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or not any(
        is_stage_record(name) for name in msg.content.config_records
    ):
        return call_next(msg, context)
    config = RunConfig.from_flat(context.run_config)
    site = int(context.node_config.get(PARTITION_ID, 0))  # type: ignore[arg-type]
    out = RecordDict()
    replies, skipped = [], []
    for ins in unpack(msg.content.config_records, Direction.INS):
        setup = ins.STAGE in _SETUP
        if dropout_stage(config, ins.round, site) is _DROP_STAGE[ins.STAGE]:
            log.info("site %d: simulated dropout at %s of round %d", site, ins.STAGE.value,
                     ins.round)  # fmt: skip
            context.state.config_records.pop(_state_key(ins.round), None)
            if setup:
                skipped.append(f"simulated dropout at {ins.STAGE.value} of round {ins.round}")
                continue
            raise SimulatedDropout(f"site {site} dropped out at {ins.STAGE.value} of round "
                                   f"{ins.round}")  # fmt: skip
        try:
            res = _answer(ins, msg, context, call_next, out)
        except (ContractError, SecAggAbort) as exc:
            if not setup:
                raise
            log.warning("site %d: SecAgg %s of round %d refused: %s", site, ins.STAGE.value,
                        ins.round, exc)  # fmt: skip
            context.state.config_records.pop(_state_key(ins.round), None)
            skipped.append(f"{ins.STAGE.value} of round {ins.round} refused: {exc}")
            continue
        if isinstance(res, Message):  # the handler failed: the site drops out
            return res
        replies.append(res)
    if not replies:  # nothing to say: fail the reply, the server counts a dropout
        simulated = all(reason.startswith("simulated") for reason in skipped)
        raise (SimulatedDropout if simulated else ContractError)(f"site {site}: {skipped}")
    for name, record in pack(replies).items():
        out.config_records[name] = ConfigRecord(record, keep_input=False)
    return Message(out, reply_to=msg)
