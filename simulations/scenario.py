"""Scenario files: TOML over the app's default run config, plus ``--set`` overrides.

A scenario uses the run config's sections (``[federation]``, ``[data]``,
``[model]``, ``[train]``, ``[privacy]``, ``[secagg]``, ``[faults]``); its keys
override the defaults in ``pyproject.toml`` (``[tool.flwr.app.config]``), which
are also what ``flwr run .`` uses. The result is Flower's flat run config.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.common.config import flatten_dict

from shared.config import ConfigError, RunConfig

#: The repository root (the Flower App directory holding pyproject.toml).
PROJECT_DIR = Path(__file__).resolve().parents[1]
SCENARIO_DIR = Path(__file__).resolve().parent
DEFAULT_SCENARIO = SCENARIO_DIR / "demo.toml"


class ScenarioError(ValueError):
    """A scenario file or override cannot be used; the message names it."""


def app_defaults(project_dir: Path = PROJECT_DIR) -> dict[str, Any]:
    """The flat default run config of the Flower App in ``project_dir``."""
    pyproject = project_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise ScenarioError(f"Flower App config not found: {pyproject}")
    with pyproject.open("rb") as fh:
        data = tomllib.load(fh)
    return flatten_dict(data["tool"]["flwr"]["app"]["config"])


def read_scenario(path: str | Path) -> dict[str, Any]:
    """The flat run-config keys a scenario file sets.

    Raises:
        ScenarioError: the file is missing or is not valid TOML.
    """
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"scenario file not found: {path}")
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"scenario file {path} is not valid TOML: {exc}") from None
    try:
        return flatten_dict(data)
    except ValueError as exc:
        raise ScenarioError(f"scenario file {path}: {exc}") from None


def parse_override(text: str, defaults: Mapping[str, Any] | None = None) -> tuple[str, Any]:
    """``"section.key=value"`` to a key and a TOML-typed value (bare words are strings).

    A key whose default is a string keeps the text as written, so ``--set
    faults.byzantine_kind=nan`` means the word, not TOML's float NaN.
    """
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or "." not in key or not key.split(".")[-1]:
        raise ScenarioError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if defaults is not None and isinstance(defaults.get(key), str) and not isinstance(value, str):
        value = raw
    return key, value


def compose(
    scenario: Mapping[str, Any],
    overrides: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Defaults, then the scenario, then the overrides; checked against :class:`RunConfig`.

    Raises:
        ScenarioError: an override is malformed.
        ConfigError: a key is unknown or a value is invalid (names the key).
    """
    flat = dict(app_defaults() if defaults is None else defaults)
    for key, value in scenario.items():
        if key not in flat:
            raise ConfigError(f"unknown config key {key!r}")
        flat[key] = value
    for text in overrides:
        key, value = parse_override(text, flat)
        if key not in flat:
            raise ConfigError(f"--set: unknown config key {key!r}")
        flat[key] = value
    RunConfig.from_flat(flat)
    return flat
