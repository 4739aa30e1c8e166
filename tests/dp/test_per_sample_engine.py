"""The book-keeping engine's per-step buffers: norm rows, the flat gradient buffer, the
optimizer's one-op noise path, the GroupNorm stats path, and the ``*_into`` helpers."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import client.dpsgd as dpsgd
from client.dpsgd import ClippingMode, make_private_round, torch_noise_fn
from kernels.per_sample import (
    BookKeepingClipper,
    PerSampleUsageError,
    group_norm_per_sample_grads,
    reference_clipped_sum,
    reference_group_norm_per_sample_grads,
)
from kernels.per_sample import group_norm as group_norm_module
from kernels.per_sample.clip import mm_into, norms_into, weighted_sum_into
from shared.models import DEFAULT_SPECS, get_model

warnings.filterwarnings("ignore", module="opacus")
DT = torch.float64


def _oracle(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
            for i in range(len(x))]
    return [torch.stack(col) for col in zip(*rows, strict=True)]


def _batch(name, b, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spec = DEFAULT_SPECS[name]
    return (torch.randn(b, *spec.shape, generator=gen, dtype=DT),
            torch.randint(0, spec.num_classes, (b,), generator=gen))


def test_grads_are_views_tiling_one_flat_buffer_in_model_order():
    torch.manual_seed(0)
    model = get_model("cnn2d").double()
    x, y = _batch("cnn2d", 5)
    ref = reference_clipped_sum(_oracle(model, x, y), 0.7)
    BookKeepingClipper(model, 0.7)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    base = grads[0]._base
    assert base is not None and base.dim() == 1
    assert base.numel() == sum(p.numel() for p in model.parameters())
    offset = 0
    for g in grads:
        assert g._base is base and g.storage_offset() == offset and g.is_contiguous()
        offset += g.numel()
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_two_backward_passes_add_and_each_step_gets_a_fresh_buffer():
    torch.manual_seed(1)
    model = get_model("mlp").double()
    x, y = _batch("mlp", 6)
    ref = [reference_clipped_sum(_oracle(model, x[i : i + 3], y[i : i + 3]), 0.5)
           for i in (0, 3)]
    BookKeepingClipper(model, 0.5)
    F.cross_entropy(model(x[:3]), y[:3]).backward()
    first = [p.grad for p in model.parameters()]
    kept = [g.clone() for g in first]
    F.cross_entropy(model(x[3:]), y[3:]).backward()
    for p, g0, a, b in zip(model.parameters(), kept, *ref, strict=True):
        torch.testing.assert_close(g0, a, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(p.grad, a + b, rtol=1e-9, atol=1e-12)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x[:3]), y[:3]).backward()
    assert all(p.grad._base is not g._base for p, g in zip(model.parameters(), first,
                                                             strict=True))


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_layer_that_did_not_run_gets_zeros_and_the_rest_is_exact():
    torch.manual_seed(2)
    model = _Branchy().double()
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 2, (5,))
    params = [model.a.weight, model.a.bias, model.b.weight, model.b.bias]
    rows = [torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
            for i in range(5)]
    ref = reference_clipped_sum([torch.stack(c) for c in zip(*rows, strict=True)], 0.3)
    BookKeepingClipper(model, 0.3)
    F.cross_entropy(model(x), y).backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.unused.parameters())
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-9, atol=1e-12)


class _Rebatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.a(x).reshape(-1, 8))


def test_a_layer_on_another_batch_size_is_refused():
    model = _Rebatch()
    BookKeepingClipper(model, 1.0)
    with pytest.raises(PerSampleUsageError, match="batch of 3.*one of 6"):
        model(torch.randn(6, 4))


def _round(model, flat):
    """One noisy step of a private round; ``flat=False`` forces the per-parameter path."""
    x, y = (t.float() if t.is_floating_point() else t for t in _batch("cnn2d", 8, seed=3))
    data = torch.utils.data.TensorDataset(torch.zeros(32, 1), torch.zeros(32))
    rnd = make_private_round(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
                             batch_size=8, noise_multiplier=1.3, max_grad_norm=0.5,
                             mode=ClippingMode.PRIVFED,
                             noise_fn=torch_noise_fn(torch.Generator().manual_seed(9)))
    taken = []
    real = dpsgd._tiled_base

    def spy(tensors):
        base = real(tensors) if flat else None
        taken.append(base is not None)
        return base

    dpsgd._tiled_base = spy
    try:
        rnd.optimizer.zero_grad()
        rnd.criterion(model(x), y).backward()
        rnd.optimizer.step()
    finally:
        dpsgd._tiled_base = real
    grads = [p.grad.clone() for p in model.parameters()]
    return taken, grads, rnd.finish()


def test_optimizer_adds_noise_and_scales_in_one_op_with_the_same_values():
    models = [get_model("cnn2d") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    taken, grads, state = _round(models[0], flat=True)
    taken_ref, grads_ref, state_ref = _round(models[1], flat=False)
    assert taken == [True, True] and taken_ref == [False, False]  # add_noise, scale_grad
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.equal(a, b)
    for k, v in state.items():
        assert torch.equal(v, state_ref[k])


def test_tiled_base_refuses_gaps_order_layout_and_foreign_tensors():
    flat = torch.arange(20.0)
    a, b, c = flat[:6].view(2, 3), flat[6:10], flat[10:]
    assert dpsgd._tiled_base([a, b, c]) is flat
    assert dpsgd._tiled_base([b, a, c]) is None  # out of order
    assert dpsgd._tiled_base([a, c]) is None  # gap
    assert dpsgd._tiled_base([a, b]) is None  # does not cover the buffer
    assert dpsgd._tiled_base([flat[:6].view(3, 2).t(), b, c]) is None  # not contiguous
    assert dpsgd._tiled_base([a.clone(), b, c]) is None  # not a view of it
    assert dpsgd._tiled_base([]) is None


@pytest.mark.parametrize("shape,groups", [((5, 8, 7, 3), 2), ((2, 6, 4, 4), 6),
                                          ((3, 4, 5, 5), 1)])
def test_group_norm_stats_path_for_channels_last_is_taken_and_exact(shape, groups,
                                                                    monkeypatch):
    torch.manual_seed(len(shape))
    x = (torch.randn(shape, dtype=DT) * 3 + 1).contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, dtype=DT).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(shape[1], dtype=DT)  # no division by w anywhere: exact even for 0
    y = F.group_norm(x.requires_grad_(True), groups, w, w, 1e-5)
    stats = (y.grad_fn._saved_result1.detach(), y.grad_fn._saved_result2.detach())
    calls = []
    real = group_norm_module._stats_grads
    monkeypatch.setattr(group_norm_module, "_stats_grads",
                        lambda *a: calls.append(1) or real(*a))
    gw, gb = group_norm_per_sample_grads(x.detach(), g, groups, 1e-5, stats=stats,
                                         y=y.detach(), weight=w, bias=w)
    rw, rb = reference_group_norm_per_sample_grads(x.detach().contiguous(), g.contiguous(),
                                                   groups, 1e-5)
    assert calls == [1]
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb, rb, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("b", [0, 1, 5])
@pytest.mark.parametrize("dtype,out_dtype", [(DT, DT), (torch.float16, torch.float32),
                                             (DT, torch.float32)])
def test_into_helpers_equal_plain_torch(b, dtype, out_dtype):
    torch.manual_seed(b)
    t = torch.randn(b, 3, 4, dtype=torch.float32).to(dtype)
    coef = torch.rand(b, dtype=out_dtype)
    rows = torch.full((2, b), -1.0, dtype=out_dtype)
    assert norms_into(rows[1], t) is not None
    ref = t.double().reshape(b, 12).norm(dim=1)
    tol = 1e-3 if torch.float16 in (dtype, out_dtype) else 1e-6
    torch.testing.assert_close(rows[1].double(), ref, rtol=tol, atol=tol)
    assert torch.equal(rows[0], torch.full((b,), -1.0, dtype=out_dtype))  # other row intact
    flat = torch.full((30,), 7.0, dtype=dtype)
    out = flat[3:15].view(3, 4)
    weighted_sum_into(out, t, coef)
    ref_sum = torch.einsum("i,i...->...", coef.double(), t.double())
    torch.testing.assert_close(out.double(), ref_sum, rtol=tol, atol=tol)
    assert torch.equal(flat[:3], torch.full((3,), 7.0, dtype=dtype))
    assert torch.equal(flat[15:], torch.full((15,), 7.0, dtype=dtype))
    a, m = torch.randn(3, b, dtype=dtype), torch.randn(b, 4, dtype=dtype)
    mm_into(out, a, m)
    torch.testing.assert_close(out.double(), a.double() @ m.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_clip_factors_are_bitwise_opacus_formula(dtype):
    """In-place ``reciprocal_().mul_(C)`` is what Opacus' ``C / (norm + 1e-6)`` computes."""
    from kernels.per_sample.clip import clip_factors_from_norms

    norms = torch.rand(4096, generator=torch.Generator().manual_seed(0), dtype=dtype) * 3
    norms[:4] = torch.tensor([0.0, float("inf"), float("nan"), 1e-30], dtype=dtype)
    for c in (1.0, 0.3, 2.7):
        got = clip_factors_from_norms(norms, c)
        ref = (c / (norms + 1e-6)).clamp(max=1.0)
        assert torch.equal(got[3:], ref[3:]) and got[:2].tolist() == [1.0, 0.0]
        assert got[2].isnan()
