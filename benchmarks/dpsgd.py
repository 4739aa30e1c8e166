"""DP-SGD step cost: privfed's book-keeping engine vs Opacus hooks / ghost vs non-private.

``python -m benchmarks.dpsgd [--json] [--quick] [--device cuda] [--batch 64]``

Same model, same batch (fixed tensors, no data loading), one process: time per training
step (``zero_grad``, forward, loss, ``backward``, ``step``) of

* ``nonprivate``: plain SGD, the fastest of NCHW, channels-last (max-pool is slow in
  NCHW on CPU; a ratio against a slow baseline flatters) and channels-last where
  the GroupNorms that privfed's engine relays out run on NCHW copies, moving data exactly
  as the engine does (its fused GroupNorm backward works on NCHW): PyTorch's channels-last
  GroupNorm is up to ~5x slower than NCHW on CPU, so privfed must not be credited for a
  relayout the baseline could make too;
* ``opacus_hooks`` / ``opacus_ghost``: Opacus 1.6 through :func:`client.dpsgd.make_private_round`
  (NCHW: Opacus' conv grad sampler is wrong for channels-last inputs);
* ``privfed``: the book-keeping engine, the faster of NCHW and channels-last;
* ``privfed_csprng``: the same with the default ChaCha20 noise instead of ``torch.normal``.

It also times the two noise sources alone for the cnn2d parameter count (``noise`` in the
JSON: ``kernels.gaussian_noise`` vs ``torch.normal``, 1 thread, interleaved medians).

All private modes use ``torch.normal`` noise (as Opacus outside secure mode) unless named
``_csprng``. Modes are interleaved round by round, so machine load hits them alike; each
``_ms`` figure is the median over rounds of the mean step time within a round (the
fastest variant; ``<mode>_variant`` names it), and each ratio the median over rounds of
(mode / ``nonprivate``) within the same round. With one
thread the clock is the thread's CPU time (a shared machine's load does not count; the
step's own page faults do), with all threads wall time. The last stdout line is JSON.

``--device cuda`` times the same steps on the GPU (wall time, synchronised after each
round's steps; noise from a CUDA generator or, for ``_csprng``, the Triton ChaCha20
Box-Muller kernel). The CPU-only GroupNorm relayout variant is left out there, and the
headline is cnn2d on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from benchmarks._common import paired_medians
from client.dpsgd import ClippingMode, default_noise_fn, make_private_round, torch_noise_fn
from kernels.keys import MaskKey
from kernels.noise import gaussian_noise
from kernels.per_sample.group_norm import group_norm_relayout_pays
from kernels.per_sample.workspace import relayout_copy
from shared.models import DEFAULT_SPECS, get_model

BATCH = 64
MODELS = ("cnn2d", "cnn1d")
CPU = torch.device("cpu")


def _batch(name: str, channels_last: bool, device: torch.device, batch: int = BATCH):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *DEFAULT_SPECS[name].shape, generator=gen).to(device)
    y = torch.randint(0, DEFAULT_SPECS[name].num_classes, (batch,), generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _model(name: str, channels_last: bool, device: torch.device):
    torch.manual_seed(0)
    model = get_model(name).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


class _ToContiguous(torch.autograd.Function):
    """NCHW copy of a channels-last tensor; the gradient passes through (stays NCHW)."""

    @staticmethod
    def forward(ctx, x):
        return relayout_copy(torch.empty(x.shape, dtype=x.dtype), x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ToLayoutOf(torch.autograd.Function):
    """Copy of ``y`` in ``like``'s layout; the gradient comes back as an NCHW copy."""

    @staticmethod
    def forward(ctx, y, like):
        return relayout_copy(torch.empty_like(like), y)

    @staticmethod
    def backward(ctx, grad):
        return relayout_copy(torch.empty(grad.shape, dtype=grad.dtype), grad), None


def _group_norm_on_nchw(model: nn.Module) -> None:
    """Run ``model``'s GroupNorms on NCHW copies of channels-last inputs where privfed's
    engine does (:func:`~kernels.per_sample.group_norm.group_norm_relayout_pays`)."""
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            def forward(x: torch.Tensor, m: nn.GroupNorm = m) -> torch.Tensor:
                if x.is_contiguous() or not group_norm_relayout_pays(x):
                    return F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)
                y = F.group_norm(_ToContiguous.apply(x), m.num_groups, m.weight, m.bias, m.eps)
                return _ToLayoutOf.apply(y, x)
            m.forward = forward


def _nonprivate_step(name: str, channels_last: bool, device: torch.device,
                     gn_nchw: bool = False, batch: int = BATCH) -> Callable[[], None]:
    model = _model(name, channels_last, device)
    x, y = _batch(name, channels_last, device, batch)
    if gn_nchw:
        _group_norm_on_nchw(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _private_step(name: str, mode: ClippingMode, channels_last: bool, device: torch.device,
                  csprng: bool = False, batch: int = BATCH) -> Callable[[], None]:
    model = _model(name, channels_last, device)
    x, y = _batch(name, channels_last, device, batch)
    data = TensorDataset(torch.zeros(batch * 10, 1), torch.zeros(batch * 10))
    gen = torch.Generator(device=device).manual_seed(1)
    noise = default_noise_fn() if csprng else torch_noise_fn(gen)
    rnd = make_private_round(model, torch.optim.SGD(model.parameters(), lr=0.01), data,
                             batch_size=batch, noise_multiplier=1.0, max_grad_norm=1.0,
                             mode=mode, noise_fn=noise)

    def step() -> None:
        rnd.optimizer.zero_grad()
        rnd.criterion(rnd.model(x), y).backward()
        rnd.optimizer.step()

    return step


def _candidates(name: str, device: torch.device,
                batch: int = BATCH) -> dict[str, dict[str, Callable[[], None]]]:
    """Mode -> {variant: step function}, to take the fastest variant of."""
    images = len(DEFAULT_SPECS[name].shape) == 3
    layouts = {"nchw": False, "channels_last": True} if images else {"nchw": False}
    nonprivate = {k: _nonprivate_step(name, cl, device, batch=batch) for k, cl in layouts.items()}
    if images and device.type == "cpu":
        nonprivate["channels_last+gn_nchw"] = _nonprivate_step(name, True, device, gn_nchw=True,
                                                               batch=batch)
    last = list(layouts)[-1]
    return {
        "nonprivate": nonprivate,
        "opacus_hooks": {"nchw": _private_step(name, ClippingMode.HOOKS, False, device,
                                               batch=batch)},
        "opacus_ghost": {"nchw": _private_step(name, ClippingMode.GHOST, False, device,
                                               batch=batch)},
        "privfed": {k: _private_step(name, ClippingMode.PRIVFED, cl, device, batch=batch)
                    for k, cl in layouts.items()},
        "privfed_csprng": {last: _private_step(name, ClippingMode.PRIVFED, layouts[last],
                                               device, csprng=True, batch=batch)},
    }


def _cuda_wall() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def _clock(threads: int, device: torch.device) -> Callable[[], float]:
    """On CPU with one thread, the calling thread's CPU time (all the step's work runs on
    it, and time the scheduler gives to other processes is not counted); with all threads
    wall time; on a GPU wall time with the device synchronised at each reading."""
    if device.type == "cuda":
        return _cuda_wall
    return time.thread_time if threads == 1 else time.perf_counter


def _measure(steps: dict[str, dict[str, Callable[[], None]]], rounds: int, inner: int,
             clock: Callable[[], float]) -> tuple[dict[str, float], dict[str, float],
                                                  dict[str, str]]:
    """Median ms/step per mode (fastest variant), the median over rounds of each mode's
    time over the non-private time of the same round (paired, so load drift cancels), and
    each mode's fastest variant."""
    flat = [(mode, i, f) for mode, fs in steps.items() for i, f in fs.items()]
    for _, _, f in flat:
        for _ in range(3):
            f()
    times: dict[tuple[str, str], list[float]] = {(m, i): [] for m, i, _ in flat}
    for _ in range(rounds):
        for mode, i, f in flat:
            t0 = clock()
            for _ in range(inner):
                f()
            times[(mode, i)].append((clock() - t0) / inner * 1e3)
    best = {mode: min(fs, key=lambda i, m=mode: statistics.median(times[(m, i)]))
            for mode, fs in steps.items()}
    ms = {mode: statistics.median(times[(mode, i)]) for mode, i in best.items()}
    base = times[("nonprivate", best["nonprivate"])]
    ratios = {mode: statistics.median(t / b for t, b in zip(times[(mode, i)], base, strict=True))
              for mode, i in best.items()}
    return ms, ratios, best


def run_one(name: str, threads: int, rounds: int, inner: int,
            device: torch.device = CPU, batch: int = BATCH) -> dict[str, float | str]:
    """Median ms/step per mode and paired ratios over non-private (model, thread count)."""
    torch.set_num_threads(threads)
    ms, ratios, best = _measure(_candidates(name, device, batch), rounds, inner,
                                _clock(threads, device))
    res = {f"{m}_ms": round(v, 3) for m, v in ms.items()}
    for mode in ("privfed", "privfed_csprng", "opacus_hooks", "opacus_ghost"):
        res[f"{mode}_ratio"] = round(ratios[mode], 3)
    res.update({f"{m}_variant": v for m, v in best.items() if m in ("nonprivate", "privfed")})
    res["clock"] = "thread_cpu" if threads == 1 and device.type == "cpu" else "wall"
    return res


def noise_timings(n: int, repeat: int,
                  device: torch.device = CPU) -> dict[str, float]:
    """ms per draw of ``n`` N(0, 1) floats: ChaCha20 Box-Muller vs torch.normal (1 thread;
    on a GPU each draw is timed to the device's completion)."""
    torch.set_num_threads(1)
    key, gen = MaskKey(bytes(32), bytes(12)), torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def chacha() -> None:
        gaussian_noise(n, 1.0, key, device=device)
        sync()

    def mt() -> None:
        torch.normal(0.0, 1.0, size=(n,), generator=gen, device=device)
        sync()

    chacha, mt = paired_medians(chacha, mt, repeat=repeat, warmup=3)
    return {"params": n, "chacha20_gaussian_ms": round(chacha * 1e3, 3),
            "torch_normal_ms": round(mt * 1e3, 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the steps run (cuda: needs a CUDA device)")
    parser.add_argument("--batch", type=int, default=BATCH,
                        help=f"batch size (default {BATCH}, the headline's)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    gpu = device.type == "cuda"
    rounds, inner = (3, 2) if args.quick else (15, 20 if gpu else 4)
    all_threads = os.cpu_count() or 1
    thread_counts = [1] if gpu else sorted({1, all_threads})
    results: dict[str, dict] = {}
    for name in MODELS:
        for threads in thread_counts:
            key = f"{name}/cuda" if gpu else f"{name}/threads={threads}"
            results[key] = run_one(name, threads, rounds, inner, device, args.batch)
            if not args.json:
                print(key, json.dumps(results[key]))
    params = sum(p.numel() for p in get_model("cnn2d").parameters())
    noise = noise_timings(params, 15 if args.quick else 101, device)
    head = results["cnn2d/cuda" if gpu else "cnn2d/threads=1"]
    where = (f"{torch.cuda.get_device_name()} (wall time)" if gpu
             else "1 thread (thread CPU time)")
    summary = {
        "benchmark": "dpsgd", "batch": args.batch, "device": args.device,
        "privfed_ratio": head["privfed_ratio"],
        "opacus_hooks_ratio": head["opacus_hooks_ratio"],
        "opacus_ghost_ratio": head["opacus_ghost_ratio"],
        "headline": f"cnn2d (28x28), batch {args.batch}, {where}; noise torch.normal in "
                    "every mode",
        "results": results,
        "noise": noise,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
