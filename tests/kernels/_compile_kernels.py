"""Compile every Triton kernel for an sm_90 GPU without one; print a JSON report.

Run as ``python -m tests.kernels._compile_kernels`` in a process without TRITON_INTERPRET
(``test_triton.py`` does). Triton's front end and its bundled ptxas need no GPU, so CPU-only
CI still proves the kernels compile, and checks that the float kernels launched with
``FP_EXACT`` contain no fused multiply-add.
"""

import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels._triton import _kernels, launch
from kernels.noise import GAUSS_RUN

SIGNATURES = {
    "keystream_kernel": (
        {"row_ptr": "*i32", "out_ptr": "*i32", "counter": "i64", "n_words": "i32",
         "BLOCK": "constexpr"},
        {"BLOCK": launch.CHACHA_BLOCKS}, {},
    ),
    "add_masks_kernel": (
        {"x_ptr": "*i32", "rows_ptr": "*i32", "n_keys": "i32", "n": "i32",
         "BLOCK": "constexpr", "ROW": "constexpr"},
        {"BLOCK": launch.CHACHA_BLOCKS, "ROW": launch.KEY_ROW_WORDS}, {},
    ),
    "quantize_kernel": (
        {"x_ptr": "*fp32", "q_ptr": "*i32", "row_ptr": "*i32", "n": "i32", "c": "fp32",
         "s": "fp32", "BLOCK": "constexpr"},
        {"BLOCK": launch.CHACHA_BLOCKS}, launch.FP_EXACT,
    ),
    "accumulate_ring_kernel": (
        {"acc_ptr": "*i32", "x_ptr": "*i32", "n": "i32", "BLOCK": "constexpr"},
        {"BLOCK": launch.ELEMENTWISE_BLOCK}, {},
    ),
    "accumulate_weighted_kernel": (
        {"acc_ptr": "*fp32", "x_ptr": "*fp32", "w": "fp32", "n": "i32", "BLOCK": "constexpr"},
        {"BLOCK": launch.ELEMENTWISE_BLOCK}, launch.FP_EXACT,
    ),
    "gaussian_kernel": (
        {"row_ptr": "*i32", "out_ptr": "*fp32", "n": "i32", "angle_scale": "fp32",
         "R": "constexpr"},
        {"R": GAUSS_RUN}, launch.FP_EXACT,
    ),
}


def main() -> None:
    report = {}
    for name, (signature, constexprs, options) in SIGNATURES.items():
        source = ASTSource(fn=getattr(_kernels, name), signature=signature, constexprs=constexprs)
        options = dict(options, num_warps=launch.GAUSS_WARPS if name == "gaussian_kernel"
                       else launch.CHACHA_WARPS)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        ptx = compiled.asm["ptx"]
        report[name] = {"cubin_bytes": len(compiled.asm["cubin"]),
                        "fma": "fma.rn.f32" in ptx or "fma.rn.f64" in ptx}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
