"""Exceptions raised by the SecAgg+ protocol core."""

from __future__ import annotations


class ContractError(ValueError):
    """A message does not follow the wire contract.

    Raised for wrong version, wrong run or round (a replay), wrong stage, wrong sender or
    receiver, missing or mistyped fields, and out-of-protocol requests. The message text says
    what was expected and what came.
    """


class ShareDecryptionError(ContractError):
    """A share ciphertext failed authentication.

    Raised when a ciphertext was tampered with, was encrypted under another key, or is bound to
    another (sender, receiver, run, round, stage) than the one it is presented for.
    """


class SecAggAbort(RuntimeError):
    """The round cannot complete without breaking privacy or correctness.

    Attributes:
        stage: the stage at which the round was aborted (``Stage.value``).
        reason: a human-readable reason, naming the clients at fault where known.
    """

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"SecAgg+ round aborted at stage {stage!r}: {reason}")
        self.stage = stage
        self.reason = reason


class StaleMessageError(ContractError):
    """A message belongs to another run or round (a replay) or to an unexpected stage."""
