"""Ring representation and tensor checks shared by every kernel.

Elements of the ring Z_2^32 are stored as ``torch.int32`` bit patterns (two's complement):
the int32 value ``v`` stands for the ring element ``v mod 2**32``. torch's int32 add and
subtract wrap on CPU and CUDA, so ring arithmetic is plain tensor arithmetic on these
patterns; read an element as unsigned with ``v & 0xFFFFFFFF`` after widening to int64.
"""

from collections.abc import Iterator

import numpy as np
import torch

RING_DTYPE = torch.int32
RING_BITS = 32
RING_MODULUS = 1 << RING_BITS
RING_MAX = RING_MODULUS - 1

# Elements per CPU chunk: 64 Ki elements (256 KiB of float32/int32) keep a chunk's
# temporaries in a 2 MiB L2 cache while amortising Python's per-call cost.
CPU_CHUNK = 1 << 16


def check_tensor(x: object, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Return ``x`` if it is a contiguous tensor of ``dtype``, else raise.

    Raises:
        TypeError: ``x`` is not a tensor or has another dtype.
        ValueError: ``x`` is not contiguous (kernels work on its flat memory).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(x.stride())}")
    return x


def check_same_layout(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    """Raise ValueError unless ``a`` and ``b`` have the same shape and device."""
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(
            f"{names[0]} and {names[1]} must be on the same device, got {a.device} and {b.device}"
        )


def is_cuda(x: torch.Tensor) -> bool:
    """True when ``x`` lives on a CUDA device (the Triton paths); dispatch uses only this."""
    return x.device.type == "cuda"


def flat_numpy(x: torch.Tensor) -> np.ndarray:
    """A flat numpy view sharing memory with the contiguous CPU tensor ``x``."""
    return x.detach().view(-1).numpy()


def empty_numpy_backed(n: int, dtype: np.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised CPU tensor of ``shape`` whose memory numpy allocated.

    numpy asks the kernel for huge pages on large arrays; on the machines measured this
    made first-touch page faults of a 40 MB output ~10x cheaper than ``torch.empty``.
    """
    return torch.from_numpy(np.empty(n, dtype=dtype)).view(shape)


def chunks(n: int, size: int = CPU_CHUNK) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` elements covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def wrap_to_ring(v: torch.Tensor) -> torch.Tensor:
    """Map int64 integers to their Z_2^32 residues as ``RING_DTYPE`` bit patterns."""
    half = RING_MODULUS // 2
    return (torch.remainder(v + half, RING_MODULUS) - half).to(RING_DTYPE)


def ring_to_unsigned(x: torch.Tensor) -> torch.Tensor:
    """Ring elements as int64 values in [0, 2**32)."""
    return x.to(torch.int64) & RING_MAX
