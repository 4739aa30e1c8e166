"""ChaCha20 keystream (RFC 8439) as 32-bit words, the same bytes on every device.

Layers: :func:`reference_chacha20_keystream` is a readable numpy transcription of RFC 8439
section 2.3, the oracle for tests; the CPU path streams OpenSSL's ChaCha20 (through
``cryptography``) over a cached zero buffer; CUDA tensors use the Triton kernel in
``kernels._triton``. All three produce identical words.

Word layout: word ``i`` of the result is the little-endian 32-bit integer formed by bytes
``4*i .. 4*i+3`` of the keystream, stored as a ``torch.int32`` bit pattern (see
:mod:`kernels._ring`). So ``out.numpy().tobytes()`` on a little-endian host is the keystream.

Counter rule: RFC 8439 uses a 32-bit block counter, so one (key, nonce) yields at most
2**32 blocks of 64 bytes. A request that would step the counter past ``2**32 - 1`` is
refused with ``ValueError`` rather than wrapped or carried into the nonce.
"""

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from kernels._ring import CPU_CHUNK, RING_DTYPE, empty_numpy_backed

KEY_BYTES = 32
NONCE_BYTES = 12
WORDS_PER_BLOCK = 16
MAX_BLOCKS = 1 << 32
_SIGMA = np.frombuffer(b"expand 32-byte k", dtype="<u4")
_ZEROS = memoryview(bytes(4 * CPU_CHUNK))


def check_stream_args(key: bytes, nonce: bytes, counter: int, n_words: int) -> None:
    """Validate a keystream request.

    Raises:
        TypeError: ``key``/``nonce`` are not bytes or ``counter``/``n_words`` not ints.
        ValueError: wrong key or nonce length, negative numbers, or a request that needs
            block counters beyond ``2**32 - 1``.
    """
    for name, value, size in (("key", key, KEY_BYTES), ("nonce", nonce, NONCE_BYTES)):
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
        if len(value) != size:
            raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    for name, value in (("counter", counter), ("n_words", n_words)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    blocks = -(-n_words // WORDS_PER_BLOCK)
    if counter + blocks > MAX_BLOCKS:
        raise ValueError(
            f"ChaCha20 block counter would pass 2**32 - 1: counter={counter} plus "
            f"{blocks} blocks for n_words={n_words} exceeds the {MAX_BLOCKS} blocks "
            "RFC 8439 allows per (key, nonce); use another nonce"
        )


class KeystreamReader:
    """Sequential reader of one ChaCha20 keystream through OpenSSL (CPU fast path).

    Successive :meth:`read_into` calls continue the stream where the last one stopped, so
    callers can draw a long stream chunk by chunk and keep each chunk in cache. The caller
    is responsible for the 2**32-block limit (see :func:`check_stream_args`).
    """

    def __init__(self, key: bytes, nonce: bytes, counter: int = 0) -> None:
        iv = counter.to_bytes(4, "little") + bytes(nonce)
        self._encryptor = Cipher(algorithms.ChaCha20(bytes(key), iv), mode=None).encryptor()

    def read_into(self, out: np.ndarray) -> None:
        """Overwrite the C-contiguous array ``out`` with the next ``out.nbytes`` stream bytes."""
        view = memoryview(out).cast("B")
        step = len(_ZEROS)
        for start in range(0, len(view), step):
            stop = min(start + step, len(view))
            self._encryptor.update_into(_ZEROS[: stop - start], view[start:stop])


def chacha20_keystream(
    key: bytes, nonce: bytes, counter: int, n_words: int, *, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """RFC 8439 ChaCha20 keystream as ``n_words`` 32-bit words on ``device``.

    Args:
        key: 32-byte key.
        nonce: 12-byte nonce.
        counter: block counter of the first word (0 <= counter < 2**32).
        n_words: number of 32-bit words wanted (the stream is cut mid-block if needed).
        device: where the result lives; CUDA devices generate it there with Triton.

    Returns:
        1-D ``torch.int32`` tensor whose little-endian bytes are the keystream starting at
        block ``counter``. Identical bits on every device.

    Raises:
        TypeError, ValueError: see :func:`check_stream_args`.
    """
    check_stream_args(key, nonce, counter, n_words)
    device = torch.device(device)
    if device.type == "cuda":
        from kernels._triton import launch

        return launch.keystream(key, nonce, counter, n_words, device=device)
    out = empty_numpy_backed(n_words, np.dtype(np.uint32), (n_words,))
    KeystreamReader(key, nonce, counter).read_into(out.numpy())
    return out.view(RING_DTYPE).to(device)


def _state_rows(key: bytes, nonce: bytes, counter: int, n_blocks: int) -> np.ndarray:
    """The 16 x n_blocks initial ChaCha20 states (RFC 8439 section 2.3)."""
    state = np.empty((16, n_blocks), dtype=np.uint32)
    state[0:4] = _SIGMA[:, None]
    state[4:12] = np.frombuffer(bytes(key), dtype="<u4")[:, None]
    state[12] = (counter + np.arange(n_blocks, dtype=np.uint64)).astype(np.uint32)
    state[13:16] = np.frombuffer(bytes(nonce), dtype="<u4")[:, None]
    return state


def _reference_quarter_round(x: np.ndarray, a: int, b: int, c: int, d: int) -> None:
    """RFC 8439 section 2.1 quarter round on rows a, b, c, d of ``x``, in place."""
    for p, q, r, shift in ((a, b, d, 16), (c, d, b, 12), (a, b, d, 8), (c, d, b, 7)):
        x[p] += x[q]
        v = x[r] ^ x[p]
        x[r] = (v << np.uint32(shift)) | (v >> np.uint32(32 - shift))


def reference_chacha20_keystream(
    key: bytes, nonce: bytes, counter: int, n_words: int
) -> torch.Tensor:
    """Pure-numpy RFC 8439 keystream, vectorised over blocks; the test oracle (CPU only)."""
    check_stream_args(key, nonce, counter, n_words)
    n_blocks = -(-n_words // WORDS_PER_BLOCK)
    state = _state_rows(key, nonce, counter, n_blocks)
    x = state.copy()
    for _ in range(10):
        for a, b, c, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15)):
            _reference_quarter_round(x, a, b, c, d)
        for a, b, c, d in ((0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
            _reference_quarter_round(x, a, b, c, d)
    words = (x + state).T.reshape(-1)[:n_words].astype("<u4")
    return torch.from_numpy(words.view(np.int32).copy())
