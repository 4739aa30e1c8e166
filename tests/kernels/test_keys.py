"""derive_mask_key: HKDF-SHA256 (checked against RFC 5869 written out with hmac), separation."""

import hashlib
import hmac
import os

import pytest

from kernels import MaskContext, MaskKey, MaskPurpose, derive_mask_key

SECRET = bytes(range(1, 33))


def _hkdf_sha256(secret: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869, independently of `cryptography`."""
    prk = hmac.new(salt, secret, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out, i = out + block, i + 1
    return out[:length]


def _ctx(**kw) -> MaskContext:
    base = {"run_id": "run-7", "round": 3, "purpose": MaskPurpose.PAIRWISE_MASK, "pair": (5, 9)}
    return MaskContext(**(base | kw))


def test_matches_rfc5869_with_documented_info_encoding():
    ctx = _ctx()
    info = b"".join(
        len(f).to_bytes(4, "big") + f
        for f in [b"privfed-mask-context-v1", b"pairwise_mask", b"run-7", (3).to_bytes(8, "big"),
                  (5).to_bytes(8, "big"), (9).to_bytes(8, "big")]
    )
    material = _hkdf_sha256(SECRET, b"privfed/kernels/derive_mask_key/v1", info, 44)
    key = derive_mask_key(SECRET, ctx)
    assert (key.key, key.nonce) == (material[:32], material[32:])


def test_full_width_key_and_nonce():
    key = derive_mask_key(SECRET, _ctx())
    assert len(key.key) == 32 and len(key.nonce) == 12


def test_pair_is_unordered():
    assert derive_mask_key(SECRET, _ctx(pair=(5, 9))) == derive_mask_key(SECRET, _ctx(pair=(9, 5)))


@pytest.mark.parametrize(
    "change",
    [
        {"run_id": "run-8"},
        {"round": 4},
        {"purpose": MaskPurpose.SELF_MASK},
        {"pair": (5, 10)},
        {"pair": None},
    ],
)
def test_every_context_field_separates_keys(change):
    assert derive_mask_key(SECRET, _ctx()) != derive_mask_key(SECRET, _ctx(**change))


def test_all_purposes_give_distinct_keys():
    keys = {derive_mask_key(SECRET, _ctx(purpose=p)).key for p in MaskPurpose}
    assert len(keys) == len(MaskPurpose)


def test_different_secrets_differ():
    assert derive_mask_key(SECRET, _ctx()) != derive_mask_key(os.urandom(32), _ctx())


def test_repr_hides_key_material():
    key = derive_mask_key(SECRET, _ctx())
    assert key.key.hex() not in repr(key) and "secret" in repr(key)


@pytest.mark.parametrize(
    ("secret", "error", "match"),
    [
        (bytes(16), ValueError, "32 bytes, got 16"),
        (bytes(32), ValueError, "all zeros"),
        ("x" * 32, TypeError, "must be bytes"),
    ],
)
def test_bad_secrets_are_refused(secret, error, match):
    with pytest.raises(error, match=match):
        derive_mask_key(secret, _ctx())


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"round": -1}, ValueError, "round must be in"),
        ({"round": 2**64}, ValueError, "round must be in"),
        ({"purpose": "pairwise_mask"}, TypeError, "PAIRWISE_MASK, SELF_MASK"),
        ({"pair": (4, 4)}, ValueError, "two different nodes"),
        ({"pair": (1, 2, 3)}, ValueError, "two node ids"),
        ({"run_id": 7}, TypeError, "run_id must be a str"),
    ],
)
def test_bad_contexts_are_refused(kw, error, match):
    with pytest.raises(error, match=match):
        _ctx(**kw)


def test_mask_key_validates_lengths():
    with pytest.raises(ValueError, match="nonce must be 12 bytes"):
        MaskKey(key=bytes(32), nonce=bytes(8))
