"""The run declares the model's input (data.input_shape, data.num_classes): the server
needs no data file, and each site checks its own file against the declaration."""

import numpy as np
import pytest

from shared.config import ConfigError, DataConfig, RunConfig

if not hasattr(DataConfig, "input_spec"):
    pytest.skip("the run config has no data.input_shape/data.num_classes yet",
                allow_module_level=True)

from client.data import DATA_PATH, site_data  # noqa: E402
from shared.data import DataError, load  # noqa: E402
from shared.models import InputSpec  # noqa: E402


def _config(**data):
    return RunConfig.from_flat({f"data.{k}": v for k, v in data.items()})


@pytest.mark.parametrize(("data", "key"), [
    ({"dataset": "npz"}, "data.path is required"),
    ({"dataset": "csv", "input_shape": "40"}, "data.num_classes must be >= 2"),
    ({"dataset": "npz", "num_classes": 3}, "needs data.input_shape"),
    ({"dataset": "npz", "input_shape": "4x", "num_classes": 3}, "data.input_shape must be"),
    ({"dataset": "npz", "input_shape": "0,3", "num_classes": 3}, "data.input_shape must be"),
    ({"dataset": "npz", "input_shape": "1,2,3,4,5", "num_classes": 3}, "data.input_shape must"),
    ({"dataset": "npz", "input_shape": "40", "num_classes": 1}, "data.num_classes must be >= 2"),
])
def test_a_bad_declaration_is_one_error_naming_the_key(data, key):
    with pytest.raises(ConfigError, match=key) as err:
        _config(**data)
    assert "\n" not in str(err.value)


def test_without_a_file_the_server_gets_the_declared_spec_and_no_examples():
    split = load(_config(dataset="npz", input_shape=" 1, 28,28", num_classes=10).data)
    assert split.spec == InputSpec((1, 28, 28), 10)
    assert len(split.train) == len(split.test) == 0 and split.test.x.shape == (0, 1, 28, 28)


def test_a_builtin_data_set_must_match_the_declaration():
    assert load(_config(input_shape="40", num_classes=10).data).spec == InputSpec((40,), 10)
    with pytest.raises(DataError, match="mnist1d is shape '40' with 10 classes"):
        load(_config(input_shape="41", num_classes=10).data)


@pytest.fixture
def site_file(tmp_path):
    path = tmp_path / "site.npz"
    np.savez(path, x=np.zeros((20, 40), np.float32), y=np.arange(20) % 5)  # labels 0..4
    return path


def test_a_server_file_must_fit_the_declaration_which_may_add_classes(site_file):
    config = _config(dataset="npz", path=str(site_file), input_shape="40", num_classes=7)
    assert load(config.data).spec == InputSpec((40,), 7)  # the file holds labels 0..4 only
    with pytest.raises(DataError, match="label 4 is outside 0..3"):
        load(_config(dataset="npz", path=str(site_file), input_shape="40", num_classes=4).data)


def test_each_site_uses_the_declared_spec_and_refuses_a_file_that_does_not_fit(site_file):
    node = {DATA_PATH: str(site_file), "site-name": "a"}
    fits = _config(dataset="npz", input_shape="40", num_classes=7)
    assert site_data(fits, node).spec == InputSpec((40,), 7)  # not 5, as read off the file
    for declared, message in [
        ({"input_shape": "39", "num_classes": 7},
         "examples have shape '40', but the run declares data.input_shape = '39'"),
        ({"input_shape": "40", "num_classes": 3}, "label 4 is outside 0..2 (data.num_classes = 3)"),
    ]:
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            site_data(_config(dataset="npz", **declared), node)
        assert str(site_file) in str(e.value)


def test_with_a_builtin_data_set_a_site_file_must_have_its_shape(tmp_path):
    wide = tmp_path / "wide.npz"
    np.savez(wide, x=np.zeros((4, 41), np.float32), y=np.array([0, 1, 2, 3]))
    with pytest.raises(DataError, match="shape '41', but the run declares data.input_shape = '40'"):
        site_data(_config(), {DATA_PATH: str(wide), "site-name": "b"})  # mnist1d: 40 wide
