"""The book-keeping engine on whole models: equal to Opacus hooks mode and to
one-sample-at-a-time autograd, and refusing what it cannot do exactly."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from torch import nn

from kernels.per_sample import (
    BookKeepingClipper,
    PerSampleUsageError,
    UnsupportedLayerError,
    reference_clipped_sum,
)
from kernels.per_sample import group_norm as group_norm_module
from shared.models import DEFAULT_SPECS, get_model, model_names

warnings.filterwarnings("ignore", module="opacus")


def _batch(name, b, dtype, seed=0):
    spec = DEFAULT_SPECS[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *spec.shape, generator=gen, dtype=dtype)
    return x, torch.randint(0, spec.num_classes, (b,), generator=gen)


def _model(name, dtype, seed=1):
    torch.manual_seed(seed)
    return get_model(name).to(dtype)


def _oracle_per_sample(model, x, y):
    """One-sample-at-a-time autograd: per-sample grads of the per-sample loss."""
    params = list(model.parameters())
    rows = [torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
            for i in range(len(x))]
    return [torch.stack(col) for col in zip(*rows, strict=True)]


def _opacus_hooks_sum(model, x, y, c):
    """Opacus' own clipped sum: GradSampleHooks + DPOptimizer.clip_and_accumulate."""
    hooks = GradSampleHooks(model, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                      max_grad_norm=c, expected_batch_size=len(x))
    F.cross_entropy(model(x), y).backward()
    opt.clip_and_accumulate()
    out = [p.summed_grad.clone() for p in model.parameters()]
    hooks.cleanup()
    return out


def _engine_sum(model, x, y, c):
    model.zero_grad(set_to_none=True)
    clipper = BookKeepingClipper(model, c)
    F.cross_entropy(model(x), y).backward()
    clipper.remove()
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()], clipper


def _assert_sums_close(got, ref, tol):
    scale = max(r.abs().max().item() for r in ref)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("name", model_names())
def test_engine_equals_opacus_hooks_and_autograd(name):
    dtype, b = torch.float64, 6
    model = _model(name, dtype)
    x, y = _batch(name, b, dtype)
    psg = _oracle_per_sample(model, x, y)
    norms = torch.cat([g.reshape(b, -1) for g in psg], 1).norm(dim=1)
    c = float(norms.median())  # about half the samples are clipped, half are not
    clipped = (norms > c).sum().item()
    assert 0 < clipped < b
    oracle = reference_clipped_sum(psg, c)
    got, clipper = _engine_sum(model, x, y, c)
    torch.testing.assert_close(clipper.per_sample_norms, norms, rtol=1e-9, atol=0)
    _assert_sums_close(got, oracle, 1e-5)
    _assert_sums_close(got, _opacus_hooks_sum(model, x, y, c), 1e-5)


@pytest.mark.parametrize("name", ["cnn2d", "cnn1d"])
def test_engine_float32_matches_opacus_and_channels_last_matches_autograd(name):
    model = _model(name, torch.float32)
    x, y = _batch(name, 12, torch.float32)
    got, clipper = _engine_sum(model, x, y, 1.0)
    assert (clipper.clip_factors < 1).any()
    _assert_sums_close(got, _opacus_hooks_sum(model, x, y, 1.0), 1e-5)
    if x.dim() == 4:
        # Opacus 1.6 hooks mode is wrong for channels-last conv inputs (off by ~1e-3
        # here), so the channels-last path is checked against autograd only.
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        got, _ = _engine_sum(model, x, y, 1.0)
        _assert_sums_close(got, reference_clipped_sum(_oracle_per_sample(model, x, y), 1.0),
                           1e-5)


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=0)
        self.conv = nn.Conv1d(4, 6, 3, padding="same", dilation=2)
        self.norm = nn.GroupNorm(3, 6)
        self.act = nn.ReLU(inplace=True)  # modifies GroupNorm's output in place
        self.seq = nn.Linear(6, 5)  # applied with a sequence dimension
        self.out = nn.Linear(5, 3)

    def forward(self, idx):
        h = self.emb(idx).transpose(1, 2)
        h = self.act(self.norm(self.conv(h))).transpose(1, 2)
        return self.out(self.seq(h).mean(1))


def test_engine_on_embedding_same_padding_sequence_linear_inplace_relu():
    torch.manual_seed(3)
    model = _Custom().double()
    model.norm.bias.data.uniform_(-1, 1)
    idx = torch.randint(0, 11, (5, 9))
    idx[:, -2:] = 0
    y = torch.randint(0, 3, (5,))
    psg = _oracle_per_sample(model, idx, y)
    norms = torch.cat([g.reshape(5, -1) for g in psg], 1).norm(dim=1)
    c = float(norms.median())
    got, _ = _engine_sum(model, idx, y, c)
    _assert_sums_close(got, reference_clipped_sum(psg, c), 1e-5)


def test_zero_gradient_and_empty_batch_give_zeros_not_nan():
    model = _model("mlp", torch.float64)
    clipper = BookKeepingClipper(model, 1.0)
    x, _ = _batch("mlp", 4, torch.float64)
    (model(x) * 0.0).sum().backward()
    assert torch.equal(clipper.clip_factors, torch.ones(4, dtype=torch.float64))
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x[:0]), torch.zeros(0, dtype=torch.long)).backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


@pytest.mark.parametrize("channels_last", [False, True])
def test_empty_batch_through_fused_group_norm_gives_zeros(channels_last):
    model = _model("cnn2d", torch.float32)
    x, y = _batch("cnn2d", 0, torch.float32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    BookKeepingClipper(model, 1.0)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0
               for p in model.parameters())


def test_frozen_parameters_get_no_grad_and_do_not_count():
    model = _model("cnn1d", torch.float64)
    frozen = model.features[0]
    for p in frozen.parameters():
        p.requires_grad_(False)
    x, y = _batch("cnn1d", 5, torch.float64)
    trainable = [p for p in model.parameters() if p.requires_grad]
    rows = [torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), trainable)
            for i in range(5)]
    psg = [torch.stack(col) for col in zip(*rows, strict=True)]
    _engine_sum(model, x, y, 0.05)
    assert all(p.grad is None for p in frozen.parameters())
    got = [p.grad for p in trainable]
    _assert_sums_close(got, reference_clipped_sum(psg, 0.05), 1e-5)


def test_unsupported_layer_is_refused_with_supported_list():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match=r"1 \(LayerNorm\).*Supported: Linear"):
        BookKeepingClipper(model, 1.0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"))
    with pytest.raises(UnsupportedLayerError, match="padding_mode"):
        BookKeepingClipper(model, 1.0)


def test_shared_layer_and_bad_bound_are_refused():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    BookKeepingClipper(model, 1.0)
    with pytest.raises(PerSampleUsageError, match="ran twice"):
        model(torch.randn(2, 3))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_grad_norm"):
            BookKeepingClipper(nn.Linear(2, 2), bad)


def test_remove_restores_plain_autograd_and_no_grad_forward_is_untouched():
    model = _model("mlp", torch.float32)
    x, y = _batch("mlp", 3, torch.float32)
    clipper = BookKeepingClipper(model, 1e-3)
    with torch.no_grad():
        model(x)
    F.cross_entropy(model(x), y).backward()
    assert max(p.grad.norm() for p in model.parameters()) < 1e-2
    clipper.remove()
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    assert max(p.grad.norm() for p in model.parameters()) > 1e-2


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_group_norm_backward_keeps_input_gradients_and_is_used(channels_last,
                                                                     monkeypatch):
    """GroupNorm layers whose input needs a gradient run their backward through the engine
    (one folded kernel for the input gradient and the per-sample grads): the gradient that
    reaches the model input must equal plain autograd's, and the clipped sums the oracle's."""
    model = _model("cnn2d", torch.float64)
    x, y = _batch("cnn2d", 5, torch.float64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    (plain,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    fused = []
    real = BookKeepingClipper._on_fused_grad
    monkeypatch.setattr(BookKeepingClipper, "_on_fused_grad",
                        lambda self, *a: fused.append(1) or real(self, *a))
    psg = _oracle_per_sample(model, x.detach(), y)
    clipper = BookKeepingClipper(model, 0.5)
    F.cross_entropy(model(x), y).backward()
    clipper.remove()
    # NCHW: both GroupNorm layers; channels-last: the 28x28 one runs on an NCHW copy, the
    # 14x14 one (too small for the relayout to pay) keeps PyTorch's backward.
    assert len(fused) == (1 if channels_last else 2)
    torch.testing.assert_close(x.grad, plain, rtol=1e-10, atol=1e-12)
    _assert_sums_close([p.grad for p in model.parameters()], reference_clipped_sum(psg, 0.5),
                       1e-5)


def test_relaid_group_norm_without_saved_stats_falls_back_to_its_own_backward(monkeypatch):
    """If autograd's GroupNorm node is not recognised, a relaid layer is not fused: its
    output goes back to the caller's layout through autograd and the sums stay exact."""
    from kernels.per_sample.layers import GroupNormRule

    monkeypatch.setattr(GroupNormRule, "saved_stats", staticmethod(lambda output: None))
    model = _model("cnn2d", torch.float64)
    x, y = _batch("cnn2d", 5, torch.float64)
    psg = _oracle_per_sample(model, x, y)
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    (plain,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    clipper = BookKeepingClipper(model, 0.5)
    F.cross_entropy(model(x), y).backward()
    clipper.remove()
    torch.testing.assert_close(x.grad, plain, rtol=1e-10, atol=1e-12)
    _assert_sums_close([p.grad for p in model.parameters()], reference_clipped_sum(psg, 0.5),
                       1e-5)


class _NormFirst(nn.Module):
    """GroupNorm on the raw input (no gradient needed there: not fused), then on a
    channels-last conv output with an in-place ReLU (fused, relaid out)."""

    def __init__(self):
        super().__init__()
        self.norm0 = nn.GroupNorm(1, 2)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm1 = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        h = torch.relu_(self.norm1(self.conv(self.norm0(x))))
        return self.head(h.flatten(1))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relayout_min", [0, group_norm_module.RELAYOUT_MIN_POSITIONS])
def test_group_norm_on_the_input_and_inplace_relu_after_fused_norm(channels_last, relayout_min,
                                                                   monkeypatch):
    """0: the channels-last 5x5 norm runs fused on a contiguous copy; default: unfused."""
    monkeypatch.setattr(group_norm_module, "RELAYOUT_MIN_POSITIONS", relayout_min)
    torch.manual_seed(4)
    model = _NormFirst().double()
    for m in (model.norm0, model.norm1):
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-1, 1)
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    # Oracle in NCHW: torch 2.13's channels-last GroupNorm backward crashes on some
    # one-sample channels-last inputs (a PyTorch bug; the engine never runs it).
    psg = _oracle_per_sample(model, x, y)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    norms = torch.cat([g.reshape(6, -1) for g in psg], 1).norm(dim=1)
    c = float(norms.median())
    fused = []
    real = BookKeepingClipper._on_fused_grad
    monkeypatch.setattr(BookKeepingClipper, "_on_fused_grad",
                        lambda self, *a: fused.append(1) or real(self, *a))
    got, clipper = _engine_sum(model, x, y, c)
    assert len(fused) == (0 if channels_last and relayout_min else 1)  # never norm0
    torch.testing.assert_close(clipper.per_sample_norms, norms, rtol=1e-9, atol=0)
    _assert_sums_close(got, reference_clipped_sum(psg, c), 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", model_names())
def test_engine_on_cuda_equals_autograd_and_opacus_hooks(name):
    dtype, b, dev = torch.float64, 6, torch.device("cuda")
    model = _model(name, dtype).to(dev)
    x, y = (t.to(dev) for t in _batch(name, b, dtype))
    psg = _oracle_per_sample(model, x, y)
    norms = torch.cat([g.reshape(b, -1) for g in psg], 1).norm(dim=1)
    c = float(norms.median())
    got, clipper = _engine_sum(model, x, y, c)
    assert all(g is None or g.is_cuda for g in got)
    torch.testing.assert_close(clipper.per_sample_norms, norms, rtol=1e-9, atol=0)
    _assert_sums_close(got, reference_clipped_sum(psg, c), 1e-5)
    _assert_sums_close(got, _opacus_hooks_sum(model, x, y, c), 1e-5)
    if x.dim() == 4:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
        got, _ = _engine_sum(model, x, y, c)
        _assert_sums_close(got, reference_clipped_sum(_oracle_per_sample(model, x, y), c),
                           1e-5)
