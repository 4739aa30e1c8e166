"""server.loop counts every site that did not answer an exchange, and only those."""

from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict

from server.loop import _exchange


class _Grid:
    """Answers the first message, fails the second as Flower does for an unreachable node
    (an error reply from the SuperLink's own node id, 1), and never answers the third."""

    def send_and_receive(self, messages, *, timeout=None):
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
        ok = Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=messages[0])
        failed = Message(Error(code=3, reason="Node unavailable"), reply_to=messages[1])
        failed.metadata.__dict__["_src_node_id"] = 1
        return [ok, failed]


def test_an_error_reply_from_another_node_id_is_one_failure_not_two(flower_task):
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN)
                for n in (11, 12, 13)]  # fmt: skip
    ok, failures = _exchange(_Grid(), messages, 2.5, "train", 1)
    assert len(ok) == 1 and len(failures) == 2
    assert failures[0] == "node 1: Node unavailable"
    assert failures[1] == "node 13: no reply within 2.5 s"
