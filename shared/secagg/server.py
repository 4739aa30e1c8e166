"""Server side of SecAgg+ as a pure state machine (no transport).

Drive it stage by stage: ``*_ins()`` closes the previous stage (its survivors are the clients
whose replies were accepted) and returns the messages to send, keyed by client index;
``receive(res)`` validates one reply as it arrives. ``finalize()`` closes the unmask stage and
returns the ring sum of the encoded inputs of ``survivors`` (the clients whose masked input
was folded in).

Guarantees:
    * Masked inputs are folded into ONE uint32 accumulator on arrival; no list of vectors is
      kept, so memory is one model-sized vector plus O(n * k) small state. Likewise a
      survivor's self mask is removed as soon as t shares of its seed are in, while the other
      unmask replies are still on their way; ``finalize`` does only what is left.
    * With enough surviving share holders (``t`` per client whose secret is needed) the result
      is exactly ``sum of encoded inputs of survivors mod 2**32``; otherwise ``SecAggAbort``
      is raised as soon as the shortfall is certain, and the session stays aborted.
    * A reply that fails validation raises ``ContractError`` and changes nothing: the driver
      may drop it, which is the same as that client dropping out at this stage.
    * The server never asks one client for both the self-mask seed and the mask key of one
      other client: survivors and dropped are disjoint.
"""

from __future__ import annotations

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
from shared.secagg.crypto import KeyPair
from shared.secagg.encoding import vector_length
from shared.secagg.errors import ContractError, SecAggAbort, StaleMessageError
from shared.secagg.params import SecAggParams

Reply = AdvertiseKeysRes | ShareKeysRes | CollectMaskedRes | UnmaskRes


class SecAggServer:
    """The server's SecAgg+ session for one (run, round).

    Args:
        params: validated round parameters (``params.n`` clients, indices ``0..n-1``).
        run_id, round_: the session's run and round; replies of others are rejected.
        n_params, n_metrics: the encoded vector layout (see ``encoding``).
    """

    def __init__(
        self, params: SecAggParams, run_id: int, round_: int, n_params: int, n_metrics: int = 0
    ) -> None:
        if not isinstance(params, SecAggParams):
            raise TypeError(f"params must be SecAggParams, got {type(params).__name__}")
        for name, value in (("n_params", n_params), ("n_metrics", n_metrics)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.params, self.run_id, self.round = params, run_id, round_
        self.n_params, self.n_metrics = n_params, n_metrics
        self.vector_len = vector_length(n_params, n_metrics)
        seed = graph.graph_seed(run_id, round_, params.n)
        self.neighbours = [frozenset(s) for s in graph.neighbours(params.n, params.k, seed)]
        self.stage_survivors: dict[Stage, frozenset[int]] = {}
        self._stage: Stage | None = None
        self._expected: frozenset[int] = frozenset(range(params.n))
        self._replied: set[int] = set()
        self._aborted: SecAggAbort | None = None
        self._pks: dict[int, tuple[bytes, bytes]] = {}
        self._inbox: dict[int, dict[int, bytes]] = {}  # receiver -> sender -> ciphertext
        self._acc = np.zeros(self.vector_len, dtype=np.uint32)
        self._shares: dict[str, dict[int, dict[int, np.ndarray]]] = {"seed": {}, "key": {}}
        self._unmasked: set[int] = set()  # survivors whose self mask is already removed

    # -- stage bookkeeping -----------------------------------------------------------------------
    def _advance(self, current: Stage | None, new: Stage | None) -> None:
        """Close stage ``current`` (its repliers survive) and open ``new``."""
        if self._aborted is not None:
            raise self._aborted
        if self._stage is not current or (current is None and self.stage_survivors):
            raise RuntimeError(f"cannot open {new} while the session is at {self._stage}")
        if current is not None:
            survivors = frozenset(self._replied)
            self.stage_survivors[current] = survivors
            self._expected = survivors
            self._check_threshold(current, survivors)
        self._stage, self._replied = new, set()

    def _abort(self, stage: Stage, reason: str) -> SecAggAbort:
        self._aborted = SecAggAbort(stage.value, reason)
        return self._aborted

    def _holders_alive(self, owner: int, alive: frozenset[int]) -> int:
        return len((self.neighbours[owner] | {owner}) & alive)

    def _needed_dropped(self) -> frozenset[int]:
        s = self.stage_survivors
        dropped = s[Stage.SHARE_KEYS] - s[Stage.COLLECT_MASKED]
        return frozenset(v for v in dropped if self.neighbours[v] & s[Stage.COLLECT_MASKED])

    def _check_threshold(self, stage: Stage, alive: frozenset[int]) -> None:
        if stage in (Stage.COLLECT_MASKED, Stage.UNMASK) and not self.stage_survivors.get(
            Stage.COLLECT_MASKED
        ):
            raise self._abort(stage, "no client sent a masked input")
        owners = set(self.stage_survivors.get(Stage.COLLECT_MASKED, alive))
        if stage in (Stage.COLLECT_MASKED, Stage.UNMASK):
            owners |= self._needed_dropped()
        short = {o: self._holders_alive(o, alive) for o in sorted(owners)}
        short = {o: c for o, c in short.items() if c < self.params.t}
        if short:
            raise self._abort(
                stage,
                f"clients {short} (client: surviving share holders) have fewer "
                f"than t={self.params.t} surviving share holders",
            )

    def receive(self, res: Reply) -> None:
        """Validate one reply of the current stage and record it (fold it, for masked inputs).

        Raises:
            StaleMessageError: another run, round or stage (replay), or a duplicate reply.
            ContractError: any other violation; the session is unchanged.
            SecAggAbort: the session was aborted earlier.
        """
        if self._aborted is not None:
            raise self._aborted
        res.expect(self.run_id, self.round)
        if res.STAGE is not self._stage:
            raise StaleMessageError(f"reply for stage {self._stage}, got {res.STAGE.value!r}")
        if res.client not in self._expected:
            raise ContractError(f"client {res.client} is not expected at {res.STAGE.value!r}")
        if res.client in self._replied:
            raise StaleMessageError(f"duplicate {res.STAGE.value!r} reply from {res.client}")
        handler = {
            Stage.ADVERTISE_KEYS: self._on_advertise,
            Stage.SHARE_KEYS: self._on_share,
            Stage.COLLECT_MASKED: self._on_masked,
            Stage.UNMASK: self._on_unmask,
        }
        handler[res.STAGE](res)  # type: ignore[operator]
        self._replied.add(res.client)

    # -- stage 1 -----------------------------------------------------------------------------------
    def advertise_keys_ins(self) -> dict[int, AdvertiseKeysIns]:
        """Open stage 1: parameters and index for every client."""
        self._advance(None, Stage.ADVERTISE_KEYS)
        p = self.params
        return {
            u: AdvertiseKeysIns(
                self.run_id,
                self.round,
                u,
                p.n,
                p.k,
                p.t,
                p.bits,
                float(p.clip_range),
                p.max_weight,
                float(p.metric_clip_range),
                self.n_params,
                self.n_metrics,
            )
            for u in range(p.n)
        }

    def _on_advertise(self, res: AdvertiseKeysRes) -> None:
        if res.channel_pk == res.mask_pk:
            raise ContractError(f"client {res.client} advertised one key for both purposes")
        seen = {pk for pair in self._pks.values() for pk in pair}
        if {res.channel_pk, res.mask_pk} & seen:
            raise ContractError(f"client {res.client} advertised another client's public key")
        self._pks[res.client] = (res.channel_pk, res.mask_pk)

    # -- stage 2 -----------------------------------------------------------------------------------
    def share_keys_ins(self) -> dict[int, ShareKeysIns]:
        """Close stage 1, open stage 2: each client gets its advertised neighbours' keys."""
        self._advance(Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS)
        out = {}
        for u in sorted(self._expected):
            peers = sorted(self.neighbours[u] & self._expected)
            out[u] = ShareKeysIns(
                self.run_id,
                self.round,
                u,
                tuple(peers),
                tuple(self._pks[v][0] for v in peers),
                tuple(self._pks[v][1] for v in peers),
            )
        return out

    def _on_share(self, res: ShareKeysRes) -> None:
        peers = self.neighbours[res.client] & self.stage_survivors[Stage.ADVERTISE_KEYS]
        if set(res.receivers) != peers:
            raise ContractError(
                f"client {res.client} sent bundles to {sorted(res.receivers)}, "
                f"expected its peers {sorted(peers)}"
            )
        for v, ct in zip(res.receivers, res.ciphertexts, strict=True):
            self._inbox.setdefault(v, {})[res.client] = ct

    # -- stage 3 -----------------------------------------------------------------------------------
    def collect_masked_ins(self) -> dict[int, CollectMaskedIns]:
        """Close stage 2, open stage 3: route bundles between clients that completed stage 2."""
        self._advance(Stage.SHARE_KEYS, Stage.COLLECT_MASKED)
        out = {}
        for u in sorted(self._expected):
            inbox = {v: ct for v, ct in self._inbox.get(u, {}).items() if v in self._expected}
            senders = sorted(inbox)
            out[u] = CollectMaskedIns(
                self.run_id, self.round, u, tuple(senders), tuple(inbox[v] for v in senders)
            )
        self._inbox = {}
        return out

    def _on_masked(self, res: CollectMaskedRes) -> None:
        if res.masked.shape != (self.vector_len,):
            raise ContractError(
                f"masked input of client {res.client} has shape "
                f"{res.masked.shape}, expected ({self.vector_len},)"
            )
        _masking.fold(self._acc, res.masked)

    # -- stage 4 -----------------------------------------------------------------------------------
    def unmask_ins(self) -> dict[int, UnmaskIns]:
        """Close stage 3, open stage 4: ask survivors for the shares that remove the masks."""
        self._advance(Stage.COLLECT_MASKED, Stage.UNMASK)
        survivors = tuple(sorted(self._expected))
        dropped = tuple(sorted(self.stage_survivors[Stage.SHARE_KEYS] - self._expected))
        return {u: UnmaskIns(self.run_id, self.round, u, survivors, dropped) for u in survivors}

    def _maskers(self, u: int) -> frozenset[int]:
        return self.neighbours[u] & self.stage_survivors[Stage.SHARE_KEYS]

    def _on_unmask(self, res: UnmaskRes) -> None:
        u, s = res.client, self.stage_survivors
        seed_owners = s[Stage.COLLECT_MASKED] & (self._maskers(u) | {u})
        key_owners = (s[Stage.SHARE_KEYS] - s[Stage.COLLECT_MASKED]) & self._maskers(u)
        if set(res.seed_owners) != seed_owners or set(res.key_owners) != key_owners:
            raise ContractError(
                f"client {u} revealed shares of {res.seed_owners}/"
                f"{res.key_owners}, expected {sorted(seed_owners)}/"
                f"{sorted(key_owners)}"
            )
        for kind, owners, blob in (
            ("seed", res.seed_owners, res.seed_shares),
            ("key", res.key_owners, res.key_shares),
        ):
            elems = np.frombuffer(blob, dtype="<u8").astype(np.uint64).reshape(-1, SHARE_ELEMS)
            if np.any(elems >= np.uint64(shamir.P)):
                raise ContractError(f"client {u} sent a share outside the field")
            for owner, row in zip(owners, elems, strict=True):
                self._shares[kind].setdefault(owner, {})[u] = row
        self._remove_self_masks(
            [o for o in res.seed_owners if len(self._shares["seed"][o]) == self.params.t]
        )

    def _remove_self_masks(self, owners: list[int]) -> None:
        """Subtract the self masks of survivors ``owners`` (each with >= t seed shares in)
        from the accumulator now, while other unmask replies are still on their way.

        Only survivors of the masked-input stage are seed owners (``_on_unmask`` checks), so
        this reveals nothing that ``finalize`` would not: it only does part of its work early.
        """
        owners = [o for o in owners if o not in self._unmasked]
        if not owners:
            return
        seeds = self._reconstruct("seed", owners)
        keys = [_masking.self_mask_key(seed, self.run_id, self.round) for seed in seeds]
        _masking.add_masks(self._acc, keys, [-1] * len(keys))
        self._unmasked.update(owners)

    def _reconstruct(self, kind: str, owners: list[int]) -> list[bytes]:
        t = self.params.t
        xs = np.zeros((len(owners), t), dtype=np.uint64)
        ys = np.zeros((len(owners), t, SHARE_ELEMS), dtype=np.uint64)
        for i, o in enumerate(owners):
            held = self._shares[kind][o]
            for j, h in enumerate(sorted(held)[:t]):
                xs[i, j], ys[i, j] = h + 1, held[h]
        secrets_ = shamir.reconstruct(xs, ys) if owners else np.zeros((0, SHARE_ELEMS))
        try:
            return [shamir.field_to_secret(row, 32) for row in secrets_]
        except ValueError as exc:
            raise self._abort(Stage.UNMASK, f"inconsistent {kind} shares") from exc

    def finalize(self) -> np.ndarray:
        """Close stage 4, remove all masks, return the ring sum of the survivors' inputs.

        Returns:
            uint32 array of ``vector_len``: ``sum(encoded inputs of survivors) mod 2**32``.
            Decode it with ``encoding.decode``.
        """
        self._advance(Stage.UNMASK, None)
        survivors = sorted(self.stage_survivors[Stage.COLLECT_MASKED])
        pending = [u for u in survivors if u not in self._unmasked]
        seeds = self._reconstruct("seed", pending)
        keys = [_masking.self_mask_key(seed, self.run_id, self.round) for seed in seeds]
        signs = [-1] * len(keys)
        dropped = sorted(self._needed_dropped())
        for v, raw in zip(dropped, self._reconstruct("key", dropped), strict=True):
            kp = KeyPair.from_secret_bytes(raw)
            if kp.public != self._pks[v][1]:
                raise self._abort(Stage.UNMASK, f"mask key of dropped client {v} is inconsistent")
            for u in sorted(self.neighbours[v] & set(survivors)):
                secret = kp.agree(self._pks[u][1])
                keys.append(_masking.pair_mask_key(secret, self.run_id, self.round, u, v))
                signs.append(-_masking.pair_sign(u, v))
        _masking.add_masks(self._acc, keys, signs)
        return self._acc

    @property
    def survivors(self) -> tuple[int, ...]:
        """Clients whose encoded inputs the sum contains (after stage 3 closed)."""
        return tuple(sorted(self.stage_survivors.get(Stage.COLLECT_MASKED, ())))
