import numpy as np
import pytest
import torch
from flwr.app import Array
from torch import nn

from shared.models import get_model, model_names
from shared.wire import (
    array_to_numpy,
    from_record,
    load_into,
    numpy_to_array,
    numpy_to_record,
    record_to_numpy,
    to_record,
)


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


_DTYPES = ["float32", "float64", "float16", "int64", "uint32", "int8", "bool", ">f4", "<U3"]
_SHAPES = [(), (0,), (1,), (3, 4), (2, 0, 5), (256, 100)]


@pytest.mark.parametrize("dtype", _DTYPES)
def test_fast_codec_writes_and_reads_what_flower_does(dtype):
    g = np.random.default_rng(1)
    for shape in _SHAPES:
        x = np.asarray(g.standard_normal(shape) * 10).astype(dtype)
        ours, flowers = numpy_to_array(x), Array.from_numpy_ndarray(x)
        assert ours.data == flowers.data  # the same bytes on the wire
        assert (ours.dtype, tuple(ours.shape)) == (flowers.dtype, tuple(flowers.shape))
        back = array_to_numpy(flowers)
        assert back.dtype == x.dtype and back.shape == x.shape and np.array_equal(back, x)
        assert back.flags.writeable  # a copy, not a view of the message's bytes


def test_fast_decode_defers_to_numpy_on_anything_unexpected():
    x = np.arange(6.0).reshape(2, 3)
    fortran = Array.from_numpy_ndarray(np.asfortranarray(x))
    assert np.array_equal(array_to_numpy(fortran), x)
    good = Array.from_numpy_ndarray(x.astype(np.float32))
    # metadata that disagrees with the bytes: numpy.load reads the bytes' own header
    lying = Array(dtype="float64", shape=(6,), stype=good.stype, data=good.data)
    assert np.array_equal(array_to_numpy(lying), x.astype(np.float32))
    truncated = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-4])
    with pytest.raises(ValueError):
        array_to_numpy(truncated)


def test_record_helpers_round_trip_a_state_dict():
    state = WithBuffers().state_dict()
    arrays = record_to_numpy(to_record(state))
    assert list(arrays) == list(state)
    again = record_to_numpy(numpy_to_record(arrays))
    assert all(np.array_equal(again[k], arrays[k]) for k in arrays)


def test_load_into_writes_what_load_state_dict_writes():
    source = get_model("mlp")
    for param in source.parameters():
        param.data.normal_()
    state = dict(source.state_dict())
    state["net.1.bias"] = state["net.1.bias"].double()  # cast on the way in, as copy_ does
    ours, theirs = get_model("mlp"), get_model("mlp")
    load_into(ours, to_record(state))
    theirs.load_state_dict(state)
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), key
    assert all(p.requires_grad for p in ours.parameters())


def test_load_into_writes_nothing_when_a_shape_is_wrong():
    model = get_model("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = {k: torch.ones_like(v) for k, v in before.items()}
    other["net.5.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="net.5.bias has shape"):
        load_into(model, to_record(other))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
