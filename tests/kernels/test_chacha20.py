"""chacha20_keystream against RFC 8439 vectors, OpenSSL via cryptography, and the reference."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from kernels import RING_DTYPE, chacha20_keystream, reference_chacha20_keystream
from tests.kernels.conftest import SIZES

H = bytes.fromhex
RFC_KEY = bytes(range(32))

# (key, nonce, counter, first keystream bytes); RFC 8439 section 2.3.2 and appendix A.1.
BLOCK_VECTORS = [
    (RFC_KEY, H("000000090000004a00000000"), 1,
     "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
     "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"),
    (bytes(32), bytes(12), 0,
     "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
     "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"),
    (bytes(32), bytes(12), 1,
     "9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed"
     "29b721769ce64e43d57133b074d839d531ed1f28510afb45ace10a1f4b794d6f"),
    (bytes(31) + b"\x01", bytes(12), 1,
     "3aeb5224ecf849929b9d828db1ced4dd832025e8018b8160b82284f3c949aa5a"
     "8eca00bbb4a73bdad192b5c42f73f2fd4e273644c8b36125a64addeb006c13a0"),
    (b"\x00\xff" + bytes(30), bytes(12), 2,
     "72d54dfbf12ec44b362692df94137f328fea8da73990265ec1bbbea1ae9af0ca"
     "13b25aa26cb4a648cb9b9d1be65b2c0924a66c54d545ec1b7374f4872e99f096"),
    (bytes(32), bytes(11) + b"\x02", 0,
     "c2c64d378cd536374ae204b9ef933fcd1a8b2288b3dfa49672ab765b54ee27c7"
     "8a970e0e955c14f3a88e741b97c286f75f8fc299e8148362fa198a39531bed6d"),
]

# RFC 8439 section 2.4.2: encryption of the "sunscreen" plaintext, counter 1.
SUNSCREEN = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
    b"the future, sunscreen would be it."
)
SUNSCREEN_CT = H(
    "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
    "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
    "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
    "5af90bbf74a35be6b40b8eedf2785e42874d"
)

IMPLEMENTATIONS = [chacha20_keystream, reference_chacha20_keystream]


def _bytes(words: torch.Tensor) -> bytes:
    return words.numpy().astype("<i4").tobytes()


def _openssl(key: bytes, nonce: bytes, counter: int, n_words: int) -> bytes:
    iv = counter.to_bytes(4, "little") + nonce
    return Cipher(algorithms.ChaCha20(key, iv), None).encryptor().update(bytes(4 * n_words))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(("key", "nonce", "counter", "expected"), BLOCK_VECTORS)
def test_rfc8439_block_vectors(impl, key, nonce, counter, expected):
    words = impl(key, nonce, counter, 16)
    assert words.dtype == RING_DTYPE
    assert _bytes(words) == H(expected)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_rfc8439_encryption_vector(impl):
    n_words = -(-len(SUNSCREEN) // 4)
    stream = _bytes(impl(RFC_KEY, H("000000000000004a00000000"), 1, n_words))
    assert bytes(p ^ s for p, s in zip(SUNSCREEN, stream, strict=False)) == SUNSCREEN_CT


def test_matches_cryptography_on_random_inputs():
    rng = random.Random(8439)
    for _ in range(40):
        key, nonce = rng.randbytes(32), rng.randbytes(12)
        n_words = rng.choice([0, 1, 15, 16, 17, 1000, rng.randrange(70_000)])
        counter = rng.choice([0, 1, rng.randrange(2**31), 2**32 - 1 - n_words // 16 - 1])
        assert _bytes(chacha20_keystream(key, nonce, counter, n_words)) == _openssl(
            key, nonce, counter, n_words
        )


@pytest.mark.parametrize("n_words", SIZES)
def test_fast_path_matches_reference(n_words):
    key, nonce = os.urandom(32), os.urandom(12)
    fast = chacha20_keystream(key, nonce, 7, n_words)
    assert fast.shape == (n_words,)
    assert torch.equal(fast, reference_chacha20_keystream(key, nonce, 7, n_words))


def test_last_block_before_counter_limit_is_allowed():
    key, nonce = os.urandom(32), os.urandom(12)
    words = chacha20_keystream(key, nonce, 2**32 - 1, 16)
    assert _bytes(words) == _openssl(key, nonce, 2**32 - 1, 16)
    assert torch.equal(words, reference_chacha20_keystream(key, nonce, 2**32 - 1, 16))


@pytest.mark.parametrize(("counter", "n_words"), [(2**32 - 1, 17), (2**32, 1), (0, 16 * 2**32 + 1)])
def test_counter_overflow_is_refused(counter, n_words):
    with pytest.raises(ValueError, match="2\\*\\*32"):
        chacha20_keystream(bytes(32), bytes(12), counter, n_words)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((bytes(31), bytes(12), 0, 4), ValueError, "key must be 32 bytes, got 31"),
        ((bytes(32), bytes(8), 0, 4), ValueError, "nonce must be 12 bytes, got 8"),
        (("k" * 32, bytes(12), 0, 4), TypeError, "key must be bytes"),
        ((bytes(32), bytes(12), -1, 4), ValueError, "counter must be >= 0, got -1"),
        ((bytes(32), bytes(12), 0, 2.0), TypeError, "n_words must be an int"),
    ],
)
def test_bad_arguments_are_refused(args, error, match):
    with pytest.raises(error, match=match):
        chacha20_keystream(*args)


def test_little_endian_word_layout():
    words = chacha20_keystream(bytes(32), bytes(12), 0, 1)
    assert int(words[0]) & 0xFFFFFFFF == int.from_bytes(H("76b8e0ad"), "little")
    assert np.array_equal(words.numpy().view(np.uint8)[:4], np.frombuffer(H("76b8e0ad"), np.uint8))


def test_import_kernels_does_not_import_triton():
    code = "import sys, kernels; sys.exit(1 if 'triton' in sys.modules else 0)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0
