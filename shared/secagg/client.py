"""Client side of SecAgg+ as a pure state machine (no transport).

``SecAggClient`` is driven by the four stage messages in order; each call validates the
incoming message (run, round, own index, stage order, peers) and returns the reply.

Guarantees:
    * Private keys, the self-mask seed and this client's own shares appear in no reply;
      ``UnmaskRes`` reveals, per other client, either a seed share or a key share, never both,
      and never this client's own mask-key share.
    * A message of another run or round, out of stage order, or naming a non-neighbour raises
      ``ContractError`` and leaves the session unchanged.
    * Fewer than t holders reachable for this client's secrets raises ``SecAggAbort``.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.secagg import _masking, graph, shamir
from shared.secagg.contract import (
    SHARE_ELEMS,
    AdvertiseKeysIns,
    AdvertiseKeysRes,
    CollectMaskedIns,
    CollectMaskedRes,
    ShareKeysIns,
    ShareKeysRes,
    Stage,
    UnmaskIns,
    UnmaskRes,
)
from shared.secagg.crypto import (
    KeyPair,
    Purpose,
    RandBytes,
    associated_data,
    derive_key,
    open_sealed,
    seal,
)
from shared.secagg.encoding import vector_length
from shared.secagg.errors import ContractError, SecAggAbort, StaleMessageError
from shared.secagg.params import SecAggParams


@dataclass(eq=False)
class PreparedMasks:
    """Stage 3 work done before the input exists (``SecAggClient.prepare_masks``). SECRET."""

    ins: CollectMaskedIns
    bundles: dict[int, tuple[np.ndarray, np.ndarray]]
    masks: np.ndarray
    used: bool = False


_SHARE_HEADER = struct.Struct("<Qqii")  # run_id, round, sender, receiver
SHARE_PLAINTEXT_BYTES = _SHARE_HEADER.size + 2 * 8 * SHARE_ELEMS


def pack_shares(
    run_id: int, round_: int, sender: int, receiver: int, seed: np.ndarray, key: np.ndarray
) -> bytes:
    """Plaintext of one share bundle: header, seed share, mask-key share."""
    body = np.concatenate([seed, key]).astype("<u8").tobytes()
    return _SHARE_HEADER.pack(run_id, round_, sender, receiver) + body


def unpack_shares(
    plain: bytes, expected: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``pack_shares``; the header must equal ``expected``."""
    if len(plain) != SHARE_PLAINTEXT_BYTES:
        raise ContractError(f"share bundle must be {SHARE_PLAINTEXT_BYTES} bytes, got {len(plain)}")
    header = _SHARE_HEADER.unpack(plain[: _SHARE_HEADER.size])
    if header != expected:
        raise ContractError(f"share bundle header {header} does not match {expected}")
    elems = np.frombuffer(plain[_SHARE_HEADER.size :], dtype="<u8").astype(np.uint64)
    if np.any(elems >= np.uint64(shamir.P)):
        raise ContractError("share bundle holds a value outside the field")
    return elems[:SHARE_ELEMS], elems[SHARE_ELEMS:]


class SecAggClient:
    """One client's SecAgg+ session for one (run, round).

    Args:
        run_id: the run this session belongs to.
        round_: the round this session belongs to.
        randbytes: CSPRNG byte source for keys, seed, Shamir coefficients and AEAD nonces.
    """

    def __init__(self, run_id: int, round_: int, randbytes: RandBytes = secrets.token_bytes):
        self.run_id, self.round = run_id, round_
        self._rand = randbytes
        self._next: Stage | None = Stage.ADVERTISE_KEYS
        self._peers: dict[int, tuple[bytes, bytes]] = {}  # v -> (channel_pk, mask_pk)
        self._held: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # owner -> (seed, key) share

    def _begin(
        self, stage: Stage, msg: AdvertiseKeysIns | ShareKeysIns | CollectMaskedIns | UnmaskIns
    ) -> None:
        client = None if stage is Stage.ADVERTISE_KEYS else self.index
        msg.expect(self.run_id, self.round, client)
        if self._next is None:
            raise StaleMessageError(f"session for round {self.round} is finished")
        if stage is not self._next:
            raise StaleMessageError(f"stage {self._next.value!r} expected, got {stage.value!r}")

    def advertise_keys(self, ins: AdvertiseKeysIns) -> AdvertiseKeysRes:
        """Stage 1: validate parameters, learn neighbours, generate keys and self-mask seed."""
        self._begin(Stage.ADVERTISE_KEYS, ins)
        try:
            self.params = ins.params
        except ValueError as exc:
            raise ContractError(f"invalid SecAgg parameters from server: {exc}") from exc
        if not 0 <= ins.client < ins.n or min(ins.n_params, ins.n_metrics) < 0:
            raise ContractError(
                f"bad index {ins.client} or layout ({ins.n_params}, {ins.n_metrics}) for n={ins.n}"
            )
        self.index = ins.client
        self.vector_len = vector_length(ins.n_params, ins.n_metrics)
        seed = graph.graph_seed(self.run_id, self.round, ins.n)
        self.neighbours = frozenset(graph.neighbours(ins.n, ins.k, seed)[ins.client])
        self._channel = KeyPair.generate(self._rand)
        self._mask = KeyPair.generate(self._rand)
        self._seed = self._rand(32)
        self._next = Stage.SHARE_KEYS
        return AdvertiseKeysRes(
            self.run_id, self.round, self.index, self._channel.public, self._mask.public
        )

    def _channel_key(self, peer: int) -> bytes:
        secret = self._channel.agree(self._peers[peer][0])
        return derive_key(
            secret,
            purpose=Purpose.SHARE_CHANNEL,
            run_id=self.run_id,
            round_=self.round,
            a=self.index,
            b=peer,
        )

    def _ad(self, sender: int, receiver: int) -> bytes:
        return associated_data(
            stage=Stage.SHARE_KEYS.value,
            run_id=self.run_id,
            round_=self.round,
            sender=sender,
            receiver=receiver,
        )

    def share_keys(self, ins: ShareKeysIns) -> ShareKeysRes:
        """Stage 2: Shamir-share seed and mask key among neighbours + self, seal per peer."""
        self._begin(Stage.SHARE_KEYS, ins)
        if not set(ins.peers) <= self.neighbours:
            raise ContractError(
                f"peers {sorted(set(ins.peers) - self.neighbours)} are not "
                f"neighbours of client {self.index}"
            )
        own = {self._channel.public, self._mask.public}
        if own & (set(ins.channel_pks) | set(ins.mask_pks)):
            raise ContractError("a peer advertised this client's own public key")
        if len(ins.peers) + 1 < self.params.t:
            raise SecAggAbort(
                Stage.SHARE_KEYS.value,
                f"client {self.index} has {len(ins.peers)} peers + itself < t={self.params.t}",
            )
        self._peers = {
            v: (c, m) for v, c, m in zip(ins.peers, ins.channel_pks, ins.mask_pks, strict=True)
        }
        holders = sorted([*ins.peers, self.index])
        xs = [h + 1 for h in holders]
        seed_sh = shamir.split(shamir.secret_to_field(self._seed), xs, self.params.t, self._rand)
        key_sh = shamir.split(
            shamir.secret_to_field(self._mask.secret_bytes()), xs, self.params.t, self._rand
        )
        receivers, cts = [], []
        for row, h in enumerate(holders):
            if h == self.index:
                self._held[h] = (seed_sh[row], key_sh[row])
                continue
            plain = pack_shares(self.run_id, self.round, self.index, h, seed_sh[row], key_sh[row])
            cts.append(seal(self._channel_key(h), plain, self._ad(self.index, h), self._rand))
            receivers.append(h)
        self._next = Stage.COLLECT_MASKED
        return ShareKeysRes(self.run_id, self.round, self.index, tuple(receivers), tuple(cts))

    def _receive_bundles(self, ins: CollectMaskedIns) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        unknown = set(ins.senders) - set(self._peers)
        if unknown:
            raise ContractError(f"share bundles from non-peers {sorted(unknown)}")
        bundles = {}
        for v, ct in zip(ins.senders, ins.ciphertexts, strict=True):
            plain = open_sealed(self._channel_key(v), ct, self._ad(v, self.index))
            bundles[v] = unpack_shares(plain, (self.run_id, self.round, v, self.index))
        return bundles

    def prepare_masks(self, ins: CollectMaskedIns) -> PreparedMasks:
        """Stage 3, first half: open the neighbours' share bundles and draw this round's masks.

        Needs only ``ins`` and the session, not the input, so a site may run it on another
        thread while it trains. Changes nothing in the session: ``collect_masked`` commits.

        Returns:
            The opened bundles and the signed sum of the self mask and one pairwise mask per
            sender (SECRET: it hides the input; keep it local, pass it to ``collect_masked``).

        Raises:
            StaleMessageError, ContractError: ``ins`` is not this session's stage-3 message,
                or a bundle is from a non-peer, tampered with or misrouted.
            SecAggAbort: fewer than t holders (senders + this client).
        """
        self._begin(Stage.COLLECT_MASKED, ins)
        bundles = self._receive_bundles(ins)
        if len(bundles) + 1 < self.params.t:
            raise SecAggAbort(
                Stage.COLLECT_MASKED.value,
                f"client {self.index} has {len(bundles)} peers + itself < t={self.params.t}",
            )
        keys = [_masking.self_mask_key(self._seed, self.run_id, self.round)]
        signs = [1]
        for v in sorted(bundles):
            secret = self._mask.agree(self._peers[v][1])
            keys.append(_masking.pair_mask_key(secret, self.run_id, self.round, self.index, v))
            signs.append(_masking.pair_sign(self.index, v))
        return PreparedMasks(ins, bundles, _masking.mask_sum(self.vector_len, keys, signs))

    def collect_masked(
        self, ins: CollectMaskedIns, encoded: np.ndarray, prepared: PreparedMasks | None = None
    ) -> CollectMaskedRes:
        """Stage 3: store neighbours' shares and return the masked encoded input.

        Args:
            ins: the sealed bundles of the neighbours that completed stage 2.
            encoded: this client's input from ``encoding.encode`` (uint32, ``vector_len``).
            prepared: ``prepare_masks(ins)`` if already drawn (for this very ``ins``); its
                mask buffer becomes the reply's masked input, so it serves one call only.

        Raises:
            ValueError: ``encoded`` has the wrong dtype or shape.
            ContractError: ``prepared`` was drawn for another message or already used.
            Anything ``prepare_masks`` raises.
        """
        self._begin(Stage.COLLECT_MASKED, ins)
        encoded = np.asarray(encoded)
        if encoded.dtype != np.uint32 or encoded.shape != (self.vector_len,):
            raise ValueError(
                f"encoded input must be uint32 of shape ({self.vector_len},), "
                f"got {encoded.dtype} {encoded.shape}"
            )
        if prepared is None:
            prepared = self.prepare_masks(ins)
        elif prepared.ins is not ins or prepared.used:
            raise ContractError("masks were prepared for another message or already used")
        prepared.used = True
        self._held.update(prepared.bundles)
        self._maskers = frozenset(prepared.bundles)
        y = prepared.masks
        np.add(y, encoded, out=y)  # the masks buffer becomes the masked input
        self._next = Stage.UNMASK
        return CollectMaskedRes(self.run_id, self.round, self.index, y)

    def unmask(self, ins: UnmaskIns) -> UnmaskRes:
        """Stage 4: reveal seed shares of survivors and mask-key shares of dropped peers."""
        self._begin(Stage.UNMASK, ins)
        survivors, dropped = set(ins.survivors), set(ins.dropped)
        if self.index not in survivors:
            raise ContractError(f"client {self.index} sent its input but is not a survivor")
        if not dropped <= set(range(self.params.n)) or not survivors <= set(range(self.params.n)):
            raise ContractError("survivor or dropped index out of range")
        alive = survivors & (self._maskers | {self.index})
        if len(alive) < self.params.t:
            raise SecAggAbort(
                Stage.UNMASK.value,
                f"only {len(alive)} surviving holders around "
                f"client {self.index} < t={self.params.t}",
            )
        seed_owners = sorted(alive)
        key_owners = sorted(dropped & self._maskers)
        self._next = None  # session finished: every further message is rejected
        seed_blob = b"".join(self._held[o][0].astype("<u8").tobytes() for o in seed_owners)
        key_blob = b"".join(self._held[o][1].astype("<u8").tobytes() for o in key_owners)
        return UnmaskRes(
            self.run_id,
            self.round,
            self.index,
            tuple(seed_owners),
            seed_blob,
            tuple(key_owners),
            key_blob,
        )

    # -- local persistence (e.g. a ClientApp's context.state between stage messages) ------------
    def to_local_state(self) -> dict[str, Any]:
        """Session state as a flat ConfigRecord-compatible dict, for the client's own storage.

        Contains PRIVATE KEYS, the self-mask seed and held shares: store it only in the
        client's local state (``LOCAL_STATE_RECORD``), never in an outgoing message.
        """
        d: dict[str, Any] = {
            "run_id": str(self.run_id),
            "round": self.round,
            "next": "" if self._next is None else self._next.value,
        }
        if self._next is Stage.ADVERTISE_KEYS:
            return d
        d.update({f"params.{k}": v for k, v in self.params.to_dict().items()})
        d.update(
            index=self.index,
            vector_len=self.vector_len,
            neighbours=sorted(self.neighbours),
            channel_sk=self._channel.secret_bytes(),
            mask_sk=self._mask.secret_bytes(),
            seed=self._seed,
            peers=sorted(self._peers),
            peer_channel_pks=[self._peers[v][0] for v in sorted(self._peers)],
            peer_mask_pks=[self._peers[v][1] for v in sorted(self._peers)],
            held_owners=sorted(self._held),
            held=b"".join(
                np.concatenate(self._held[o]).astype("<u8").tobytes() for o in sorted(self._held)
            ),
            maskers=sorted(getattr(self, "_maskers", ())),
        )
        return d

    @classmethod
    def from_local_state(
        cls, d: dict[str, Any], randbytes: RandBytes = secrets.token_bytes
    ) -> SecAggClient:
        """Inverse of ``to_local_state``. Raises ``ContractError`` on a malformed state."""
        try:
            self = cls(int(d["run_id"]), d["round"], randbytes)
            self._next = Stage(d["next"]) if d["next"] else None
            if self._next is Stage.ADVERTISE_KEYS:
                return self
            self.params = SecAggParams.from_dict(
                {k.split(".", 1)[1]: v for k, v in d.items() if k.startswith("params.")}
            )
            self.index, self.vector_len = d["index"], d["vector_len"]
            self.neighbours = frozenset(d["neighbours"])
            self._channel = KeyPair.from_secret_bytes(d["channel_sk"])
            self._mask = KeyPair.from_secret_bytes(d["mask_sk"])
            self._seed = d["seed"]
            self._peers = {
                v: (c, m)
                for v, c, m in zip(
                    d["peers"], d["peer_channel_pks"], d["peer_mask_pks"], strict=True
                )
            }
            held = np.frombuffer(d["held"], dtype="<u8").astype(np.uint64)
            held = held.reshape(len(d["held_owners"]), 2, SHARE_ELEMS)
            self._held = {
                o: (row[0], row[1]) for o, row in zip(d["held_owners"], held, strict=True)
            }
            self._maskers = frozenset(d["maskers"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ContractError(f"malformed SecAgg client state: {exc}") from exc
        return self
