import pytest

from shared.config import ConfigError, Dataset, Partitioner, RunConfig
from simulations.scenario import (
    DEFAULT_SCENARIO,
    ScenarioError,
    app_defaults,
    compose,
    parse_override,
    read_scenario,
)


def test_pyproject_defaults_equal_the_dataclass_defaults():
    assert app_defaults() == RunConfig().to_flat()


def test_parse_round_trip():
    config = RunConfig.from_flat(app_defaults())
    assert config == RunConfig()
    assert config.data.dataset is Dataset.MNIST1D
    assert config.data.partitioner is Partitioner.DIRICHLET


def test_demo_scenario_is_the_documented_main_job():
    config = RunConfig.from_flat(compose(read_scenario(DEFAULT_SCENARIO)))
    assert config.federation.clients == 10
    assert config.data.dataset is Dataset.MNIST1D
    assert config.data.partitioner is Partitioner.DIRICHLET and config.data.alpha == 1.0
    assert config.model.name == "cnn1d"
    assert config.train.centralized_baseline


@pytest.mark.parametrize(
    "flat, match",
    [
        ({"federation.clients": 0}, "federation.clients must be >= 1, got 0"),
        ({"federation.rounds": "abc"}, "federation.rounds must be an integer, got 'abc'"),
        ({"train.lr": "fast"}, "train.lr must be a number"),
        ({"model.name": "vgg"}, "model.name: unknown model 'vgg'"),
        ({"data.dataset": "imagenet"}, "data.dataset: unknown value 'imagenet'; expected one of"),
        ({"data.dataset": "npz"}, "data.path is required"),
        ({"federation.typo": 1}, "unknown config key 'federation.typo'"),
        ({"nonsense.key": 1}, "unknown config key 'nonsense.key'"),
        ({"privacy.enabled": "yes"}, "privacy.enabled must be true or false"),
        ({"faults.dropout": 1.0}, r"faults.dropout must be in \[0, 1\)"),
    ],
)
def test_bad_values_name_the_key(flat, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat(flat)


def test_integral_floats_are_accepted_as_integers():
    assert RunConfig.from_flat({"federation.rounds": 3.0}).federation.rounds == 3


@pytest.mark.parametrize(
    "text, expected",
    [
        ("federation.rounds=3", ("federation.rounds", 3)),
        ("privacy.enabled=false", ("privacy.enabled", False)),
        ("train.lr=0.5", ("train.lr", 0.5)),
        ("model.name=mlp", ("model.name", "mlp")),
        ('model.name="mlp"', ("model.name", "mlp")),
    ],
)
def test_overrides_are_typed_like_toml(text, expected):
    assert parse_override(text) == expected


def test_string_keys_keep_the_word_as_written():
    defaults = app_defaults()
    assert parse_override("faults.byzantine_kind=nan", defaults) == ("faults.byzantine_kind", "nan")
    assert parse_override("model.name=inf", defaults) == ("model.name", "inf")
    flat = compose({}, ["faults.byzantine_kind=nan", "data.label_column=1"])
    assert flat["faults.byzantine_kind"] == "nan" and flat["data.label_column"] == "1"


@pytest.mark.parametrize("text", ["rounds=3", "federation.rounds", "=3"])
def test_malformed_overrides_are_refused(text):
    with pytest.raises(ScenarioError, match="--set expects section.key=value"):
        parse_override(text)


def test_compose_applies_overrides_last():
    flat = compose({"federation.rounds": 5}, ["federation.rounds=7"])
    assert flat["federation.rounds"] == 7
    with pytest.raises(ConfigError, match="--set: unknown config key 'federation.round'"):
        compose({}, ["federation.round=7"])


def test_missing_and_broken_scenario_files(tmp_path):
    with pytest.raises(ScenarioError, match="scenario file not found"):
        read_scenario(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nclients = 2\n")
    with pytest.raises(ScenarioError, match="is not valid TOML"):
        read_scenario(bad)


def test_a_parsed_config_is_reused_but_never_for_a_value_of_another_type():
    first = RunConfig.from_flat({"train.epochs": 2})
    assert RunConfig.from_flat({"train.epochs": 2}) is first  # parsed once per process
    assert RunConfig.from_flat({"train.epochs": 2.0}).train.epochs == 2
    with pytest.raises(ConfigError, match="train.epochs must be an integer, got True"):
        RunConfig.from_flat({"train.epochs": True})  # True == 1 in Python: not the same key
    with pytest.raises(ConfigError, match="unknown config key"):
        RunConfig.from_flat({"train.epochs": 2, "train.epoch": 3})
