import pytest
import torch
from torch import nn

from shared.models import get_model, model_names
from shared.wire import from_record, load_into, to_record


class WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("steps", torch.tensor([2**40 + 1], dtype=torch.int64))
        self.register_buffer("fp16", torch.randn(4, dtype=torch.float16))


@pytest.mark.parametrize("name", model_names())
def test_round_trip_is_bit_exact(name):
    state = get_model(name).state_dict()
    back = from_record(to_record(state))
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype
        assert torch.equal(back[key], value)


def test_round_trip_keeps_integer_and_half_buffers():
    state = WithBuffers().state_dict()
    back = from_record(to_record(state))
    assert back["steps"].item() == 2**40 + 1
    assert back["fp16"].dtype == torch.float16 and torch.equal(back["fp16"], state["fp16"])


def test_load_into_names_missing_keys_and_wrong_shapes():
    model = get_model("mlp")
    record = to_record(get_model("logistic").state_dict())
    with pytest.raises(ValueError, match="missing .*net.1.weight"):
        load_into(model, record)
    other = {k: v for k, v in model.state_dict().items()}
    other["net.1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="net.1.weight has shape"):
        load_into(model, to_record(other))
