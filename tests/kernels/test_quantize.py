"""quantize / dequantize / check_ring_capacity: reference, range, error bound, refusals."""

import importlib
import math
import threading
from fractions import Fraction

import numpy as np
import pytest
import torch

from kernels import (
    RING_DTYPE,
    accumulate_ring,
    check_ring_capacity,
    dequantization_error_bound,
    dequantize,
    grid,
    quantize,
    reference_dequantize,
    reference_quantize,
)
from tests.kernels.conftest import SIZES, make_key

_module = importlib.import_module("kernels.quantize")  # the function shadows the attribute

BITS = (1, 8, 15, 16, 17, 24)


def _update(n: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, generator=gen) * scale


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(n, bits, gen):
    x = _update(n, gen, scale=2.0)
    key = make_key(f"q{n}")
    q = quantize(x, clip_range=3.0, bits=bits, key=key)
    assert q.dtype == RING_DTYPE and q.shape == x.shape
    assert torch.equal(q, reference_quantize(x, clip_range=3.0, bits=bits, key=key))
    if n:
        assert int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1


def test_extremes_and_infinities_map_to_the_ends(gen):
    x = torch.tensor([-math.inf, -1e30, -3.0, 3.0, 1e30, math.inf])
    q = quantize(x, clip_range=3.0, bits=12, key=make_key("e"))
    assert q.tolist() == [0, 0, 0, 4095, 4095, 4095]


@pytest.mark.parametrize("bits", [1, 16, 17, 24])
@pytest.mark.parametrize("clip_range", [0.1, 1.0, 3.0, 7.7, 2.0**-64, 2.0**64])
def test_values_at_and_beyond_the_clip_range_match_the_reference(clip_range, bits, gen):
    c = np.float32(clip_range)
    inf = np.float32(math.inf)
    edges = [-inf, -c * 4, np.nextafter(-c, -inf), -c, np.nextafter(-c, 0), -c / 3,
             np.float32(-1e-45), np.float32(-0.0), np.float32(0.0), np.float32(1e-45), c / 3,
             np.nextafter(c, 0), c, np.nextafter(c, inf), c * 4, inf]
    x = torch.cat([torch.tensor(np.array(edges, dtype=np.float32)),
                   _update(1000, gen, scale=float(c))])
    key = make_key(f"edge{clip_range}")
    assert torch.equal(quantize(x, clip_range=clip_range, bits=bits, key=key),
                       reference_quantize(x, clip_range=clip_range, bits=bits, key=key))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy on signaling NaN
@pytest.mark.parametrize("bits", [8, 20])
@pytest.mark.parametrize("nan_bits", [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF])
def test_nan_of_any_sign_and_payload_is_refused(nan_bits, bits):
    x = torch.tensor([0.0, 1.0, -math.inf, math.inf, 0.0])
    x.view(torch.int32)[1] = torch.tensor(nan_bits, dtype=torch.int64).to(torch.int32)
    assert math.isnan(x[1].item())
    with pytest.raises(ValueError, match="1 NaN"):
        quantize(x, clip_range=1.0, bits=bits, key=make_key("n"))


# Large enough for two threads of two chunks; odd, so that the split and the last chunk
# fall mid-way through keystream words and blocks.
TWO_THREAD_SIZE = 4 * _module.QUANTIZE_CHUNK + 37


@pytest.mark.parametrize("bits", [8, 16, 17, 24])
@pytest.mark.parametrize(
    ("threads", "n"),
    [(1, TWO_THREAD_SIZE), (2, TWO_THREAD_SIZE), (3, TWO_THREAD_SIZE),
     (3, 6 * _module.QUANTIZE_CHUNK + 1)],
)
def test_any_thread_count_matches_the_reference(bits, threads, n, gen, monkeypatch):
    x = _update(n, gen, scale=2.0)
    key = make_key(f"t{bits}")
    seen = []
    inner = _module._quantize_range

    def spy(x_part, *args, **kwargs):
        seen.append((threading.current_thread(), kwargs["first_block"] * 32, x_part.size))
        return inner(x_part, *args, **kwargs)

    monkeypatch.setattr(_module, "_quantize_range", spy)
    q = quantize(x, clip_range=3.0, bits=bits, key=key, threads=threads)
    assert torch.equal(q, reference_quantize(x, clip_range=3.0, bits=bits, key=key))
    used = min(threads, n // (2 * _module.QUANTIZE_CHUNK))  # at least two chunks per thread
    assert len({id(thread) for thread, _, _ in seen}) == len(seen) == used
    parts = sorted((start, size) for _, start, size in seen)
    assert [start for start, _ in parts] == [0, *(a + n for a, n in parts[:-1])]  # contiguous
    assert sum(size for _, size in parts) == x.numel()


@pytest.mark.parametrize("torch_threads", [1, 2])
def test_two_threads_match_under_either_torch_thread_setting(torch_threads, gen):
    # Two torch threads: our threads convert in pieces below torch's parallel grain.
    x = _update(TWO_THREAD_SIZE, gen, scale=2.0)
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        q = quantize(x, clip_range=3.0, bits=16, key=make_key("tt"), threads=2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(q, reference_quantize(x, clip_range=3.0, bits=16, key=make_key("tt")))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("where", [[5, TWO_THREAD_SIZE - 9, TWO_THREAD_SIZE - 1], [-1]])
def test_nan_anywhere_is_refused_with_the_whole_count(where, threads):
    x = torch.zeros(TWO_THREAD_SIZE)
    x[where] = math.nan  # in both parts and at the very end; or only in the helper's part
    with pytest.raises(ValueError, match=f"x holds {len(where)} NaN"):
        quantize(x, clip_range=1.0, bits=16, key=make_key("n2"), threads=threads)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_thread_count_is_refused(threads):
    with pytest.raises(ValueError, match=f"threads must be an int >= 1, got {threads!r}"):
        quantize(torch.zeros(4), clip_range=1.0, bits=8, key=make_key("b"), threads=threads)


def test_scale_is_rounded_down_so_values_stay_in_range():
    for c in (0.1, 1.0, 3.0, 1e-3, 7.7):
        for bits in (1, 16, 24):
            g = grid(c, bits)
            exact = Fraction(g.levels) / (2 * Fraction(g.clip))
            assert Fraction(g.scale) <= exact
            top = np.float32(np.float32(g.clip) + np.float32(g.clip)) * np.float32(g.scale)
            assert top <= g.levels


def test_same_key_same_bits_different_key_different_rounding(gen):
    x = _update(4096, gen)
    a = quantize(x, clip_range=2.0, bits=16, key=make_key("x"))
    assert torch.equal(a, quantize(x, clip_range=2.0, bits=16, key=make_key("x")))
    assert not torch.equal(a, quantize(x, clip_range=2.0, bits=16, key=make_key("y")))


def test_out_argument_and_shape(gen):
    x = _update(35, gen).view(5, 7)
    out = torch.empty(5, 7, dtype=RING_DTYPE)
    assert quantize(x, clip_range=1.0, bits=10, key=make_key("o"), out=out) is out
    assert torch.equal(out, reference_quantize(x, clip_range=1.0, bits=10, key=make_key("o")))


@pytest.mark.parametrize("bits", [8, 16, 20])
def test_sum_of_n_decodes_within_documented_bound(bits, gen):
    n, d, c = 7, 20_000, 1.5
    xs = [_update(d, gen) for _ in range(n)]
    total = torch.zeros(d, dtype=RING_DTYPE)
    for i, x in enumerate(xs):
        accumulate_ring(total, quantize(x, clip_range=c, bits=bits, key=make_key(f"s{i}")))
    decoded = dequantize(total, clip_range=c, bits=bits, n_summands=n)
    expected = torch.stack([x.clamp(-c, c).double() for x in xs]).sum(0)
    error = (decoded.double() - expected).abs().max().item()
    nominal_step = 2 * c / (2**bits - 1)
    assert error <= dequantization_error_bound(c, bits, n)
    assert dequantization_error_bound(c, bits, n) <= n * nominal_step * (1 + 2.0**-5) + 1e-5


def test_rounding_is_unbiased(gen):
    # One value, many independent dither streams: the mean of q approaches y.
    x = torch.full((200_000,), 0.123456)
    q = quantize(x, clip_range=1.0, bits=4, key=make_key("u")).double()
    g = grid(1.0, 4)
    y = float((np.float32(0.123456) + np.float32(1.0)) * np.float32(g.scale))
    se = math.sqrt((y % 1) * (1 - y % 1) / x.numel())
    assert abs(q.mean().item() - y) < 5 * se


@pytest.mark.parametrize("n", SIZES)
def test_dequantize_matches_reference(n, gen):
    q = torch.randint(0, 2**16, (n,), generator=gen).to(RING_DTYPE)
    for summands in (1, 3):
        fast = dequantize(q, clip_range=0.5, bits=16, n_summands=summands)
        assert fast.dtype == torch.float32
        assert torch.equal(fast, reference_dequantize(q, clip_range=0.5, bits=16,
                                                      n_summands=summands))


def test_dequantize_reads_the_ring_as_unsigned():
    # 2**32 - 1 as an int32 bit pattern is -1; it must decode as the top of the range.
    q = torch.tensor([-1], dtype=RING_DTYPE)
    assert dequantize(q, clip_range=1.0, bits=16, n_summands=65537).item() > 0


def test_capacity_rule_names_the_numbers():
    check_ring_capacity(65537, 16)  # 65537 * 65535 = 2**32 - 1 fits exactly
    with pytest.raises(ValueError, match=r"n_summands=65538 .* > 2\*\*32 - 1 = 4294967295") as e:
        check_ring_capacity(65538, 16)
    assert "bits <= 15" in str(e.value)
    with pytest.raises(ValueError, match="max_weight=3"):
        check_ring_capacity(100, 24, max_weight=3)
    with pytest.raises(ValueError, match="headroom=1"):
        check_ring_capacity(65537, 16, headroom=1)


def test_dequantize_refuses_a_sum_that_could_have_wrapped():
    with pytest.raises(ValueError, match="could wrap"):
        dequantize(torch.zeros(3, dtype=RING_DTYPE), clip_range=1.0, bits=24, n_summands=257)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bits": 0}, ValueError, r"bits must be an int in \[1, 24\], got 0"),
        ({"bits": 25}, ValueError, "got 25"),
        ({"clip_range": 0.0}, ValueError, "clip_range must be in"),
        ({"clip_range": math.inf}, ValueError, "clip_range must be in"),
        ({"key": b"k" * 44}, TypeError, "key must be a MaskKey"),
    ],
)
def test_bad_parameters_are_refused(kwargs, error, match):
    args = {"clip_range": 1.0, "bits": 8, "key": make_key("b")} | kwargs
    with pytest.raises(error, match=match):
        quantize(torch.zeros(4), **args)


def test_bad_input_dtype_is_refused():
    with pytest.raises(TypeError, match="torch.float32, got torch.float64"):
        quantize(torch.zeros(4, dtype=torch.float64), clip_range=1.0, bits=8, key=make_key("d"))


def test_compiles_without_a_writable_cache(monkeypatch, gen):
    # A site installed read-only, with no writable home: numba finds no cache locator.
    import numba.core.caching

    monkeypatch.setattr(numba.core.caching.CacheImpl, "_locator_classes", [])
    loops = importlib.reload(importlib.import_module("kernels._cpu_loops"))
    try:
        assert type(loops.round_into_ring._cache).__name__ == "NullCache"  # not cached
        x = _update(5000, gen, scale=2.0)
        key = make_key("ro")
        assert torch.equal(quantize(x, clip_range=3.0, bits=16, key=key),
                           reference_quantize(x, clip_range=3.0, bits=16, key=key))
    finally:
        monkeypatch.undo()
        importlib.reload(loops)
