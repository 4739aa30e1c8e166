"""Hand-back frames: what the ServerApp writes into its log and privfed run rebuilds."""

import hashlib
import io
import json
import os

import pytest

from server.handback import CHUNK_BYTES, MARK, ResultReceiver, send_results
from server.submit import DEFAULT_RETURN_MAX_BYTES, RETURN_KEY, handback_overrides


def _server_dir(tmp_path, model_size):
    out = tmp_path / "server"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"final_accuracy": 0.5}))
    (out / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    (out / "model.pt").write_bytes(os.urandom(model_size))
    return out


def _send(server, max_bytes):
    stream = io.StringIO()
    done = send_results(server, max_bytes, stream)
    return stream.getvalue().splitlines(keepends=True), done


def _receive(lines, tmp_path):
    receiver = ResultReceiver()
    notes = [n for line in lines if (n := receiver.feed(line))]
    local = tmp_path / "local"
    local.mkdir(exist_ok=True)
    return receiver.write(local), local, notes


@pytest.mark.parametrize("size", [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 300_001])
def test_files_arrive_bit_identical_between_other_log_lines(tmp_path, size):
    server = _server_dir(tmp_path, size)
    lines, done = _send(server, 10**7)
    # Flower's log carries the ServerApp's other lines around and between the frames.
    mixed = ["INFO :      round 2: accuracy 0.5\n"]
    for line in lines:
        mixed += [line, "WARNING :   a heartbeat line\n"]
    received, local, notes = _receive(mixed, tmp_path)
    assert received.complete and not received.refused and not received.held
    for name in ("summary.json", "metrics.jsonl", "model.pt"):
        data = (server / name).read_bytes()
        assert (local / name).read_bytes() == data
        assert received.files[name] == {"bytes": len(data),
                                        "sha256": hashlib.sha256(data).hexdigest()}
    assert done["sent"] == ["summary.json", "metrics.jsonl", "model.pt"]
    assert f"receiving model.pt ({size} bytes, {max(1, -(-size // CHUNK_BYTES))} chunks)" in notes
    assert all(len(line) <= CHUNK_BYTES * 4 // 3 + 100 for line in lines)


def test_a_file_over_the_limit_is_held_with_its_server_path_and_checksum(tmp_path):
    server = _server_dir(tmp_path, 5000)
    small = sum(len((server / n).read_bytes()) for n in ("summary.json", "metrics.jsonl"))
    lines, done = _send(server, small + 4999)
    received, local, _ = _receive(lines, tmp_path)
    assert done == {"sent": ["summary.json", "metrics.jsonl"], "held": ["model.pt"],
                    "bytes": small}
    assert sorted(received.files) == ["metrics.jsonl", "summary.json"]
    assert not (local / "model.pt").exists()
    held = received.held["model.pt"]
    assert held["path"] == str((server / "model.pt").resolve())
    assert held["sha256"] == hashlib.sha256((server / "model.pt").read_bytes()).hexdigest()
    assert "output.return_max_bytes" in held["reason"]


def test_zero_limit_writes_nothing(tmp_path):
    lines, done = _send(_server_dir(tmp_path, 10), 0)
    assert lines == [] and done["sent"] == []


def _model_lines(lines):
    return [i for i, line in enumerate(lines) if line.startswith(f"{MARK} chunk model.pt ")]


def test_a_tampered_chunk_is_refused_and_not_written(tmp_path):
    lines, _ = _send(_server_dir(tmp_path, 100_000), 10**7)
    i = _model_lines(lines)[1]
    head, _, data = lines[i].rpartition(" ")
    flipped = ("B" if data[10] == "A" else "A")
    lines[i] = f"{head} {data[:10]}{flipped}{data[11:]}"
    received, local, _ = _receive(lines, tmp_path)
    assert "SHA-256" in received.refused["model.pt"]
    assert not (local / "model.pt").exists()
    assert "summary.json" in received.files  # the intact files are kept


@pytest.mark.parametrize("damage", ["drop", "truncate", "garble"])
def test_a_lost_short_or_garbled_chunk_is_refused(tmp_path, damage):
    lines, _ = _send(_server_dir(tmp_path, 100_000), 10**7)
    i = _model_lines(lines)[0]
    if damage == "drop":
        del lines[i]
        expected = "1 of 3 chunks did not arrive"
    elif damage == "truncate":
        lines[i] = lines[i][:-9] + "\n"  # 8 base64 characters (6 bytes) fewer
        expected = "bytes arrived, the server sent 100000"
    else:
        lines[i] = lines[i][:-5] + "*!\n"
        expected = "not valid base64"
    received, local, _ = _receive(lines, tmp_path)
    assert expected in received.refused["model.pt"]
    assert not (local / "model.pt").exists()


def test_names_outside_the_handback_list_are_never_written(tmp_path):
    evil = tmp_path / "evil"
    frames = [f'{MARK} file {{"name": "../evil", "bytes": 1, "sha256": "x", "chunks": 1}}\n',
              f"{MARK} chunk ../evil 0 QQ==\n", f'{MARK} done {{"sent": ["../evil"]}}\n']
    received, local, _ = _receive(frames, tmp_path)
    assert not evil.exists() and list(local.iterdir()) == []
    assert received.files == {} and "../evil" in received.refused


def test_incomplete_without_done_frame(tmp_path):
    lines, _ = _send(_server_dir(tmp_path, 10), 10**7)
    received, _, _ = _receive(lines[:-1], tmp_path)
    assert not received.complete and "model.pt" in received.files


def test_privfed_run_asks_for_the_handback_only_if_the_app_declares_the_key():
    assert handback_overrides({RETURN_KEY: 0}, {"a.b": 1}) == {
        "a.b": 1, RETURN_KEY: DEFAULT_RETURN_MAX_BYTES}
    assert handback_overrides({RETURN_KEY: 0}, {RETURN_KEY: 7}) == {RETURN_KEY: 7}
    assert handback_overrides({}, {"a.b": 1}) == {"a.b": 1}
