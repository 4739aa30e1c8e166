"""The SecAgg+ wire contract: stage names, record keys, versioned stage messages.

Every message is a frozen dataclass carrying ``(version, run_id, round, client)``: ``client`` is
the round-local index (0..n-1) of the client the message goes to (``*Ins``, server -> client) or
comes from (``*Res``, client -> server). Because each message names its own stage, run and
round, messages of different stages and rounds can ride in one transport message, each under
its ``record_name`` (e.g. round r + 1's key advertisement next to round r's masked input).

Serialisation:
    ``to_dict`` gives a flat ``dict[str, int | float | str | bytes | list[int] | list[bytes]]``
    (the value types of a Flower ``ConfigRecord``; ints fit in int64, the 64-bit ``run_id`` is a
    decimal string). ``to_bytes`` is a canonical binary form of the same dict.
    ``from_dict``/``from_bytes`` check version, stage, types and lengths and raise
    ``ContractError`` naming the field at fault; they never trust a sender.

No message type has a field that can hold a private key, a mask seed, or an unencrypted share
of them except ``UnmaskRes``, which carries exactly the shares the protocol reveals.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar

import numpy as np

from shared.secagg.codec import dict_from_bytes, dict_to_bytes
from shared.secagg.errors import ContractError, StaleMessageError
from shared.secagg.params import SecAggParams

PROTOCOL_VERSION = 1
RECORD_PREFIX = "privfed.secagg"
# Key of the client-side session state in the client's OWN storage (e.g. Flower's
# ``context.state``). It holds private keys: it must never be put into an outgoing message.
LOCAL_STATE_RECORD = f"{RECORD_PREFIX}.local-state"
PUBLIC_KEY_BYTES = 32

KEY_VERSION = "version"
KEY_STAGE = "stage"
KEY_RUN_ID = "run_id"
KEY_ROUND = "round"
KEY_CLIENT = "client"
KEY_MASKED = "masked"


class Stage(enum.Enum):
    """SecAgg+ stages, in protocol order."""

    ADVERTISE_KEYS = "advertise-keys"
    SHARE_KEYS = "share-keys"
    COLLECT_MASKED = "collect-masked"
    UNMASK = "unmask"


class Direction(enum.Enum):
    """``INS``: server -> client; ``RES``: client -> server."""

    INS = "ins"
    RES = "res"


def record_name(stage: Stage, direction: Direction) -> str:
    """Record key under which a stage message travels, e.g. ``privfed.secagg.unmask.res``."""
    return f"{RECORD_PREFIX}.{stage.value}.{direction.value}"


class Kind(enum.Enum):
    """Wire kinds of message fields."""

    INT = "int"
    FLOAT = "float"
    BYTES = "bytes"
    INTS = "ints"
    BYTES_LIST = "bytes_list"
    U32_ARRAY = "u32_array"


def _f(kind: Kind) -> Any:
    return dataclasses.field(metadata={"kind": kind})


@dataclasses.dataclass(frozen=True)
class _Message:
    STAGE: ClassVar[Stage]
    DIRECTION: ClassVar[Direction]

    run_id: int
    round: int
    client: int

    def __post_init__(self) -> None:
        if not 0 <= self.run_id < 1 << 64:
            raise ContractError(f"run_id must be in [0, 2**64), got {self.run_id}")
        if not 0 <= self.round < 1 << 63:
            raise ContractError(f"round must be a non-negative int64, got {self.round}")
        if not 0 <= self.client < 1 << 31:
            raise ContractError(f"client index must be in [0, 2**31), got {self.client}")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Flat dict of ConfigRecord-compatible values."""
        out: dict[str, Any] = {
            KEY_VERSION: PROTOCOL_VERSION,
            KEY_STAGE: self.STAGE.value,
            KEY_RUN_ID: str(self.run_id),
            KEY_ROUND: self.round,
            KEY_CLIENT: self.client,
        }
        for fld in dataclasses.fields(self)[3:]:
            out[fld.name] = _encode(fld.metadata["kind"], getattr(self, fld.name))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Parse and validate; raises ``ContractError`` naming the field at fault."""
        if not isinstance(d, dict):
            raise ContractError(f"{cls.__name__}: expected a dict, got {type(d).__name__}")
        version = _get(d, KEY_VERSION, int, cls)
        if version != PROTOCOL_VERSION:
            raise ContractError(
                f"{cls.__name__}: protocol version {PROTOCOL_VERSION} expected, got {version}"
            )
        stage = _get(d, KEY_STAGE, str, cls)
        if stage != cls.STAGE.value:
            raise StaleMessageError(
                f"{cls.__name__}: stage {cls.STAGE.value!r} expected, got {stage!r}"
            )
        run_id = _get(d, KEY_RUN_ID, str, cls)
        if not run_id.isdigit():
            raise ContractError(f"{cls.__name__}: run_id must be a decimal string, got {run_id!r}")
        kwargs: dict[str, Any] = {
            "run_id": int(run_id),
            "round": _get(d, KEY_ROUND, int, cls),
            "client": _get(d, KEY_CLIENT, int, cls),
        }
        for fld in dataclasses.fields(cls)[3:]:
            kwargs[fld.name] = _decode(fld.metadata["kind"], d, fld.name, cls)
        return cls(**kwargs)

    def to_bytes(self) -> bytes:
        """Canonical binary form of ``to_dict``."""
        return dict_to_bytes(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> Any:
        """Inverse of ``to_bytes``."""
        return cls.from_dict(dict_from_bytes(data))

    def expect(self, run_id: int, round_: int, client: int | None = None) -> None:
        """Reject a message of another run or round (a replay) or for another client."""
        if (self.run_id, self.round) != (run_id, round_):
            raise StaleMessageError(
                f"{type(self).__name__}: run {run_id} round {round_} expected, got run "
                f"{self.run_id} round {self.round} (replayed or stale message)"
            )
        if client is not None and self.client != client:
            raise ContractError(
                f"{type(self).__name__}: client {client} expected, got {self.client}"
            )


def _check_pairs(msg: _Message, ids: str, values: str, key_len: int | None = None) -> None:
    a, b = getattr(msg, ids), getattr(msg, values)
    if len(a) != len(b):
        raise ContractError(f"{type(msg).__name__}: {ids} and {values} lengths differ")
    if len(set(a)) != len(a):
        raise ContractError(f"{type(msg).__name__}: duplicate entries in {ids}: {list(a)}")
    if key_len is not None and any(len(v) != key_len for v in b):
        raise ContractError(f"{type(msg).__name__}: every {values} item must be {key_len} bytes")


@dataclasses.dataclass(frozen=True)
class AdvertiseKeysIns(_Message):
    """Stage 1, server -> client: the round's parameters and the client's index.

    ``n_params`` model coordinates and ``n_metrics`` weighted metrics are encoded; the masked
    vector has ``n_params + 1 + n_metrics`` ring elements (see ``encoding``).
    """

    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    DIRECTION: ClassVar[Direction] = Direction.INS
    n: int = _f(Kind.INT)
    k: int = _f(Kind.INT)
    t: int = _f(Kind.INT)
    bits: int = _f(Kind.INT)
    clip_range: float = _f(Kind.FLOAT)
    max_weight: int = _f(Kind.INT)
    metric_clip_range: float = _f(Kind.FLOAT)
    n_params: int = _f(Kind.INT)
    n_metrics: int = _f(Kind.INT)

    @property
    def params(self) -> SecAggParams:
        """The validated parameters (raises ValueError when they are invalid)."""
        return SecAggParams(
            n=self.n,
            k=self.k,
            t=self.t,
            bits=self.bits,
            clip_range=self.clip_range,
            max_weight=self.max_weight,
            metric_clip_range=self.metric_clip_range,
        )


@dataclasses.dataclass(frozen=True)
class AdvertiseKeysRes(_Message):
    """Stage 1, client -> server: two X25519 public keys (share channel, pairwise masks)."""

    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    DIRECTION: ClassVar[Direction] = Direction.RES
    channel_pk: bytes = _f(Kind.BYTES)
    mask_pk: bytes = _f(Kind.BYTES)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("channel_pk", "mask_pk"):
            if len(getattr(self, name)) != PUBLIC_KEY_BYTES:
                raise ContractError(f"AdvertiseKeysRes: {name} must be {PUBLIC_KEY_BYTES} bytes")


@dataclasses.dataclass(frozen=True)
class ShareKeysIns(_Message):
    """Stage 2, server -> client: public keys of the client's neighbours that advertised."""

    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    DIRECTION: ClassVar[Direction] = Direction.INS
    peers: tuple[int, ...] = _f(Kind.INTS)
    channel_pks: tuple[bytes, ...] = _f(Kind.BYTES_LIST)
    mask_pks: tuple[bytes, ...] = _f(Kind.BYTES_LIST)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_pairs(self, "peers", "channel_pks", PUBLIC_KEY_BYTES)
        _check_pairs(self, "peers", "mask_pks", PUBLIC_KEY_BYTES)


@dataclasses.dataclass(frozen=True)
class ShareKeysRes(_Message):
    """Stage 2, client -> server: one sealed share bundle per neighbour."""

    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    DIRECTION: ClassVar[Direction] = Direction.RES
    receivers: tuple[int, ...] = _f(Kind.INTS)
    ciphertexts: tuple[bytes, ...] = _f(Kind.BYTES_LIST)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_pairs(self, "receivers", "ciphertexts")


@dataclasses.dataclass(frozen=True)
class CollectMaskedIns(_Message):
    """Stage 3, server -> client: the sealed bundles addressed to this client."""

    STAGE: ClassVar[Stage] = Stage.COLLECT_MASKED
    DIRECTION: ClassVar[Direction] = Direction.INS
    senders: tuple[int, ...] = _f(Kind.INTS)
    ciphertexts: tuple[bytes, ...] = _f(Kind.BYTES_LIST)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_pairs(self, "senders", "ciphertexts")


@dataclasses.dataclass(frozen=True, eq=False)
class CollectMaskedRes(_Message):
    """Stage 3, client -> server: the masked encoded input, uint32 (4 bytes per element).

    Parsed from a record, ``masked`` is a read-only view of the record's bytes (no copy).
    """

    STAGE: ClassVar[Stage] = Stage.COLLECT_MASKED
    DIRECTION: ClassVar[Direction] = Direction.RES
    masked: np.ndarray = _f(Kind.U32_ARRAY)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.masked, np.ndarray) or self.masked.dtype != np.uint32:
            raise ContractError("CollectMaskedRes: masked must be a uint32 numpy array")
        if self.masked.ndim != 1:
            raise ContractError(f"CollectMaskedRes: masked must be 1-D, got {self.masked.shape}")


@dataclasses.dataclass(frozen=True)
class UnmaskIns(_Message):
    """Stage 4, server -> client: who was aggregated (``survivors``) and who dropped after
    sharing keys (``dropped``). The client reveals self-mask-seed shares of survivors and
    mask-key shares of dropped clients, never both for one client."""

    STAGE: ClassVar[Stage] = Stage.UNMASK
    DIRECTION: ClassVar[Direction] = Direction.INS
    survivors: tuple[int, ...] = _f(Kind.INTS)
    dropped: tuple[int, ...] = _f(Kind.INTS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if set(self.survivors) & set(self.dropped):
            raise ContractError("UnmaskIns: a client cannot be both survivor and dropped")


@dataclasses.dataclass(frozen=True)
class UnmaskRes(_Message):
    """Stage 4, client -> server: Shamir shares, ``share_elems`` uint64 field elements each
    (little-endian, concatenated in owner order)."""

    STAGE: ClassVar[Stage] = Stage.UNMASK
    DIRECTION: ClassVar[Direction] = Direction.RES
    seed_owners: tuple[int, ...] = _f(Kind.INTS)
    seed_shares: bytes = _f(Kind.BYTES)
    key_owners: tuple[int, ...] = _f(Kind.INTS)
    key_shares: bytes = _f(Kind.BYTES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if set(self.seed_owners) & set(self.key_owners):
            raise ContractError("UnmaskRes: one client's seed and key shares both revealed")
        for owners, blob in (
            (self.seed_owners, self.seed_shares),
            (self.key_owners, self.key_shares),
        ):
            if len(set(owners)) != len(owners):
                raise ContractError(f"UnmaskRes: duplicate owners {list(owners)}")
            if len(blob) != 8 * SHARE_ELEMS * len(owners):
                raise ContractError(
                    f"UnmaskRes: {len(owners)} shares need {8 * SHARE_ELEMS * len(owners)} "
                    f"bytes, got {len(blob)}"
                )


SHARE_ELEMS = 5  # field elements per shared 32-byte secret (7-byte chunks)

MESSAGE_TYPES: dict[tuple[Stage, Direction], type[_Message]] = {
    (cls.STAGE, cls.DIRECTION): cls
    for cls in (
        AdvertiseKeysIns,
        AdvertiseKeysRes,
        ShareKeysIns,
        ShareKeysRes,
        CollectMaskedIns,
        CollectMaskedRes,
        UnmaskIns,
        UnmaskRes,
    )
}


def parse(d: dict[str, Any], direction: Direction) -> _Message:
    """Parse a dict into the message type its ``stage`` names."""
    stage_value = d.get(KEY_STAGE) if isinstance(d, dict) else None
    try:
        stage = Stage(stage_value)
    except ValueError:
        names = [s.value for s in Stage]
        raise ContractError(f"stage must be one of {names}, got {stage_value!r}") from None
    return MESSAGE_TYPES[(stage, direction)].from_dict(d)


# -- field codecs ------------------------------------------------------------------------------
def _encode(kind: Kind, value: Any) -> Any:
    if kind in (Kind.INTS, Kind.BYTES_LIST):
        return list(value)
    if kind is Kind.U32_ARRAY:
        return np.ascontiguousarray(value, dtype="<u4").tobytes()
    return value


def _get(d: dict[str, Any], key: str, typ: type, cls: type) -> Any:
    if key not in d:
        raise ContractError(f"{cls.__name__}: missing field {key!r}")
    value = d[key]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or isinstance(value, bool):
        raise ContractError(
            f"{cls.__name__}: field {key!r} must be {typ.__name__}, got {type(value).__name__}"
        )
    return value


def _decode(kind: Kind, d: dict[str, Any], key: str, cls: type) -> Any:
    if kind is Kind.INT:
        return _get(d, key, int, cls)
    if kind is Kind.FLOAT:
        return _get(d, key, float, cls)
    if kind is Kind.BYTES:
        return _get(d, key, bytes, cls)
    if kind is Kind.U32_ARRAY:
        raw = _get(d, key, bytes, cls)
        if len(raw) % 4:
            raise ContractError(f"{cls.__name__}: {key!r} length {len(raw)} not a multiple of 4")
        view = np.frombuffer(raw, dtype="<u4")  # read-only, shares the record's bytes
        return view if view.dtype == np.uint32 else view.astype(np.uint32)  # big-endian host
    items = _get(d, key, list, cls)
    typ = int if kind is Kind.INTS else bytes
    if not all(isinstance(v, typ) and not isinstance(v, bool) for v in items):
        raise ContractError(f"{cls.__name__}: every item of {key!r} must be {typ.__name__}")
    return tuple(items)
