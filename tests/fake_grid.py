"""An in-process Flower ``Grid`` that runs a ClientApp for n nodes, for tests without Ray.

Every message is serialised to protobuf and parsed back on the way in and out (as a real
transport does, so no object is shared between server and sites), and its bytes are kept in
``wire`` for leak scans. A site's exception becomes an error reply, as in Flower's runtimes.
``pull_messages`` hands out at most ``per_pull`` replies per call, so a server that folds
replies as they arrive sees them arrive a few at a time.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from shared.wire import NUM_PARTITIONS, PARTITION_ID

ClientApp = Callable[[Message, Context], Message]


class FakeGrid(Grid):
    """``n`` in-process sites running ``client_app``; node ids are ``1000 + partition id``."""

    def __init__(self, client_app: ClientApp, n: int, run_config: Mapping[str, Any],
                 run_id: int = 4242, per_pull: int = 2) -> None:  # fmt: skip
        self.client_app, self.per_pull = client_app, per_pull
        self._run = Run.create_empty(run_id=run_id)
        # What Flower's runtimes set before a ServerApp builds messages.
        TaskIdentity.task_id, TaskIdentity.run_id = 1, run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.contexts = {
            1000 + i: Context(run_id=run_id, node_id=1000 + i,
                              node_config={PARTITION_ID: i, NUM_PARTITIONS: n},
                              state=RecordDict(), run_config=dict(run_config))  # fmt: skip
            for i in range(n)
        }
        self.offline: set[int] = set()  # nodes that never answer (time out)
        self.wire: list[bytes] = []
        self.pushes = 0  # round trips: push_messages calls
        self.max_pending_replies = 0
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # fmt: skip
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _wire(self, msg: Message) -> Message:
        raw = message_to_proto(msg).SerializeToString()
        self.wire.append(raw)
        proto = type(message_to_proto(msg))()
        proto.ParseFromString(raw)
        return message_from_proto(proto)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.pushes += bool(messages)
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            if node in self.offline:
                continue
            incoming = self._wire(msg)
            try:
                reply = self.client_app(incoming, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - a site's failure is an error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"),
                                reply_to=incoming)  # fmt: skip
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._replies[msg.metadata.message_id] = self._wire(reply)
        self.max_pending_replies = max(self.max_pending_replies, len(self._replies))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for mid in list(message_ids):
            if mid in self._replies and len(out) < self.per_pull:
                out.append(self._replies.pop(mid))
        return out

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:  # fmt: skip
        ids = list(self.push_messages(messages))
        out = []
        while any(mid in self._replies for mid in ids):
            out.extend(self.pull_messages(ids))
        return out
