"""Wire contract: round trips, ConfigRecord value types, and rejection of malformed input."""

import numpy as np
import pytest

from shared.secagg import contract as c
from shared.secagg.codec import dict_from_bytes, dict_to_bytes
from shared.secagg.errors import ContractError, StaleMessageError

PK = bytes(range(32))
PK2 = bytes(range(1, 33))
HDR = {"run_id": 2**64 - 1, "round": 5, "client": 2}
MESSAGES = [
    c.AdvertiseKeysIns(**HDR, n=6, k=5, t=3, bits=16, clip_range=1.0, max_weight=10,
                       metric_clip_range=100.0, n_params=100, n_metrics=2),
    c.AdvertiseKeysRes(**HDR, channel_pk=PK, mask_pk=PK2),
    c.ShareKeysIns(**HDR, peers=(0, 1), channel_pks=(PK, PK2), mask_pks=(PK2, PK)),
    c.ShareKeysRes(**HDR, receivers=(0, 1), ciphertexts=(b"a" * 40, b"b" * 40)),
    c.CollectMaskedIns(**HDR, senders=(), ciphertexts=()),
    c.CollectMaskedRes(**HDR, masked=np.array([0, 1, 2**32 - 1], dtype=np.uint32)),
    c.UnmaskIns(**HDR, survivors=(0, 2), dropped=(1,)),
    c.UnmaskRes(**HDR, seed_owners=(0,), seed_shares=bytes(40), key_owners=(1, 3),
                key_shares=bytes(80)),
]  # fmt: skip
CONFIG_TYPES = (int, float, str, bytes)


def _same(a, b):
    assert type(a) is type(b)
    if isinstance(a, c.CollectMaskedRes):
        assert np.array_equal(a.masked, b.masked) and a.masked.dtype == b.masked.dtype
        assert (a.run_id, a.round, a.client) == (b.run_id, b.round, b.client)
    else:
        assert a == b


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_roundtrip_and_config_record_types(msg):
    d = msg.to_dict()
    for key, value in d.items():
        if isinstance(value, list):
            assert all(isinstance(v, (int, bytes)) for v in value), key
        else:
            assert isinstance(value, CONFIG_TYPES) and not isinstance(value, bool), key
        if isinstance(value, int):
            assert -(2**63) <= value < 2**63
    assert d[c.KEY_VERSION] == c.PROTOCOL_VERSION and d[c.KEY_STAGE] == msg.STAGE.value
    _same(type(msg).from_dict(d), msg)
    _same(type(msg).from_bytes(msg.to_bytes()), msg)
    _same(c.parse(d, msg.DIRECTION), msg)
    assert dict_to_bytes(d) == msg.to_bytes()


def test_record_names_are_unique_per_stage_and_direction():
    names = {c.record_name(s, d) for s in c.Stage for d in c.Direction}
    assert len(names) == 8 and all(n.startswith(c.RECORD_PREFIX) for n in names)


def test_masked_upload_is_4_bytes_per_element():
    msg = c.CollectMaskedRes(**HDR, masked=np.zeros(10_000, dtype=np.uint32))
    assert 40_000 <= len(msg.to_bytes()) <= 40_000 + 200


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda d: d.update(version=2), ContractError, "protocol version 1 expected, got 2"),
        (lambda d: d.update(stage="unmask"), StaleMessageError, "stage 'advertise-keys'"),
        (lambda d: d.pop("mask_pk"), ContractError, "missing field 'mask_pk'"),
        (lambda d: d.update(mask_pk="x"), ContractError, "'mask_pk' must be bytes, got str"),
        (lambda d: d.update(mask_pk=b"x"), ContractError, "mask_pk must be 32 bytes"),
        (lambda d: d.update(run_id="-1"), ContractError, "decimal string"),
        (lambda d: d.update(round=-1), ContractError, "round must be"),
        (lambda d: d.update(client=True), ContractError, "'client' must be int, got bool"),
    ],
)
def test_malformed_dicts_rejected(mutate, error, match):
    d = MESSAGES[1].to_dict()
    mutate(d)
    with pytest.raises(error, match=match):
        c.AdvertiseKeysRes.from_dict(d)


def test_malformed_lists_and_arrays_rejected():
    d = MESSAGES[2].to_dict()
    d["peers"] = [0]
    with pytest.raises(ContractError, match="lengths differ"):
        c.ShareKeysIns.from_dict(d)
    d = MESSAGES[5].to_dict()
    d["masked"] = b"12345"
    with pytest.raises(ContractError, match="multiple of 4"):
        c.CollectMaskedRes.from_dict(d)
    with pytest.raises(ContractError, match="both survivor and dropped"):
        c.UnmaskIns(**HDR, survivors=(1,), dropped=(1,))
    with pytest.raises(ContractError, match="seed and key shares both"):
        c.UnmaskRes(**HDR, seed_owners=(1,), seed_shares=bytes(40), key_owners=(1,),
                    key_shares=bytes(40))  # fmt: skip
    with pytest.raises(ContractError, match="need 40 bytes"):
        c.UnmaskRes(**HDR, seed_owners=(1,), seed_shares=bytes(8), key_owners=(),
                    key_shares=b"")  # fmt: skip
    with pytest.raises(ContractError, match="stage must be one of"):
        c.parse({"stage": "nope"}, c.Direction.INS)


def test_malformed_bytes_rejected():
    raw = MESSAGES[3].to_bytes()
    with pytest.raises(ContractError, match="truncated"):
        dict_from_bytes(raw[:-3])
    with pytest.raises(ContractError, match="trailing"):
        dict_from_bytes(raw + b"\0")
    with pytest.raises(ContractError, match="magic"):
        dict_from_bytes(b"XXXX" + raw[4:])
    with pytest.raises(ContractError, match="bool is not a wire type"):
        dict_to_bytes({"x": True})


def test_expect_rejects_other_round_run_or_client():
    msg = MESSAGES[1]
    msg.expect(2**64 - 1, 5, 2)
    with pytest.raises(StaleMessageError, match="replayed or stale"):
        msg.expect(2**64 - 1, 6)
    with pytest.raises(StaleMessageError, match="replayed or stale"):
        msg.expect(1, 5)
    with pytest.raises(ContractError, match="client 3 expected"):
        msg.expect(2**64 - 1, 5, 3)
