"""Key agreement, KDF and share sealing: RFC vectors, tampering, wrong keys, replays."""

import numpy as np
import pytest

from kernels import MaskKey
from shared.secagg import _masking
from shared.secagg.crypto import (
    KeyPair,
    Purpose,
    associated_data,
    derive_key,
    open_sealed,
    seal,
)
from shared.secagg.errors import ContractError, ShareDecryptionError

H = bytes.fromhex


def test_x25519_rfc7748_vector():
    alice = KeyPair.from_secret_bytes(
        H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob = KeyPair.from_secret_bytes(
        H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    )
    assert alice.public == H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    shared = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert alice.agree(bob.public) == bob.agree(alice.public) == shared


def test_chacha20_poly1305_rfc8439_vector():
    key = bytes(range(0x80, 0xA0))
    nonce = H("070000004041424344454647")
    aad = H("50515253c0c1c2c3c4c5c6c7")
    plain = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
        b"the future, sunscreen would be it."
    )
    blob = seal(key, plain, aad, randbytes=lambda n: nonce)
    assert blob[:12] == nonce
    assert blob[12:20] == H("d31a8d34648e60db")
    assert blob[-16:] == H("1ae10b594f09e26a7e902ecbd0600691")
    assert open_sealed(key, blob, aad) == plain


def test_mask_stream_rfc8439_keystream_vector():
    # RFC 8439 A.1 test vector #1: all-zero key and nonce, block counter 0.
    expected = H(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
    )
    x = np.zeros(16, dtype=np.uint32)
    _masking.add_masks(x, [MaskKey(bytes(32), bytes(12))], [1])  # the mask is the keystream
    assert x.tobytes() == expected
    _masking.add_masks(x, [MaskKey(bytes(32), bytes(12))], [-1])
    assert not x.any()


def test_pair_masks_agree_and_cancel():
    a, b = KeyPair.generate(), KeyPair.generate()
    ka = _masking.pair_mask_key(a.agree(b.public), 1, 2, 3, 4)
    kb = _masking.pair_mask_key(b.agree(a.public), 1, 2, 4, 3)
    assert (ka.key, ka.nonce) == (kb.key, kb.nonce)
    assert _masking.pair_sign(3, 4) == -_masking.pair_sign(4, 3) == 1
    x = np.arange(1000, dtype=np.uint32)
    _masking.add_masks(x, [ka, kb], [_masking.pair_sign(3, 4), _masking.pair_sign(4, 3)])
    assert np.array_equal(x, np.arange(1000, dtype=np.uint32))
    other_round = _masking.pair_mask_key(a.agree(b.public), 1, 3, 3, 4)
    assert other_round.key != ka.key


def _ad(**kw):
    base = {"stage": "share-keys", "run_id": 1, "round_": 2, "sender": 3, "receiver": 4}
    return associated_data(**{**base, **kw})


def test_tampered_wrong_key_and_replayed_ciphertexts_rejected():
    key, other = b"k" * 32, b"o" * 32
    blob = seal(key, b"share bundle", _ad())
    for pos in (0, 11, 12, len(blob) - 17, len(blob) - 1):  # nonce, body, tag
        bad = bytearray(blob)
        bad[pos] ^= 1
        with pytest.raises(ShareDecryptionError):
            open_sealed(key, bytes(bad), _ad())
    with pytest.raises(ShareDecryptionError):
        open_sealed(other, blob, _ad())
    for changed in (
        {"round_": 1},
        {"run_id": 2},
        {"stage": "unmask"},
        {"sender": 4, "receiver": 3},
    ):
        with pytest.raises(ShareDecryptionError):
            open_sealed(key, blob, _ad(**changed))
    with pytest.raises(ShareDecryptionError, match="too short"):
        open_sealed(key, blob[:20], _ad())


def test_derived_keys_are_symmetric_and_separated():
    s = b"s" * 32
    base = {"purpose": Purpose.SHARE_CHANNEL, "run_id": 1, "round_": 2, "a": 3, "b": 4}
    k = derive_key(s, **base)
    assert k == derive_key(s, **{**base, "a": 4, "b": 3})
    for change in ({"run_id": 2}, {"round_": 3}, {"b": 5}):
        assert derive_key(s, **{**base, **change}) != k
    assert derive_key(b"t" * 32, **base) != k


def test_low_order_or_malformed_public_keys_rejected():
    kp = KeyPair.generate()
    with pytest.raises(ContractError, match="unusable"):
        kp.agree(bytes(32))
    with pytest.raises(ContractError, match="32 bytes"):
        kp.agree(b"short")


def test_keypair_repr_hides_the_private_key():
    kp = KeyPair.generate()
    text = repr(kp)
    assert kp.secret_bytes().hex() not in text and str(kp.secret_bytes()) not in text
    assert kp.public.hex() in text or repr(kp.public) in text
