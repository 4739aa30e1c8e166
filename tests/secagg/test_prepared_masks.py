"""Masks drawn before the input exists (``prepare_masks``) give the very reply of the one-step
path, serve one message once, and change nothing until ``collect_masked`` commits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kernels import MaskKey, reference_add_masks
from kernels.masking import mask_sum
from shared.secagg import shamir
from shared.secagg.client import SecAggClient
from shared.secagg.contract import Direction, Stage, parse
from shared.secagg.errors import ContractError, SecAggAbort, ShareDecryptionError, StaleMessageError
from shared.secagg.params import SecAggParams
from shared.secagg.server import SecAggServer
from tests.secagg._sim import drbg


def _wire(msg, direction):
    return parse(msg.from_bytes(msg.to_bytes()).to_dict(), direction)


def _at_collect(n=6, k=4, t=3, length=37):
    """Server and clients after stages 1-2, and each client's stage-3 message."""
    params = SecAggParams(n=n, k=k, t=t)
    server = SecAggServer(params, 7, 2, n_params=length - 1)
    clients = [SecAggClient(7, 2, drbg(100 + i)) for i in range(n)]
    for make, act in ((server.advertise_keys_ins, lambda c, m: c.advertise_keys(m)),
                      (server.share_keys_ins, lambda c, m: c.share_keys(m))):  # fmt: skip
        for u, ins in make().items():
            server.receive(_wire(act(clients[u], _wire(ins, Direction.INS)), Direction.RES))
    ins = {u: _wire(m, Direction.INS) for u, m in server.collect_masked_ins().items()}
    return server, clients, ins


def _inputs(n, length, seed=1):
    return np.random.default_rng(seed).integers(0, 2**32, (n, length), dtype=np.uint32)


@pytest.mark.parametrize("n", [0, 1, 1023, 1025, 65537, 10**6 + 3])
@pytest.mark.parametrize("signs", [[1, -1, 1], [-1, -1], [1]], ids=str)
def test_mask_sum_is_the_signed_sum_of_keystreams(n, signs):
    keys = [MaskKey(bytes([i + 1]) * 32, bytes([i]) * 12) for i in range(len(signs))]
    x = torch.full((n,), 12345, dtype=torch.int32)  # old values must not leak into the sum
    expected = reference_add_masks(torch.zeros(n, dtype=torch.int32), keys, signs)
    assert mask_sum(x, keys, signs) is x
    assert torch.equal(x, expected)


def test_mask_sum_of_no_keys_is_zero():
    x = torch.full((5,), 7, dtype=torch.int32)
    assert torch.equal(mask_sum(x, [], []), torch.zeros(5, dtype=torch.int32))


def test_prepared_reply_equals_the_one_step_reply_and_the_sum_is_exact():
    server, clients, ins = _at_collect()
    twins = [SecAggClient.from_local_state(c.to_local_state()) for c in clients]
    x = _inputs(len(clients), server.vector_len)
    for u, c in enumerate(clients):
        prepared = c.prepare_masks(ins[u])
        res = c.collect_masked(ins[u], x[u], prepared)
        assert np.array_equal(res.masked, twins[u].collect_masked(ins[u], x[u]).masked)
        assert c.to_local_state() == twins[u].to_local_state()
        server.receive(_wire(res, Direction.RES))
    unmask = server.unmask_ins()
    for u, c in enumerate(clients):
        server.receive(_wire(c.unmask(_wire(unmask[u], Direction.INS)), Direction.RES))
    assert np.array_equal(server.finalize(), x.sum(axis=0, dtype=np.uint64).astype(np.uint32))


def test_preparing_changes_nothing_in_the_session():
    _, clients, ins = _at_collect()
    before = clients[0].to_local_state()
    clients[0].prepare_masks(ins[0])
    assert clients[0].to_local_state() == before
    assert before["next"] == Stage.COLLECT_MASKED.value


def test_prepared_masks_serve_one_message_once():
    server, clients, ins = _at_collect()
    x = _inputs(2, server.vector_len)
    prepared = clients[0].prepare_masks(ins[0])
    with pytest.raises(ContractError, match="another message"):  # an equal copy is not it
        clients[0].collect_masked(dataclasses.replace(ins[0]), x[0], prepared)
    with pytest.raises(ContractError, match="another message"):  # drawn by another client
        clients[1].collect_masked(ins[1], x[1], clients[0].prepare_masks(ins[0]))
    clients[0].collect_masked(ins[0], x[0], prepared)
    twin = SecAggClient.from_local_state(clients[0].to_local_state())
    with pytest.raises(StaleMessageError):  # the session has moved on to unmasking
        twin.collect_masked(ins[0], x[0], prepared)
    assert prepared.used


def test_preparing_refuses_tampered_bundles_and_too_few_senders():
    _, clients, ins = _at_collect()
    bad = bytearray(ins[0].ciphertexts[0])
    bad[-1] ^= 1
    tampered = dataclasses.replace(ins[0], ciphertexts=(bytes(bad), *ins[0].ciphertexts[1:]))
    with pytest.raises(ShareDecryptionError):
        clients[0].prepare_masks(tampered)
    short = dataclasses.replace(ins[0], senders=ins[0].senders[:1],
                                ciphertexts=ins[0].ciphertexts[:1])  # fmt: skip
    with pytest.raises(SecAggAbort):
        clients[0].prepare_masks(short)


def test_a_missing_sender_leaves_its_pair_mask_out():
    # A neighbour that did not finish stage 2 sends no bundle: its pair mask is not drawn,
    # and the server removes nothing for it (it is not a masker of anyone).
    server, clients, ins = _at_collect()
    x = _inputs(len(clients), server.vector_len)
    for u, c in enumerate(clients):
        m = ins[u]
        drop = [i for i, v in enumerate(m.senders) if v == 5]
        if drop and u != 5:  # keep the bundles the server routed, minus site 5's
            keep = [i for i in range(len(m.senders)) if i not in drop]
            m = dataclasses.replace(m, senders=tuple(m.senders[i] for i in keep),
                                    ciphertexts=tuple(m.ciphertexts[i] for i in keep))  # fmt: skip
        prepared = c.prepare_masks(m)
        assert 5 not in prepared.bundles or u == 5
        one_step = SecAggClient.from_local_state(c.to_local_state()).collect_masked(m, x[u])
        assert np.array_equal(c.collect_masked(m, x[u], prepared).masked, one_step.masked)


def test_invmod_is_the_exact_inverse_for_any_shape():
    a = np.random.default_rng(3).integers(1, shamir.P, (4, 7), dtype=np.uint64)
    inv = shamir.invmod(a)
    assert inv.shape == a.shape and inv.dtype == np.uint64
    assert [int(v) for v in inv.reshape(-1)] == [pow(int(v), -1, shamir.P) for v in a.reshape(-1)]
    assert shamir.invmod(np.zeros((0,), dtype=np.uint64)).shape == (0,)


def test_parsed_masked_input_is_a_read_only_view_of_the_record_bytes():
    server, clients, ins = _at_collect()
    x = _inputs(1, server.vector_len)[0]
    res = clients[0].collect_masked(ins[0], x)
    d = res.to_dict()
    parsed = parse(d, Direction.RES)
    assert np.array_equal(parsed.masked, res.masked)
    assert not parsed.masked.flags.writeable
    assert np.shares_memory(parsed.masked, np.frombuffer(d["masked"], dtype=np.uint8))
