"""Shared fixtures for the kernel tests: the issue's odd sizes and deterministic keys."""

import hashlib

import pytest
import torch

from kernels import MaskContext, MaskKey, MaskPurpose, derive_mask_key

SIZES = (0, 1, 1023, 1025, 10**6 + 3)


def make_key(label: str, purpose: MaskPurpose = MaskPurpose.SELF_MASK) -> MaskKey:
    """A reproducible MaskKey for tests (secret = SHA-256 of the label)."""
    secret = hashlib.sha256(label.encode()).digest()
    return derive_mask_key(secret, MaskContext(run_id="test", round=1, purpose=purpose))


@pytest.fixture
def gen() -> torch.Generator:
    """Test-data generator (not security relevant): fixed seed."""
    return torch.Generator().manual_seed(1234)
