import pytest
import torch
from opacus.validators import ModuleValidator

from shared.models import DEFAULT_SPECS, InputSpec, UnknownModelError, get_model, model_names


@pytest.mark.parametrize("name", model_names())
def test_every_model_passes_opacus_validation_strictly(name):
    model = get_model(name)
    assert ModuleValidator.validate(model, strict=False) == []
    ModuleValidator.validate(model, strict=True)  # raises on any problem


@pytest.mark.parametrize("name", model_names())
def test_every_model_trains_one_step(name):
    torch.manual_seed(0)
    spec = DEFAULT_SPECS[name]
    model = get_model(name)
    x = torch.randn(5, *spec.shape)
    y = torch.randint(0, spec.num_classes, (5,))
    logits = model(x)
    assert logits.shape == (5, spec.num_classes)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_models_follow_the_input_spec():
    model = get_model("mlp", InputSpec((1, 8, 8), 3))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    model = get_model("cnn2d", InputSpec((1, 8, 8), 10))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_same_seed_same_initial_weights():
    torch.manual_seed(7)
    a = get_model("cnn1d").state_dict()
    torch.manual_seed(7)
    b = get_model("cnn1d").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(UnknownModelError, match="unknown model 'vgg'.*cnn1d"):
        get_model("vgg")
