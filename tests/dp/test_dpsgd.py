"""client.dpsgd: preflight, one private round per mode, no hook stacking, accounting."""

import math
import warnings

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dpsgd import (
    ClippingMode,
    PreflightError,
    default_noise_fn,
    make_private_round,
    preflight,
    torch_noise_fn,
)
from shared.models import get_model, model_names

warnings.filterwarnings("ignore", module="opacus")


def _data(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 40, generator=gen)
    return TensorDataset(x, torch.randint(0, 10, (n,), generator=gen))


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


def _run_round(model, mode, *, seed=5, noise=0.0, accountant=None, lr=0.5):
    rnd = make_private_round(
        model, torch.optim.SGD(model.parameters(), lr=lr), _data(), batch_size=16,
        noise_multiplier=noise, max_grad_norm=0.3, mode=mode, accountant=accountant,
        noise_fn=torch_noise_fn(torch.Generator().manual_seed(seed)),
        sampling_generator=torch.Generator().manual_seed(seed))
    for x, y in rnd.data_loader:
        rnd.optimizer.zero_grad()
        rnd.criterion(rnd.model(x), y).backward()
        rnd.optimizer.step()
    return rnd, rnd.finish()


def test_preflight_lists_batchnorm_layers_with_names_and_fix():
    bad = nn.Sequential()
    bad.add_module("features", nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    bad.add_module("head", nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    with pytest.raises(PreflightError) as err:
        preflight(bad, ClippingMode.HOOKS)
    msg = str(err.value)
    assert "BatchNorm2d at features.1 with GroupNorm" in msg
    assert "BatchNorm1d at head.1" in msg and "ModuleValidator.fix(model)" in msg
    assert isinstance(err.value, ValueError) and "Traceback" not in msg


def test_preflight_passes_registry_models_and_flags_engine_gaps():
    for name in model_names():
        preflight(get_model(name))
    with pytest.raises(PreflightError, match=r"LayerNorm.*Supported: Linear"):
        preflight(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3)))
    preflight(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3)), ClippingMode.HOOKS)


def test_all_modes_give_the_same_round():
    results = {}
    for mode in ClippingMode:
        torch.manual_seed(1)
        model = get_model("cnn1d")
        rnd, state = _run_round(model, mode, noise=0.7)
        results[mode] = state
        assert rnd.steps == 6 and rnd.sample_rate == pytest.approx(1 / 6)
        assert rnd.expected_batch_size == 16
    ref = results[ClippingMode.HOOKS]
    for mode in (ClippingMode.PRIVFED, ClippingMode.GHOST):
        for k, v in results[mode].items():
            torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", list(ClippingMode))
def test_two_rounds_do_not_stack_hooks_and_equal_a_fresh_model(mode):
    torch.manual_seed(2)
    model = get_model("mlp")
    plain_keys = list(model.state_dict())
    before = _hook_count(model)
    _, state1 = _run_round(model, mode, seed=7)
    assert _hook_count(model) == before and list(state1) == plain_keys
    assert not any(hasattr(p, a) for p in model.parameters()
                   for a in ("grad_sample", "summed_grad", "_forward_counter"))
    _, state2 = _run_round(model, mode, seed=8)
    assert _hook_count(model) == before and list(state2) == plain_keys
    fresh = get_model("mlp")
    fresh.load_state_dict(state1)
    _, fresh_state = _run_round(fresh, mode, seed=8)
    for k, v in state2.items():
        torch.testing.assert_close(v, fresh_state[k], rtol=0, atol=0)


def test_epsilon_matches_independent_rdp_accountant():
    accountant = RDPAccountant()
    torch.manual_seed(3)
    rnd, _ = _run_round(get_model("logistic"), ClippingMode.PRIVFED, noise=1.1,
                        accountant=accountant)
    independent = RDPAccountant()
    for _ in range(rnd.steps):
        independent.step(noise_multiplier=1.1, sample_rate=rnd.sample_rate)
    assert rnd.steps == 6
    eps = accountant.get_epsilon(1e-5)
    assert eps == pytest.approx(independent.get_epsilon(1e-5), rel=1e-12) and eps > 0


def test_injected_noise_is_added_once_with_opacus_std_then_averaged():
    calls = []

    def constant_noise(shape, std, device):
        calls.append((shape, std))
        return torch.full(shape, std)

    torch.manual_seed(4)
    model = get_model("logistic")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rnd = make_private_round(model, torch.optim.SGD(model.parameters(), lr=1.0),
                             DataLoader(_data(), batch_size=32), noise_multiplier=2.0,
                             max_grad_norm=0.5, noise_fn=constant_noise)
    rnd.optimizer.zero_grad()
    x, y = _data()[:0]  # an empty Poisson batch: only noise moves the model
    rnd.criterion(model(x), y).backward()
    rnd.optimizer.step()
    n_params = sum(p.numel() for p in model.parameters())
    assert calls == [((n_params,), 1.0)] and rnd.steps == 1
    for k, v in rnd.finish().items():
        torch.testing.assert_close(v, start[k] - 1.0 / 32)


def test_default_noise_is_csprng_gaussian_with_requested_std():
    z = default_noise_fn()((50_000,), 3.0, torch.device("cpu"))
    assert z.dtype == torch.float32 and z.shape == (50_000,)
    assert abs(z.mean().item()) < 4 * 3.0 / math.sqrt(50_000)
    assert z.std().item() == pytest.approx(3.0, rel=0.02)
    assert not torch.equal(z, default_noise_fn()((50_000,), 3.0, torch.device("cpu")))


def test_bad_arguments_are_refused_with_named_errors():
    model = get_model("logistic")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        make_private_round(model, opt, _data(), batch_size=8, noise_multiplier=1.0,
                           max_grad_norm=0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        make_private_round(model, opt, _data(), batch_size=8, noise_multiplier=-1.0,
                           max_grad_norm=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        make_private_round(model, opt, DataLoader(_data(), batch_size=8), batch_size=8, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        make_private_round(model, opt, _data(), **kw)
    other = torch.optim.SGD(get_model("logistic").parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not the model's"):
        make_private_round(model, other, _data(), batch_size=8, **kw)
    with pytest.raises(ValueError, match="reduction"):
        make_private_round(model, opt, _data(), batch_size=8,
                           criterion=nn.CrossEntropyLoss(reduction="sum"), **kw)
    assert _hook_count(model) == 0


@pytest.mark.parametrize("mode", [ClippingMode.PRIVFED, ClippingMode.GHOST])
def test_zero_grad_clears_to_none_by_default_and_either_way_gives_the_same_step(mode):
    """``zero_grad()`` sets grads to None (torch's default); ``set_to_none=False`` zeroes
    them; the next step's noisy grads are the same either way (noise from the same seed)."""
    models = [get_model("cnn1d") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x, y = _data()[:16]
    grads = []
    for model, to_none in zip(models, (True, False), strict=True):
        rnd = make_private_round(
            model, torch.optim.SGD(model.parameters(), lr=0.5), _data(), batch_size=16,
            noise_multiplier=1.0, max_grad_norm=0.3, mode=mode,
            noise_fn=torch_noise_fn(torch.Generator().manual_seed(3)))
        for _ in range(2):  # the second step starts from the first step's noisy grads
            if to_none:
                rnd.optimizer.zero_grad()
                assert all(p.grad is None for p in model.parameters())
            else:
                rnd.optimizer.zero_grad(set_to_none=False)
                assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)
            rnd.criterion(rnd.model(x), y).backward()
            rnd.optimizer.step()
        grads.append([p.grad.clone() for p in model.parameters()])
        rnd.finish()
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_private_round_on_cuda_equals_cpu_and_noise_stays_on_the_device():
    dev = torch.device("cuda")
    z = default_noise_fn()((50_000,), 3.0, dev)
    assert z.is_cuda and z.std().item() == pytest.approx(3.0, rel=0.02)
    gen = torch.Generator(device=dev).manual_seed(0)
    assert torch_noise_fn(gen)((7,), 1.0, dev).is_cuda
    states = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(1)
        model = get_model("cnn1d").to(device)
        rnd = make_private_round(
            model, torch.optim.SGD(model.parameters(), lr=0.5), _data(), batch_size=16,
            noise_multiplier=0.0, max_grad_norm=0.3, mode=ClippingMode.PRIVFED,
            sampling_generator=torch.Generator().manual_seed(5))
        for x, y in rnd.data_loader:
            rnd.optimizer.zero_grad()
            rnd.criterion(rnd.model(x.to(device)), y.to(device)).backward()
            rnd.optimizer.step()
        states[device] = rnd.finish()
    for k, v in states["cuda"].items():
        assert v.is_cuda
        torch.testing.assert_close(v.cpu(), states["cpu"][k], rtol=1e-4, atol=1e-5)
