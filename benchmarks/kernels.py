"""Benchmark kernels/ against Flower's stock update encoding, side by side in one process.

``python -m benchmarks.kernels [--json] [--quick]``. One thread (torch.set_num_threads(1),
OpenBLAS pinned to 1 before numpy loads), median of repeats after warm-up, contenders timed
in alternation. The last stdout line is one JSON object; ratios > 1 mean privfed is faster.
Figures named ``*_2threads_*`` are the exception: ``kernels.quantize(..., threads=2)``
splits its input over two threads, against the same one-thread Flower arm.

With a CUDA device, ``gpu`` holds the Triton kernels' throughput on 64 MiB tensors, each
counted as bytes read plus bytes written, next to a device-to-device copy measured in the
same run (``*_vs_copy`` = kernel GB/s / copy GB/s; CUDA events, medians of the arms timed
in alternation after a second of warm-up at full load).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms  # noqa: E402
from flwr.common.secure_aggregation.quantization import quantize as flower_quantize  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen  # noqa: E402

import kernels  # noqa: E402
from benchmarks._common import emit, median_seconds, paired_medians  # noqa: E402
from kernels._ring import empty_numpy_backed  # noqa: E402
from kernels.chacha20 import KeystreamReader  # noqa: E402

CLIP, BITS = 3.0, 16


def _key(purpose: "kernels.MaskPurpose") -> "kernels.MaskKey":
    context = kernels.MaskContext(run_id="bench", round=1, purpose=purpose)
    return kernels.derive_mask_key(os.urandom(32), context)


def bench_keystream(n_words: int, repeat: int) -> dict[str, float]:
    key, nonce = os.urandom(32), os.urandom(12)
    zeros = bytes(4 * n_words)

    def raw() -> bytes:
        cipher = Cipher(algorithms.ChaCha20(key, bytes(4) + nonce), mode=None)
        return cipher.encryptor().update(zeros)

    ours, openssl = paired_medians(
        lambda: kernels.chacha20_keystream(key, nonce, 0, n_words), raw, repeat=repeat
    )
    gb = 4 * n_words / 1e9
    return {"keystream_vs_openssl": openssl / ours, "keystream_gbps": gb / ours,
            "openssl_raw_gbps": gb / openssl}


def bench_quantize(n: int, repeat: int) -> dict[str, float]:
    """Ours (fresh output, given output, two threads) against Flower on the same input, and
    the floor of any one-thread CPU quantiser that draws its 16-bit dither from OpenSSL's
    ChaCha20, reads x once and writes a fresh int32 output: the keystream and a copy into
    fresh memory alone, no arithmetic (``quantize_1thread_ceiling_vs_flower``)."""
    x = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.5).contiguous()
    x_np = x.numpy()
    key = _key(kernels.MaskPurpose.QUANTIZE_DITHER)
    out = torch.empty(n, dtype=kernels.RING_DTYPE)
    levels = (1 << BITS) - 1
    dither = np.empty((n + 1) // 2, dtype=np.uint32)

    def quantize() -> torch.Tensor:
        return kernels.quantize(x, clip_range=CLIP, bits=BITS, key=key)

    def fresh_copy() -> None:
        np.copyto(empty_numpy_backed(n, np.dtype(np.int32), (n,)).numpy(), x_np,
                  casting="unsafe")

    ours, into, two, keystream, copy, flower = paired_medians(
        quantize,
        lambda: kernels.quantize(x, clip_range=CLIP, bits=BITS, key=key, out=out),
        lambda: kernels.quantize(x, clip_range=CLIP, bits=BITS, key=key, threads=2),
        lambda: KeystreamReader(key.key, key.nonce).read_into(dither),
        fresh_copy,
        lambda: flower_quantize([x_np], CLIP, levels),
        repeat=repeat,
    )
    return {"quantize_vs_flower": flower / ours, "quantize_melem_s": n / ours / 1e6,
            "quantize_out_melem_s": n / into / 1e6, "flower_quantize_melem_s": n / flower / 1e6,
            "quantize_2threads_vs_flower": flower / two,
            "quantize_2threads_melem_s": n / two / 1e6,
            "quantize_ms": ours * 1e3, "quantize_dither_keystream_ms": keystream * 1e3,
            "quantize_fresh_copy_ms": copy * 1e3,
            "quantize_1thread_ceiling_vs_flower": flower / (keystream + copy)}


def bench_mask(n: int, repeat: int) -> dict[str, float]:
    key = _key(kernels.MaskPurpose.PAIRWISE_MASK)
    x = torch.zeros(n, dtype=kernels.RING_DTYPE)
    x64 = np.zeros(n, dtype=np.int64)
    seed = os.urandom(32)

    def flower() -> None:
        mask = pseudo_rand_gen(seed, 1 << 32, [(n,)])[0]
        np.add(x64, mask, out=x64)

    ours, theirs = paired_medians(lambda: kernels.add_masks(x, [key], [1]), flower, repeat=repeat)
    three = median_seconds(lambda: kernels.add_masks(x, [key] * 3, [1, -1, 1]), repeat=repeat)
    return {"mask_vs_flower": theirs / ours, "mask_gbps": 4 * n / ours / 1e9,
            "mask_3keys_gbps": 3 * 4 * n / three / 1e9,
            "flower_mask_gbps": 8 * n / theirs / 1e9}


def bench_accumulate(n: int, repeat: int) -> dict[str, float]:
    acc = torch.zeros(n, dtype=kernels.RING_DTYPE)
    x = torch.ones(n, dtype=kernels.RING_DTYPE)
    a_np, x_np = acc.numpy(), x.numpy()
    ring, copy = paired_medians(
        lambda: kernels.accumulate_ring(acc, x), lambda: np.copyto(a_np, x_np), repeat=repeat
    )
    facc, fx = torch.zeros(n), torch.ones(n)
    weighted = median_seconds(lambda: kernels.accumulate_weighted(facc, fx, 0.5), repeat=repeat)
    gb = 4 * n / 1e9
    return {"accumulate_vs_memcpy": copy / ring, "accumulate_ring_gbps": gb / ring,
            "accumulate_weighted_gbps": gb / weighted, "copyto_gbps": gb / copy}


def bench_noise(n: int, repeat: int) -> dict[str, float]:
    key = _key(kernels.MaskPurpose.DP_NOISE)
    reps = max(3, repeat // 2)
    gauss = median_seconds(lambda: kernels.gaussian_noise(n, 1.0, key), repeat=reps)
    discrete = median_seconds(lambda: kernels.discrete_gaussian_noise(n, 10.0, key), repeat=reps)
    return {"gaussian_noise_melem_s": n / gauss / 1e6,
            "discrete_gaussian_melem_s": n / discrete / 1e6}


def bytes_per_param(n: int) -> dict[str, float]:
    key = _key(kernels.MaskPurpose.QUANTIZE_DITHER)
    q = kernels.quantize(torch.zeros(n), clip_range=CLIP, bits=BITS, key=key)
    flower_masked = pseudo_rand_gen(os.urandom(32), 1 << 32, [(n,)])[0]
    return {"bytes_per_param": q.element_size() * q.numel() / n,
            "flower_bytes_per_param": flower_masked.itemsize}


def _cuda_paired(fns: dict[str, object], repeat: int, warm_s: float = 1.0) -> dict[str, float]:
    """Median seconds of each function on the current CUDA stream (CUDA events), timed in
    alternation after ``warm_s`` seconds of running them all: the GPU's clocks ramp up
    under load, and a compute-bound kernel (ChaCha20) timed on a cold GPU reads slow."""
    start = time.perf_counter()
    while time.perf_counter() - start < warm_s:
        for fn in fns.values():
            fn()
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(begin.elapsed_time(end) / 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


def bench_gpu(n: int, repeat: int) -> dict[str, object]:
    """Triton kernels on ``n`` 32-bit elements against a device-to-device copy of as many.

    Bytes counted per element: keystream 4 (written), quantize 8 (float read, ring word
    written; the dither comes from the kernel's own ChaCha20), one mask 8 and three masks
    8 (the ring vector read and written once, all keystreams made in registers),
    accumulate_ring 12 (both read, the accumulator written), gaussian noise 4 (written).
    """
    dev = torch.device("cuda")
    x = torch.randn(n, device=dev) * 0.5
    ring = torch.zeros(n, dtype=kernels.RING_DTYPE, device=dev)
    other = torch.ones(n, dtype=kernels.RING_DTYPE, device=dev)
    dst = torch.empty_like(x)
    qkey = _key(kernels.MaskPurpose.QUANTIZE_DITHER)
    mkey = _key(kernels.MaskPurpose.PAIRWISE_MASK)
    nkey = _key(kernels.MaskPurpose.DP_NOISE)
    key, nonce = os.urandom(32), os.urandom(12)
    arms = {
        "keystream": (4, lambda: kernels.chacha20_keystream(key, nonce, 0, n, device="cuda")),
        "quantize": (8, lambda: kernels.quantize(x, clip_range=CLIP, bits=BITS, key=qkey)),
        "mask": (8, lambda: kernels.add_masks(ring, [mkey], [1])),
        "mask_3keys": (8, lambda: kernels.add_masks(ring, [mkey] * 3, [1, -1, 1])),
        "accumulate_ring": (12, lambda: kernels.accumulate_ring(ring, other)),
        "gaussian_noise": (4, lambda: kernels.gaussian_noise(n, 1.0, nkey, device="cuda")),
    }
    seconds = _cuda_paired({"copy": lambda: dst.copy_(x)}
                           | {name: fn for name, (_, fn) in arms.items()}, repeat)
    copy_gbps = 8 * n / seconds["copy"] / 1e9
    figures: dict[str, object] = {"device": torch.cuda.get_device_name(), "elements": n,
                                  "copy_gbps": round(copy_gbps, 1)}
    for name, (bytes_per, _) in arms.items():
        gbps = bytes_per * n / seconds[name] / 1e9
        figures[f"{name}_gbps"] = round(gbps, 1)
        figures[f"{name}_vs_copy"] = round(gbps / copy_gbps, 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scale, repeat = (10, 3) if args.quick else (1, 11)
    figures: dict[str, object] = {"threads": torch.get_num_threads(), "gpu": "not measured: no "
                                  "CUDA device in this run"}
    if torch.cuda.is_available():
        figures["gpu"] = bench_gpu((1 << 24) // scale, repeat)
    figures |= bench_keystream((1 << 22) // scale, repeat)
    figures |= bench_quantize(10**7 // scale, repeat)
    figures |= bench_mask(4 * 10**6 // scale, repeat)
    figures |= bench_accumulate(10**7 // scale, repeat)
    figures |= bench_noise(10**6 // scale, repeat)
    figures |= bytes_per_param(1000)
    if not args.json:
        print(f"privfed kernels benchmark, {torch.get_num_threads()} thread(s), medians")
    emit({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()},
         as_json=args.json)


if __name__ == "__main__":
    main()
