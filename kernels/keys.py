"""Mask and stream keys: HKDF-SHA256 from a 32-byte secret to a ChaCha20 key and nonce.

Every pseudorandom stream in privfed (pairwise and self masks, quantisation dither, DP
noise) is ChaCha20 under a :class:`MaskKey` derived here. Derivation is domain-separated by
run, round, purpose and (for pairwise masks) the unordered pair of node ids, so no two uses
share a stream. The full 256-bit key is kept; nothing is folded to a 32-bit seed.
"""

import enum
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kernels.chacha20 import KEY_BYTES, NONCE_BYTES

SECRET_BYTES = 32
_SALT = b"privfed/kernels/derive_mask_key/v1"
_U64 = 1 << 64


class MaskPurpose(enum.Enum):
    """What a derived stream is used for; each purpose gets unrelated keys."""

    PAIRWISE_MASK = "pairwise_mask"
    SELF_MASK = "self_mask"
    QUANTIZE_DITHER = "quantize_dither"
    DP_NOISE = "dp_noise"


@dataclass(frozen=True)
class MaskContext:
    """Where a stream is used: run, round, purpose and optionally a pair of node ids.

    ``pair`` is unordered: ``(a, b)`` and ``(b, a)`` derive the same key, so both ends of a
    pairwise mask agree; callers pick the sign from the order of the ids.

    Raises:
        TypeError, ValueError: on a non-str run id, a round or node id outside
            [0, 2**64), a purpose that is not a :class:`MaskPurpose`, or a pair of equal ids.
    """

    run_id: str
    round: int
    purpose: MaskPurpose
    pair: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str):
            raise TypeError(f"run_id must be a str, got {type(self.run_id).__name__}")
        if not isinstance(self.purpose, MaskPurpose):
            names = ", ".join(p.name for p in MaskPurpose)
            raise TypeError(f"purpose must be a MaskPurpose ({names}), got {self.purpose!r}")
        _check_u64("round", self.round)
        if self.pair is not None:
            if len(self.pair) != 2:
                raise ValueError(f"pair must hold two node ids, got {self.pair!r}")
            for node in self.pair:
                _check_u64("node id", node)
            if self.pair[0] == self.pair[1]:
                raise ValueError(f"pair must name two different nodes, got {self.pair!r}")

    def encode(self) -> bytes:
        """Unambiguous byte encoding used as HKDF ``info`` (length-prefixed fields)."""
        fields = [b"privfed-mask-context-v1", self.purpose.value.encode(), self.run_id.encode()]
        fields.append(self.round.to_bytes(8, "big"))
        if self.pair is not None:
            low, high = sorted(self.pair)
            fields += [low.to_bytes(8, "big"), high.to_bytes(8, "big")]
        return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


@dataclass(frozen=True, repr=False)
class MaskKey:
    """A ChaCha20 key (32 bytes) and nonce (12 bytes) for one stream; repr hides them."""

    key: bytes
    nonce: bytes

    def __post_init__(self) -> None:
        for name, value, size in (("key", self.key, KEY_BYTES), ("nonce", self.nonce, NONCE_BYTES)):
            if not isinstance(value, bytes) or len(value) != size:
                raise ValueError(f"MaskKey.{name} must be {size} bytes, got {value!r:.40}")

    def __repr__(self) -> str:
        return "MaskKey(<secret>)"


def derive_mask_key(shared_secret: bytes, context: MaskContext) -> MaskKey:
    """Derive the stream key for ``context`` from a 32-byte secret with HKDF-SHA256.

    Args:
        shared_secret: an X25519 shared secret or a 32-byte random seed (``os.urandom``).
        context: run, round, purpose and optional pair; see :class:`MaskContext`.

    Returns:
        A :class:`MaskKey` with the first 32 HKDF output bytes as key and the next 12 as
        nonce. Distinct contexts give independent keys (HKDF is a PRF in ``info``).

    Raises:
        TypeError: ``shared_secret`` is not bytes or ``context`` not a MaskContext.
        ValueError: the secret is not 32 bytes, or is all zeros (the X25519 output for a
            low-order peer key, which would make every mask public).
    """
    if not isinstance(shared_secret, bytes | bytearray):
        raise TypeError(f"shared_secret must be bytes, got {type(shared_secret).__name__}")
    if len(shared_secret) != SECRET_BYTES:
        raise ValueError(f"shared_secret must be {SECRET_BYTES} bytes, got {len(shared_secret)}")
    if not any(shared_secret):
        raise ValueError("shared_secret is all zeros; refusing a key every party can compute")
    if not isinstance(context, MaskContext):
        raise TypeError(f"context must be a MaskContext, got {type(context).__name__}")
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES + NONCE_BYTES, salt=_SALT,
        info=context.encode(),
    )
    material = hkdf.derive(bytes(shared_secret))
    return MaskKey(key=material[:KEY_BYTES], nonce=material[KEY_BYTES:])


def _check_u64(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < _U64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
