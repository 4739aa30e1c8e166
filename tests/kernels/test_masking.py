"""add_masks against its reference; masks cancel exactly; bad arguments are refused."""

import pytest
import torch

from kernels import RING_DTYPE, MaskKey, add_masks, chacha20_keystream, reference_add_masks
from tests.kernels.conftest import SIZES, make_key


def _ring(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(RING_DTYPE)


@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(n, gen):
    x = _ring(n, gen)
    keys, signs = [make_key("a"), make_key("b"), make_key("c")], [1, -1, 1]
    expected = reference_add_masks(x, keys, signs)
    assert add_masks(x, keys, signs) is x
    assert torch.equal(x, expected)


@pytest.mark.parametrize("n", [1, 1025, 10**6 + 3])
def test_plus_and_minus_cancel_exactly(n, gen):
    x = _ring(n, gen)
    original = x.clone()
    keys = [make_key("p"), make_key("q")]
    add_masks(x, keys, [1, 1])
    assert not torch.equal(x, original)
    add_masks(x, keys[::-1], [-1, -1])
    assert torch.equal(x, original)


def test_pairwise_masks_cancel_in_a_sum(gen):
    # Client 0 adds +m, client 1 adds -m: their masked sum equals the plain sum mod 2**32.
    a, b = _ring(4097, gen), _ring(4097, gen)
    key = make_key("pair")
    masked = add_masks(a.clone(), [key], [1]).add_(add_masks(b.clone(), [key], [-1]))
    assert torch.equal(masked, a + b)


def test_mask_is_the_keystream(gen):
    key = make_key("k")
    x = torch.zeros(100, dtype=RING_DTYPE)
    add_masks(x, [key], [1])
    assert torch.equal(x, chacha20_keystream(key.key, key.nonce, 0, 100))


def test_works_on_any_contiguous_shape(gen):
    x = _ring(6 * 7, gen).view(6, 7)
    expected = reference_add_masks(x, [make_key("s")], [-1])
    assert torch.equal(add_masks(x, [make_key("s")], [-1]), expected)


def test_no_keys_is_identity(gen):
    x = _ring(10, gen)
    assert torch.equal(add_masks(x.clone(), [], []), x)


@pytest.mark.parametrize(
    ("x", "keys", "signs", "error", "match"),
    [
        (torch.zeros(4, dtype=torch.int64), ["k"], [1], TypeError, "dtype torch.int32"),
        (torch.zeros(4, 2, dtype=RING_DTYPE).t(), ["k"], [1], ValueError, "contiguous"),
        (torch.zeros(4, dtype=RING_DTYPE), ["k"], [1, 1], ValueError, "1 keys, 2 signs"),
        (torch.zeros(4, dtype=RING_DTYPE), ["k"], [2], ValueError, "\\+1 or -1, got 2"),
        (torch.zeros(4, dtype=RING_DTYPE), [b"x" * 32], [1], TypeError, "MaskKey"),
    ],
)
def test_bad_arguments_are_refused(x, keys, signs, error, match):
    keys = [make_key(k) if k == "k" else k for k in keys]
    with pytest.raises(error, match=match):
        add_masks(x, keys, signs)


def test_key_with_raw_zero_nonce_matches_secagg_adapter_semantics():
    # shared.secagg uses ChaCha20(key, nonce=0, counter=0); a MaskKey can carry that nonce.
    key = MaskKey(key=bytes(range(32)), nonce=bytes(12))
    x = torch.zeros(16, dtype=RING_DTYPE)
    add_masks(x, [key], [1])
    assert torch.equal(x, chacha20_keystream(bytes(range(32)), bytes(12), 0, 16))
