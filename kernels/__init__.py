"""privfed kernels: the update-encoding ops both sides share, exact on CPU and GPU.

Every op has a pure ``reference_*`` (numpy/torch, the test oracle), a CPU fast path and,
where it pays, a Triton path used for CUDA tensors. Dispatch is by tensor device only.
Triton is imported lazily, inside ``kernels._triton``, the first time a CUDA tensor arrives,
so ``import kernels`` never needs it (install ``privfed[gpu]`` on GPU machines).

Ring convention: elements of Z_2^32 are ``torch.int32`` bit patterns (:data:`RING_DTYPE`);
``quantize`` output, masks, ``accumulate_ring`` and discrete noise all use it.

Note: the function ``kernels.quantize`` shadows the module of the same name as an attribute;
``from kernels.quantize import MAX_BITS`` works, ``import kernels.quantize as m`` binds the
function. Prefer the names exported here (``kernels.MAX_BITS``).
"""

from kernels._ring import RING_BITS, RING_DTYPE, RING_MODULUS, ring_to_unsigned, wrap_to_ring
from kernels.accumulate import (
    accumulate_ring,
    accumulate_weighted,
    reference_accumulate_ring,
    reference_accumulate_weighted,
)
from kernels.chacha20 import chacha20_keystream, reference_chacha20_keystream
from kernels.clip import l2_clip, l2_norm, reference_l2_clip
from kernels.keys import MaskContext, MaskKey, MaskPurpose, derive_mask_key
from kernels.masking import add_masks, mask_sum, reference_add_masks
from kernels.noise import (
    discrete_gaussian_noise,
    gaussian_noise,
    reference_discrete_gaussian_noise,
    reference_gaussian_noise,
)
from kernels.quantize import (
    MAX_BITS,
    QuantizationGrid,
    check_ring_capacity,
    dequantization_error_bound,
    dequantize,
    grid,
    quantize,
    reference_dequantize,
    reference_quantize,
)

__all__ = [
    "MAX_BITS",
    "RING_BITS",
    "RING_DTYPE",
    "RING_MODULUS",
    "MaskContext",
    "MaskKey",
    "MaskPurpose",
    "QuantizationGrid",
    "accumulate_ring",
    "accumulate_weighted",
    "add_masks",
    "chacha20_keystream",
    "check_ring_capacity",
    "dequantization_error_bound",
    "dequantize",
    "derive_mask_key",
    "discrete_gaussian_noise",
    "gaussian_noise",
    "grid",
    "l2_clip",
    "l2_norm",
    "mask_sum",
    "quantize",
    "reference_accumulate_ring",
    "reference_accumulate_weighted",
    "reference_add_masks",
    "reference_chacha20_keystream",
    "reference_dequantize",
    "reference_discrete_gaussian_noise",
    "reference_gaussian_noise",
    "reference_l2_clip",
    "reference_quantize",
    "ring_to_unsigned",
    "wrap_to_ring",
]
