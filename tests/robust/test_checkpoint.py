import random

import pytest
import torch

from server.checkpoint import Checkpoint, CheckpointError, CheckpointStore, decode, encode


def make(round_, seed=0):
    torch.manual_seed(seed)
    py, tr = Checkpoint.capture_rng()
    return Checkpoint(round=round_, model={"w": torch.randn(3, 4), "b": torch.zeros(4)},
                      run_config={"federation.rounds": 5}, rounds=[{"round": round_}],
                      site_epsilon={"0": 1.5}, python_rng=py, torch_rng=tr)


def same(a, b):
    assert a.round == b.round and a.run_config == b.run_config and a.rounds == b.rounds
    assert a.site_epsilon == b.site_epsilon
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)


def test_round_trip_is_exact():
    ckpt = make(3)
    same(decode(encode(ckpt)), ckpt)


def test_rng_state_restores_the_same_draws():
    random.seed(11)
    torch.manual_seed(11)
    ckpt = make(1)
    py, tr = Checkpoint.capture_rng()
    ckpt = Checkpoint(round=1, model={}, run_config={}, python_rng=py, torch_rng=tr)
    expected = (random.random(), torch.rand(3))
    random.seed(99)
    torch.manual_seed(99)
    decode(encode(ckpt)).restore_rng()
    got = (random.random(), torch.rand(3))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "empty"])
def test_damaged_bytes_are_refused(damage):
    data = bytearray(encode(make(2)))
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-10] ^= 0x01
    elif damage == "header":
        data[:5] = b"XXXXX"
    else:
        data = bytearray()
    with pytest.raises(CheckpointError):
        decode(bytes(data))


def test_store_rotates_and_returns_the_newest(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for r in range(1, 5):
        store.save(make(r))
    assert [p.name for p in store.files()] == ["round-000003.ckpt", "round-000004.ckpt"]
    assert store.latest().round == 4
    assert (store.files()[0].stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, caplog):
    store = CheckpointStore(tmp_path, keep=3)
    for r in (1, 2):
        store.save(make(r))
    newest = store.files()[-1]
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[:-100])
    else:  # a hand edit that keeps the length
        newest.write_bytes(data[:-50] + bytes([data[-50] ^ 0xFF]) + data[-49:])
    assert store.latest().round == 1
    assert "integrity check failed" in caplog.text


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.latest() is None  # nothing saved yet: a fresh run
    store.save(make(1))
    store.files()[0].write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        store.latest()


def test_stray_temp_files_are_ignored(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(make(1))
    (store.directory / ".round-000002.ckpt.abc.tmp").write_bytes(b"partial")
    assert store.latest().round == 1


def test_fedopt_strategy_state_survives_a_checkpoint():
    import numpy as np
    from flwr.serverapp.strategy import FedAdam, FedAvg

    from server.app import restore_strategy_state, strategy_state

    adam = FedAdam()
    adam.current_arrays = {"w": np.ones(3, np.float32)}
    adam.m_t, adam.v_t = {"w": np.full(3, 0.5, np.float32)}, {"w": np.full(3, 0.25, np.float32)}
    ckpt = Checkpoint(round=1, model={}, run_config={}, strategy_state=strategy_state(adam))
    fresh = FedAdam()
    restore_strategy_state(fresh, decode(encode(ckpt)).strategy_state)
    for name in ("current_arrays", "m_t", "v_t"):
        assert np.array_equal(getattr(fresh, name)["w"], getattr(adam, name)["w"])
    assert strategy_state(FedAvg()) == {}


def test_secagg_sites_bound_their_own_update_norm():
    import numpy as np

    from client.secagg_mod import _bounded

    update = np.full(4, 3.0, np.float32)  # norm 6
    assert np.linalg.norm(_bounded(update, 1.5)) == pytest.approx(1.5, rel=1e-6)
    assert _bounded(update, 10.0) is update and _bounded(update, 0.0) is update
    assert not _bounded(np.zeros(4, np.float32), 1.0).any()  # norm 0: untouched


def test_background_writer_keeps_order_and_surfaces_a_failed_write(tmp_path):
    from server.checkpoint import CheckpointWriter

    store = CheckpointStore(tmp_path / "run", keep=2)
    writer = CheckpointWriter(store)
    after: list[tuple[int, list[str]]] = []  # what `then` saw on disk when it ran
    for rnd in (1, 2, 3):
        writer.submit(make(rnd), then=lambda r=rnd: after.append(
            (r, [p.name for p in store.files()])))
    writer.close()  # waits for the last write
    assert [r for r, _ in after] == [1, 2, 3]
    assert all(f"round-{r:06d}.ckpt" in names for r, names in after)  # each after its save
    assert [p.name for p in store.files()] == ["round-000002.ckpt", "round-000003.ckpt"]
    assert store.latest().round == 3

    (tmp_path / "blocked").write_text("a file where the run folder should be")
    broken = CheckpointWriter(CheckpointStore(tmp_path / "blocked"))
    broken.submit(make(1))
    with pytest.raises(OSError):
        broken.submit(make(2))  # the failed write stops the run at the next round
    broken.close()
