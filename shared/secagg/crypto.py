"""Key agreement, key derivation and authenticated encryption for SecAgg+.

* X25519 key pairs (``cryptography``), generated from a caller-supplied CSPRNG byte source.
* HKDF-SHA256 derives a distinct 32-byte key per (purpose, run, round, unordered pair), so a
  key from one round or one purpose is useless in any other.
* Share bundles are sealed with ChaCha20-Poly1305 under a random 96-bit nonce; the associated
  data binds (protocol version, stage, run, round, sender, receiver). Opening a ciphertext that
  was tampered with, encrypted under another key, replayed from another round or run, or
  presented for another sender/receiver raises ``ShareDecryptionError``.

Guarantees:
    Private keys never leave ``KeyPair`` except through ``KeyPair.secret_bytes`` (used only to
    Shamir-share the mask key); ``repr`` of a ``KeyPair`` shows the public key only.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from shared.secagg.errors import ContractError, ShareDecryptionError

RandBytes = Callable[[int], bytes]
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_KDF_DOMAIN = b"privfed/secagg/kdf/v1"
_AD_DOMAIN = b"privfed/secagg/ad/v1"


class Purpose(enum.Enum):
    """What a derived key is for; part of the HKDF info, so keys never cross purposes."""

    SHARE_CHANNEL = "share-channel"


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair. ``repr`` and equality use the public key only."""

    _private: X25519PrivateKey = field(repr=False, compare=False)
    public: bytes

    @classmethod
    def generate(cls, randbytes: RandBytes = secrets.token_bytes) -> KeyPair:
        """Fresh key pair from 32 CSPRNG bytes (clamped by X25519)."""
        return cls.from_secret_bytes(randbytes(KEY_BYTES))

    @classmethod
    def from_secret_bytes(cls, raw: bytes) -> KeyPair:
        """Rebuild a key pair from its 32 raw private bytes (e.g. after Shamir recovery)."""
        if len(raw) != KEY_BYTES:
            raise ValueError(f"X25519 private key must be {KEY_BYTES} bytes, got {len(raw)}")
        sk = X25519PrivateKey.from_private_bytes(raw)
        return cls(sk, sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def secret_bytes(self) -> bytes:
        """The raw private key. Only for Shamir sharing; never put it in a message."""
        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def agree(self, peer_public: bytes) -> bytes:
        """X25519 shared secret with a peer's raw public key.

        Raises:
            ContractError: the peer key is malformed or of low order (all-zero secret).
        """
        if not isinstance(peer_public, bytes) or len(peer_public) != KEY_BYTES:
            raise ContractError(f"public key must be {KEY_BYTES} bytes, got {peer_public!r:.40}")
        try:
            return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:
            raise ContractError(f"unusable X25519 public key: {exc}") from exc


def _ints(*values: int) -> bytes:
    return b"".join(int(v).to_bytes(16, "little", signed=True) for v in values)


def derive_key(
    secret: bytes, *, purpose: Purpose, run_id: int, round_: int, a: int, b: int
) -> bytes:
    """HKDF-SHA256 of ``secret`` into a 32-byte key bound to (purpose, run, round, {a, b}).

    The pair is unordered: ``derive_key(..., a=u, b=v) == derive_key(..., a=v, b=u)``.
    (Mask keys are derived by ``kernels.derive_mask_key``, see ``_masking``.)
    """
    lo, hi = min(a, b), max(a, b)
    info = _KDF_DOMAIN + purpose.value.encode() + _ints(run_id, round_, lo, hi)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def associated_data(*, stage: str, run_id: int, round_: int, sender: int, receiver: int) -> bytes:
    """Associated data binding a ciphertext to its stage, round and direction."""
    return _AD_DOMAIN + stage.encode() + b"\0" + _ints(run_id, round_, sender, receiver)


def seal(
    key: bytes, plaintext: bytes, ad: bytes, randbytes: RandBytes = secrets.token_bytes
) -> bytes:
    """ChaCha20-Poly1305: ``nonce || ciphertext || tag`` (28 bytes of overhead)."""
    nonce = randbytes(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def open_sealed(key: bytes, blob: bytes, ad: bytes) -> bytes:
    """Inverse of ``seal``.

    Raises:
        ShareDecryptionError: tampered, wrong key, or wrong associated data (replay).
    """
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ShareDecryptionError(f"ciphertext too short: {len(blob)} bytes")
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], ad)
    except InvalidTag as exc:
        raise ShareDecryptionError(
            "share ciphertext failed authentication (tampered, wrong key, or replayed from "
            "another stage, round, run or pair)"
        ) from exc
