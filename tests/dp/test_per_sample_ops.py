"""kernels.per_sample fast paths against their plain-torch references, on odd sizes."""

import pytest
import torch
import torch.nn.functional as F

from kernels.per_sample import (
    clip_factors,
    conv_per_sample_grads,
    embedding_clipped_sum,
    embedding_sq_norms,
    group_norm_fused_backward,
    group_norm_per_sample_grads,
    linear_clipped_sum,
    linear_sq_norms,
    per_sample_sq_norms,
    reference_clip_factors,
    reference_conv_per_sample_grads,
    reference_embedding_per_sample_grads,
    reference_group_norm_per_sample_grads,
    reference_linear_per_sample_grads,
    use_im2col,
    weighted_sum,
)
from kernels.per_sample import conv as conv_module
from kernels.per_sample import group_norm as group_norm_module
from kernels.per_sample.workspace import Workspace, relayout_copy

DT = torch.float64


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("b", [0, 1, 7])
@pytest.mark.parametrize("seq", [(), (1,), (3,), (2, 5), (40,)])
@pytest.mark.parametrize("d_in,d_out", [(1, 1), (3, 5), (17, 2)])
def test_linear_norms_and_sums(b, seq, d_in, d_out):
    torch.manual_seed(b + d_in)
    a = torch.randn(b, *seq, d_in, dtype=DT)
    g = torch.randn(b, *seq, d_out, dtype=DT)
    gw, gb = reference_linear_per_sample_grads(a, g)
    sq = per_sample_sq_norms(gw) + per_sample_sq_norms(gb)
    _close(linear_sq_norms(a, g, bias=True), sq)
    _close(linear_sq_norms(a, g, bias=False), per_sample_sq_norms(gw))
    coef = torch.rand(b, dtype=DT)
    w, bias = linear_clipped_sum(a, g, coef, bias=True)
    _close(w, torch.einsum("i,i...->...", coef, gw))
    _close(bias, torch.einsum("i,i...->...", coef, gb))


CONV_CASES = [
    # (dims, c_in, c_out, kernel, stride, padding, dilation, groups, size)
    (2, 1, 3, 5, 1, 2, 1, 1, 9),
    (2, 1, 4, 3, 2, 0, 1, 1, 8),
    (2, 3, 5, 3, 1, 1, 1, 1, 7),
    (2, 4, 6, 3, 2, 1, 2, 2, 11),
    (2, 6, 6, 3, 1, 1, 1, 6, 5),
    (2, 5, 3, 1, 1, 0, 1, 1, 4),
    (1, 1, 5, 5, 2, 1, 1, 1, 40),
    (1, 3, 7, 3, 2, 1, 1, 1, 13),
    (1, 4, 4, 3, 1, 2, 2, 2, 9),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("b", [1, 3, 18])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("min_positions", [0, conv_module.IM2COL_MIN_POSITIONS])
@pytest.mark.parametrize("chunk_bytes", [1, 6000, conv_module.GROUPED_CHUNK_BYTES])
def test_conv_per_sample_grads(case, b, channels_last, min_positions, chunk_bytes, monkeypatch):
    """Both paths: 0 sends every single-input-channel layer through im2col; small
    ``chunk_bytes`` split the grouped path into one-sample and uneven multi-sample chunks."""
    monkeypatch.setattr(conv_module, "IM2COL_MIN_POSITIONS", min_positions)
    monkeypatch.setattr(conv_module, "GROUPED_CHUNK_BYTES", chunk_bytes)
    nd, c_in, c_out, k, stride, pad, dil, groups, size = case
    if min_positions == 0 and (c_in, groups) != (1, 1):
        pytest.skip("im2col is only for single-input-channel layers")
    if channels_last and nd != 2:
        pytest.skip("channels_last is a 2-D layout")
    torch.manual_seed(b * 31 + c_in)
    x = torch.randn(b, c_in, *([size] * nd), dtype=DT)
    w_shape = (c_out, c_in // groups, *([k] * nd))
    conv = F.conv1d if nd == 1 else F.conv2d
    out_shape = conv(x, torch.zeros(w_shape, dtype=DT), None, stride, pad, dil, groups).shape
    g = torch.randn(out_shape, dtype=DT)
    if channels_last:
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    kw = dict(stride=[stride] * nd, padding=[pad] * nd, dilation=[dil] * nd, groups=groups)
    gw, gb = conv_per_sample_grads(x, g, w_shape, bias=True, **kw)
    rw, rb = reference_conv_per_sample_grads(x, g, w_shape, **kw)
    _close(gw, rw)
    _close(gb, rb)


@pytest.mark.parametrize("case", [(2, 1, 4, 5, 1, 2, 1, 1, 12), (2, 3, 4, 3, 1, 1, 1, 1, 6),
                                  (1, 1, 3, 5, 2, 1, 1, 1, 70), (1, 2, 3, 3, 2, 1, 1, 1, 9)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("chunk_bytes", [6000, conv_module.GROUPED_CHUNK_BYTES])
def test_conv_workspace_reuse_across_batch_sizes(case, channels_last, chunk_bytes, monkeypatch):
    """Reused buffers (padding borders, columns, folded inputs, chunk results) never leak
    between calls."""
    monkeypatch.setattr(conv_module, "GROUPED_CHUNK_BYTES", chunk_bytes)
    nd, c_in, c_out, k, stride, pad, dil, groups, size = case
    if channels_last and nd != 2:
        pytest.skip("channels_last is a 2-D layout")
    ws = Workspace()
    w_shape = (c_out, c_in, *([k] * nd))
    kw = dict(stride=[stride] * nd, padding=[pad] * nd, dilation=[dil] * nd, groups=groups)
    conv = F.conv1d if nd == 1 else F.conv2d
    for b in (18, 3, 25, 18):  # grow, shrink, grow past the capacity, repeat
        torch.manual_seed(b)
        x = torch.randn(b, c_in, *([size] * nd), dtype=DT) + 5  # nonzero: stale data shows
        g = torch.randn(conv(x, torch.zeros(w_shape, dtype=DT), None, **kw).shape, dtype=DT)
        if channels_last:
            x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
        gw, _ = conv_per_sample_grads(x, g, w_shape, bias=False, workspace=ws, **kw)
        _close(gw, reference_conv_per_sample_grads(x, g, w_shape, **kw)[0])


def test_conv_cost_model_picks_im2col_only_for_single_channel_images():
    assert use_im2col((16, 1, 5, 5), 1, (28, 28))
    assert not use_im2col((32, 16, 5, 5), 1, (14, 14))
    assert not use_im2col((25, 1, 5), 1, (19,))
    assert not use_im2col((4, 1, 3, 3), 4, (28, 28))


def test_conv_cost_model_on_cuda_takes_im2col_for_large_batches_only():
    for shape, sp in (((16, 1, 5, 5), (28, 28)), ((32, 16, 5, 5), (14, 14)), ((32, 32, 3), (10,))):
        assert not use_im2col(shape, 1, sp, batch=64, device_type="cuda")
        assert use_im2col(shape, 1, sp, batch=1024, device_type="cuda")
    assert not use_im2col((32, 1, 5), 1, (19,), batch=1024, device_type="cuda")  # 114 entries
    assert not use_im2col((4, 1, 3, 3), 4, (28, 28), batch=1024, device_type="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [64, 300])
def test_conv_per_sample_grads_on_cuda_both_paths_equal_the_reference(batch, monkeypatch):
    """float64 (no TF32): the chosen path at both batch sizes, and im2col in several chunks."""
    dev, kw = torch.device("cuda"), {"stride": [1, 1], "padding": [2, 2], "dilation": [1, 1],
                                     "groups": 1}
    for w_shape in ((16, 1, 5, 5), (8, 4, 5, 5)):
        x = torch.randn(batch, w_shape[1], 12, 12, dtype=DT, device=dev)
        g = torch.randn(batch, w_shape[0], 12, 12, dtype=DT, device=dev)
        ref = reference_conv_per_sample_grads(x, g, w_shape, **kw)
        for limit in (conv_module.CUDA_IM2COL_BYTES, 1 << 20):  # one chunk, then several
            monkeypatch.setattr(conv_module, "CUDA_IM2COL_BYTES", limit)
            gw, gb = conv_per_sample_grads(x, g, w_shape, bias=True, **kw)
            _close(gw, ref[0])
            _close(gb, g.sum((2, 3)))


def test_conv_empty_batch():
    x, g = torch.zeros(0, 2, 5, 5), torch.zeros(0, 3, 5, 5)
    gw, gb = conv_per_sample_grads(x, g, (3, 2, 3, 3), stride=[1, 1], padding=[1, 1],
                                   dilation=[1, 1], groups=1, bias=True)
    assert gw.shape == (0, 3, 2, 3, 3) and gb.shape == (0, 3)


@pytest.mark.parametrize("shape,groups", [((1, 6, 5, 3), 3), ((4, 5, 7), 5), ((3, 4), 2),
                                          ((5, 8, 3, 3), 1)])
@pytest.mark.parametrize("affine", ["unit", "random", "zero_weight"])
@pytest.mark.parametrize("min_numel", [0, 1 << 16])  # 0: the output path whenever it is safe
def test_group_norm_both_paths(shape, groups, affine, min_numel, monkeypatch):
    monkeypatch.setattr(group_norm_module, "OUTPUT_PATH_MIN_NUMEL", min_numel)
    torch.manual_seed(len(shape))
    x = torch.randn(shape, dtype=DT) * 3 + 1
    g = torch.randn(shape, dtype=DT)
    c = shape[1]
    w = {"unit": torch.ones(c, dtype=DT), "random": torch.rand(c, dtype=DT) + 0.5,
         "zero_weight": torch.zeros(c, dtype=DT)}[affine]
    bias = torch.randn(c, dtype=DT) * 0.3
    y = F.group_norm(x, groups, w, bias, 1e-5)
    rw, rb = reference_group_norm_per_sample_grads(x, g, groups, 1e-5)
    ws = Workspace()
    for kwargs in ({}, {"y": y, "weight": w, "bias": bias},
                   {"y": y, "weight": w, "bias": bias, "workspace": ws},
                   {"y": y * 1, "weight": w, "bias": bias, "workspace": ws}):
        gw, gb = group_norm_per_sample_grads(x, g, groups, 1e-5, **kwargs)
        _close(gw, rw, 1e-9)
        _close(gb, rb)


def _group_norm_case(shape, groups, channels_last, seed=0):
    """x (requires grad), weight, bias, output, upstream gradient and the saved stats."""
    torch.manual_seed(seed + len(shape))
    x = torch.randn(shape, dtype=DT) * 3 + 1
    g = torch.randn(shape, dtype=DT)
    if channels_last:
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    x.requires_grad_(True)
    w, bias = torch.rand(shape[1], dtype=DT) + 0.5, torch.randn(shape[1], dtype=DT)
    y = F.group_norm(x, groups, w, bias, 1e-5)
    stats = (y.grad_fn._saved_result1.detach(), y.grad_fn._saved_result2.detach())
    return x, w, bias, y, g, stats


GN_SHAPES = [((1, 6, 5, 3), 3), ((5, 8, 7, 3), 2), ((4, 5, 7), 5), ((3, 4), 2), ((2, 6, 4, 4), 6)]


@pytest.mark.parametrize("shape,groups", GN_SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_fused_backward_gives_autograd_dx_and_per_sample_grads(shape, groups,
                                                                          channels_last):
    """The folded kernel call (batch folded into channels) returns the layer's own input
    gradient and the one-sample-at-a-time affine gradients, for NCHW and channels-last."""
    channels_last = channels_last and len(shape) == 4
    x, w, _, y, g, stats = _group_norm_case(shape, groups, channels_last)
    (dx_ref,) = torch.autograd.grad(y, x, g)
    rw, rb = reference_group_norm_per_sample_grads(x.detach().contiguous(), g.contiguous(),
                                                   groups, 1e-5)
    ws = Workspace()
    for _ in range(2):  # the second call reuses the workspace's relayout buffers
        dx, gw, gb = group_norm_fused_backward(x.detach(), g, groups, stats, w, workspace=ws)
        _close(dx, dx_ref)
        _close(gw, rw)
        _close(gb, rb)
        assert dx.is_contiguous()
    # No affine weight: dx of F.group_norm without weight.
    y0 = F.group_norm(x, groups, None, None, 1e-5)
    (dx0,) = torch.autograd.grad(y0, x, g)
    _close(group_norm_fused_backward(x.detach(), g, groups, stats, None)[0], dx0)


@pytest.mark.parametrize("shape,groups", GN_SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_folded_path_from_saved_stats(shape, groups, channels_last, monkeypatch):
    """With saved stats a contiguous input takes the folded path (no output, no division by
    w: exact even for a zero weight); a channels-last one falls back to the other paths."""
    channels_last = channels_last and len(shape) == 4
    x, _, _, _, g, stats = _group_norm_case(shape, groups, channels_last, seed=1)
    calls = []
    real = group_norm_module._folded_grads
    monkeypatch.setattr(group_norm_module, "_folded_grads",
                        lambda *a: calls.append(1) or real(*a))
    zero_w = torch.zeros(shape[1], dtype=DT)
    gw, gb = group_norm_per_sample_grads(x.detach(), g, groups, 1e-5, stats=stats,
                                         weight=zero_w, bias=zero_w)
    rw, rb = reference_group_norm_per_sample_grads(x.detach().contiguous(), g.contiguous(),
                                                   groups, 1e-5)
    _close(gw, rw)
    _close(gb, rb)
    assert len(calls) == (0 if channels_last else 1)
    wrong = tuple(t[:, :1] for t in stats)  # stats of another grouping are not used
    gw, _ = group_norm_per_sample_grads(x.detach(), g, groups, 1e-5, stats=wrong)
    _close(gw, rw)
    assert len(calls) == (0 if channels_last else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.bfloat16])
def test_relayout_copy_matches_copy_in_both_directions(dtype):
    src = (torch.randn(3, 5, 4, 7) * 100).to(dtype)
    for a, b in ((src, src.contiguous(memory_format=torch.channels_last)),
                 (src.contiguous(memory_format=torch.channels_last), src)):
        dst = torch.empty_like(b)
        assert relayout_copy(dst, a) is dst
        assert torch.equal(dst, a) and dst.stride() == b.stride()
    x = torch.randn(2, 3, requires_grad=True)
    assert torch.equal(relayout_copy(torch.empty(2, 3), x), x.detach())


@pytest.mark.parametrize("w,b,ok", [
    ([1.0, -2.0], [4.0, 8.0], True),  # |b| / |w| == 4 exactly
    ([1.0, -2.0], [4.0, 8.5], False),  # one ratio above 4
    ([1.0, 0.0], [0.5, 0.0], False),  # zero weight, zero bias (0 / 0)
    ([1.0, 0.0], [0.5, 1.0], False),  # zero weight (x / 0)
    ([1e-30, 3.0], [0.0, -0.1], True),
])
def test_group_norm_output_path_check(w, b, ok):
    """The output path divides by w: it is taken only when every w != 0 and |b| <= 4 |w|."""
    w, b = torch.tensor(w, dtype=DT), torch.tensor(b, dtype=DT)
    assert group_norm_module._output_path_ok(w, b) is ok


@pytest.mark.parametrize("idx_shape", [(1,), (4,), (3, 1), (5, 6), (2, 3, 4)])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_norms_and_sums(idx_shape, padding_idx):
    torch.manual_seed(sum(idx_shape))
    vocab, dim = 7, 3
    idx = torch.randint(0, vocab, idx_shape)
    idx.view(-1)[0] = idx.view(-1)[-1]  # at least one repeat
    g = torch.randn(*idx_shape, dim, dtype=DT)
    dense = reference_embedding_per_sample_grads(idx, g, vocab, padding_idx)
    _close(embedding_sq_norms(idx, g, padding_idx=padding_idx), per_sample_sq_norms(dense))
    coef = torch.rand(idx_shape[0], dtype=DT)
    got = embedding_clipped_sum(idx, g, coef, vocab, padding_idx=padding_idx)
    _close(got, torch.einsum("i,i...->...", coef, dense))


def test_clip_factors_edge_cases():
    norms = torch.tensor([0.0, 0.5, 1.0, 4.0, float("inf"), float("nan")], dtype=DT)
    got = clip_factors(norms**2, 1.0)
    ref = reference_clip_factors(norms, 1.0)
    _close(got[:5], ref[:5])
    assert got[0] == 1.0 and got[4] == 0.0 and torch.isnan(got[5])
    assert (got[:4] * norms[:4] <= 1.0 + 1e-12).all()


def test_weighted_sum_empty_and_odd():
    assert weighted_sum(torch.zeros(0, 3, 2), torch.zeros(0)).shape == (3, 2)
    t = torch.randn(5, 3, 1, dtype=DT)
    c = torch.rand(5, dtype=DT)
    _close(weighted_sum(t, c), (t * c.view(-1, 1, 1)).sum(0))
