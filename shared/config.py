"""The run configuration both apps agree on, parsed once into frozen dataclasses.

A run config is Flower's flat ``UserConfig``: dotted keys such as
``"federation.rounds"`` mapping to str/int/float/bool. The defaults live in
``pyproject.toml`` under ``[tool.flwr.app.config]``; a scenario TOML file and
``--set section.key=value`` override them key by key. Apps call
:func:`RunConfig.from_flat` at their entry point and pass the object down.

Privacy-relevant settings (``privacy``, ``secagg``) are kept apart from
performance knobs, so changing a performance knob never changes a guarantee.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from shared.models import InputSpec, model_names
from shared.secagg.params import SecAggParams, max_weight_limit


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class Dataset(enum.StrEnum):
    """Datasets that need no download."""

    MNIST1D = "mnist1d"
    DIGITS = "digits"
    NPZ = "npz"
    CSV = "csv"


class Partitioner(enum.StrEnum):
    """How a simulation splits one dataset over its virtual sites."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    SHARDS = "shards"


class Optimizer(enum.StrEnum):
    """Local optimizers."""

    SGD = "sgd"
    ADAM = "adam"


def _enum_value(enum_cls: type[enum.StrEnum], key: str, value: object) -> enum.StrEnum:
    try:
        return enum_cls(value)
    except ValueError:
        options = ", ".join(m.value for m in enum_cls)
        raise ConfigError(f"{key}: unknown value {value!r}; expected one of: {options}") from None


@dataclass(frozen=True)
class FederationConfig:
    """Who takes part and for how long.

    ``evaluate_every`` = k evaluates the global model (centrally, and at the sites when
    ``fraction_evaluate`` > 0) after every k-th round and always after the last; the
    rounds in between report no accuracy or loss.
    """

    clients: int = 10
    rounds: int = 10
    seed: int = 0
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train: int = 1
    evaluate_every: int = 1
    round_timeout: float = 3600.0

    def validate(self) -> None:
        _positive("federation.clients", self.clients)
        _positive("federation.rounds", self.rounds)
        _fraction("federation.fraction_train", self.fraction_train, allow_zero=False)
        _fraction("federation.fraction_evaluate", self.fraction_evaluate, allow_zero=True)
        _positive("federation.min_train", self.min_train)
        _positive("federation.evaluate_every", self.evaluate_every)
        if not (math.isfinite(self.round_timeout) and self.round_timeout > 0):
            raise ConfigError(f"federation.round_timeout must be > 0 seconds, got "
                              f"{self.round_timeout}")

    def train_cohort(self) -> int:
        """Sites sampled per training round when all ``clients`` are connected (FedAvg's rule)."""
        return max(int(self.clients * self.fraction_train), min(self.min_train, self.clients))


@dataclass(frozen=True)
class DataConfig:
    """Which data and how a simulation partitions it.

    ``input_shape`` and ``num_classes`` declare the model's input when no party reads it
    off a file: one example's shape as comma-separated sizes (``"40"``, ``"1,28,28"``; a
    Flower run config holds scalars only) and the class count. Empty and 0: the shape is
    fixed by a built-in data set or read off ``path``. With ``dataset`` = npz/csv a
    deployed server needs either ``path`` (a file it holds) or both keys; every site
    checks its own file against the declared spec.
    """

    dataset: Dataset = Dataset.MNIST1D
    samples: int = 5000
    partitioner: Partitioner = Partitioner.DIRICHLET
    alpha: float = 1.0
    shards_per_client: int = 2
    path: str = ""
    label_column: str = "label"
    val_fraction: float = 0.1
    input_shape: str = ""
    num_classes: int = 0

    def validate(self) -> None:
        _positive("data.samples", self.samples)
        if not self.alpha > 0:
            raise ConfigError(f"data.alpha must be > 0, got {self.alpha}")
        _positive("data.shards_per_client", self.shards_per_client)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        declared = self.input_spec()  # checks both keys
        if self.dataset in (Dataset.NPZ, Dataset.CSV) and not self.path and declared is None:
            raise ConfigError(
                f"data.path is required for data.dataset = {self.dataset.value!r} unless the "
                "run declares the sites' data spec (data.input_shape and data.num_classes)"
            )

    def input_spec(self) -> InputSpec | None:
        """The declared input spec (``None`` if the run declares none).

        Raises:
            ConfigError: a malformed shape, fewer than 2 classes, or one key without the other.
        """
        if not self.input_shape.strip() and self.num_classes == 0:
            return None
        if not self.input_shape.strip():
            raise ConfigError(f"data.num_classes = {self.num_classes} needs data.input_shape "
                              "too (one example's shape, e.g. '40' or '1,28,28')")
        parts = [p.strip() for p in self.input_shape.split(",")]
        if not all(p.isdigit() and int(p) > 0 for p in parts) or len(parts) > 4:
            raise ConfigError(
                "data.input_shape must be 1 to 4 positive sizes separated by commas "
                f"(e.g. '40' or '1,28,28'), got {self.input_shape!r}"
            )
        if self.num_classes < 2:
            raise ConfigError(f"data.num_classes must be >= 2 with data.input_shape set, "
                              f"got {self.num_classes}")
        return InputSpec(tuple(int(p) for p in parts), self.num_classes)


@dataclass(frozen=True)
class ModelConfig:
    """Which registered model (see :mod:`shared.models`)."""

    name: str = "cnn1d"

    def validate(self) -> None:
        if self.name not in model_names():
            raise ConfigError(
                f"model.name: unknown model {self.name!r}; expected one of: "
                f"{', '.join(model_names())}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each site (performance and utility knobs)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.003
    optimizer: Optimizer = Optimizer.ADAM
    momentum: float = 0.9
    centralized_baseline: bool = False

    def validate(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.batch_size", self.batch_size)
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum}")


class Clipping(enum.StrEnum):
    """Per-sample clipping engine for DP-SGD (same guarantee, different speed)."""

    PRIVFED = "privfed"
    HOOKS = "hooks"
    GHOST = "ghost"


class AccountantName(enum.StrEnum):
    """Privacy accountants a simulated site may use."""

    RDP = "rdp"
    PRV = "prv"


@dataclass(frozen=True)
class PrivacyConfig:
    """Example-level DP-SGD at each site (privacy-relevant).

    ``noise_multiplier``, ``max_grad_norm`` and ``clipping`` are the server's
    proposal for the run. ``epsilon``, ``delta`` and ``accountant`` are a *site's*
    budget: a deployed site reads its budget from its own node config and
    ignores these; only simulated sites (played by the researcher) take them.
    """

    enabled: bool = False
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    clipping: Clipping = Clipping.PRIVFED
    epsilon: float = 8.0
    delta: float = 1e-5
    accountant: AccountantName = AccountantName.RDP

    def validate(self) -> None:
        if not self.noise_multiplier >= 0:
            raise ConfigError(
                f"privacy.noise_multiplier must be >= 0 (0: calibrate to the budget), "
                f"got {self.noise_multiplier}"
            )
        if not 0 < self.max_grad_norm < float("inf"):
            raise ConfigError(f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.epsilon < float("inf"):
            raise ConfigError(f"privacy.epsilon must be > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation, SecAgg+ (privacy-relevant).

    ``k`` neighbours per site (0: every other sampled site, plain SecAgg) and
    reconstruction threshold ``threshold`` (0: the smallest value > k/2 that
    tolerates the most dropouts, i.e. floor(k/2) + 1). Updates are clipped to
    ``[-clip_range, clip_range]`` per coordinate and quantized to ``bits`` bits;
    a site's weight (its example count) is capped at ``max_weight``.
    """

    enabled: bool = False
    k: int = 0
    threshold: int = 0
    bits: int = 16
    clip_range: float = 1.0
    max_weight: int = 1000

    def validate(self) -> None:
        for key, value in (("secagg.k", self.k), ("secagg.threshold", self.threshold)):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0 (0: automatic), got {value}")
        if not 1 <= self.bits <= 24:
            raise ConfigError(f"secagg.bits must be in 1..24, got {self.bits}")
        if not 0 < self.clip_range < float("inf"):
            raise ConfigError(f"secagg.clip_range must be > 0, got {self.clip_range}")
        _positive("secagg.max_weight", self.max_weight)

    def params_for(self, n: int) -> SecAggParams:
        """The SecAgg+ parameters of a round with ``n`` sampled sites.

        ``k = 0`` means ``n - 1``; when ``n * k`` is odd (no k-regular graph exists) ``k`` is
        raised by one, which is always <= n - 1. ``threshold = 0`` means ``floor(k / 2) + 1``.

        Raises:
            ConfigError: one clear error naming the key at fault: fewer than 2 sites,
                ``k > n - 1``, ``threshold`` not in ``(k/2, k]``, or ``bits`` and
                ``max_weight`` letting the sum of n sites wrap 2**32.
        """
        if n < 2:
            raise ConfigError(
                f"secagg needs >= 2 sites per round, got {n} (federation.clients x "
                "federation.fraction_train)"
            )
        if self.k > n - 1:
            raise ConfigError(f"secagg.k must be <= sites per round - 1 = {n - 1}, got {self.k}")
        k = self.k or n - 1
        k += (n * k) % 2
        t = self.threshold or k // 2 + 1
        if not k / 2 < t <= k:
            raise ConfigError(
                f"secagg.threshold must be in (k/2, k] = ({k / 2}, {k}] for k={k} neighbours "
                f"at {n} sites per round, got {t}"
            )
        limit = max_weight_limit(n, self.bits)
        if self.max_weight > limit:
            raise ConfigError(
                f"secagg.max_weight={self.max_weight} with secagg.bits={self.bits} lets the sum "
                f"of {n} sites wrap 2**32; use max_weight <= {limit} or fewer bits"
            )
        return SecAggParams(n=n, k=k, t=t, bits=self.bits, clip_range=self.clip_range,
                            max_weight=self.max_weight)


class Misbehaviour(enum.StrEnum):
    """What a simulated byzantine site sends (``[faults] byzantine_kind``)."""

    NAN = "nan"
    SHAPE = "shape"
    NORM = "norm"
    CRASH = "crash"


class DropoutStage(enum.StrEnum):
    """Where a simulated site drops out of a round (``faults.dropout_stage``).

    ``train``: during local training (the only stage without SecAgg). With SecAgg on, the
    protocol stages: ``advertise`` (keys), ``share`` (key shares), ``collect`` (after
    training, before the masked input is sent), ``unmask``; ``any`` draws one of these four
    per dropped site and round.
    """

    TRAIN = "train"
    ADVERTISE = "advertise"
    SHARE = "share"
    COLLECT = "collect"
    UNMASK = "unmask"
    ANY = "any"


@dataclass(frozen=True)
class FaultsConfig:
    """Faults a simulation injects so users can rehearse them."""

    dropout: float = 0.0
    dropout_stage: DropoutStage = DropoutStage.TRAIN
    #: Fraction of sites that misbehave every round, and how (:class:`Misbehaviour`).
    byzantine: float = 0.0
    byzantine_kind: Misbehaviour = Misbehaviour.NAN
    #: Chance that a sampled site crashes in a round after training (so, with DP, after
    #: its ledger reserved the round) and sends no update.
    crash: float = 0.0
    #: Chance that a sampled site is a straggler in a round: it replies ``slow_seconds``
    #: late (past ``federation.round_timeout``, the server goes on without it).
    slow: float = 0.0
    slow_seconds: float = 10.0

    def validate(self) -> None:
        _fraction("faults.dropout", self.dropout, allow_zero=True, allow_one=False)
        _fraction("faults.byzantine", self.byzantine, allow_zero=True, allow_one=False)
        _fraction("faults.crash", self.crash, allow_zero=True, allow_one=False)
        _fraction("faults.slow", self.slow, allow_zero=True, allow_one=True)
        if not (math.isfinite(self.slow_seconds) and self.slow_seconds >= 0):
            raise ConfigError(f"faults.slow_seconds must be >= 0, got {self.slow_seconds}")


class Aggregation(enum.StrEnum):
    """How the server combines the accepted updates."""

    FEDAVG = "fedavg"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed_mean"


@dataclass(frozen=True)
class RobustConfig:
    """Reply validation and robust aggregation (without SecAgg; see server/robust.py).

    ``max_update_norm`` rejects a reply whose update (reply - global) is longer;
    ``norm_bound`` scales longer updates down to it before aggregating; 0 switches
    either off. ``max_examples`` rejects a larger claimed example count (0: off).
    """

    aggregation: Aggregation = Aggregation.FEDAVG
    trim_fraction: float = 0.2
    norm_bound: float = 0.0
    max_update_norm: float = 0.0
    max_examples: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"robust.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        for key, value in (("robust.norm_bound", self.norm_bound),
                           ("robust.max_update_norm", self.max_update_norm),
                           ("robust.max_examples", self.max_examples)):
            if not 0 <= value < float("inf"):
                raise ConfigError(f"{key} must be >= 0 (0: off), got {value}")


#: Cap of ``output.return_max_bytes``: Flower gives a ServerApp's log a few seconds to
#: drain when the run ends (64 MiB arrived in 6 s on one host; 128 MiB lost its tail).
MAX_RETURN_BYTES = 64 * 2**20


@dataclass(frozen=True)
class OutputConfig:
    """Where the server writes metrics, plots, checkpoints and the final model.

    ``dir`` empty means ``~/.privfed/runs/<run-id>``. The server checkpoints after
    every completed round and keeps the last ``checkpoint_keep``; ``resume``
    continues the run in ``dir`` from its last good checkpoint.
    """

    dir: str = ""
    checkpoint_keep: int = 3
    resume: bool = False
    #: Most bytes of the run's files the ServerApp writes back into its log for the
    #: submitter (``privfed run`` sets it; see server/handback.py); 0: none.
    return_max_bytes: int = 0

    def validate(self) -> None:
        _positive("output.checkpoint_keep", self.checkpoint_keep)
        if not 0 <= self.return_max_bytes <= MAX_RETURN_BYTES:
            raise ConfigError(f"output.return_max_bytes must be in [0, {MAX_RETURN_BYTES}] "
                              f"(0: keep the files on the server), got {self.return_max_bytes}")
        if self.resume and not self.dir:
            raise ConfigError("output.resume needs output.dir (the run folder to resume)")


@dataclass(frozen=True)
class RunConfig:
    """The whole run configuration, one frozen object per app."""

    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @classmethod
    def from_flat(
        cls, flat: Mapping[str, Any], *, strict: bool = True, complete: bool = False
    ) -> RunConfig:
        """Parse Flower's flat run config (``"section.key": value``).

        Args:
            flat: dotted keys to scalar values; missing keys keep their defaults
                unless ``complete``.
            strict: refuse keys this version does not know (a typo must not be
                silently ignored).
            complete: require every key. The apps parse with this: Flower always
                fills a run config from the app's defaults, so a missing key means
                the config never arrived, and defaults would silently stand in.

        Raises:
            ConfigError: an unknown key, a value of the wrong type, or a value out
                of range; the message names the key.
        """
        # Apps parse the same run config on every message: parse each distinct one once.
        # Types are part of the key (1, 1.0 and True are equal in Python, not here).
        try:
            key = tuple((k, type(v), v) for k, v in flat.items())
            hash(key)
        except TypeError:  # an unhashable value: parse it (and let the checks name it)
            return cls._parse(flat, strict=strict, complete=complete)
        return _parse_cached(cls, key, strict, complete)

    @classmethod
    def _parse(cls, flat: Mapping[str, Any], *, strict: bool, complete: bool) -> RunConfig:
        if complete:
            missing = sorted(set(cls().to_flat()) - set(flat))
            if missing:
                raise ConfigError(
                    f"run config is missing {len(missing)} key(s), e.g. {missing[0]!r}; "
                    "was the app started without its run config?"
                )
        sections: dict[str, dict[str, Any]] = {f.name: {} for f in fields(cls)}
        for key, value in flat.items():
            section, _, name = key.partition(".")
            if section not in sections or not name:
                if strict:
                    raise ConfigError(f"unknown config key {key!r}")
                continue
            sections[section][name] = value
        parts = {}
        for f in fields(cls):
            section_cls = _section_class(f)
            parts[f.name] = _build_section(f.name, section_cls, sections[f.name], strict)
        config = cls(**parts)
        for part in parts.values():
            part.validate()
        if config.secagg.enabled:  # refuse a bad combination before any round starts
            config.secagg.params_for(config.federation.train_cohort())
            if config.robust.aggregation is not Aggregation.FEDAVG:
                raise ConfigError(
                    f"robust.aggregation = {config.robust.aggregation.value!r} needs every "
                    "site's own update, which secure aggregation hides; use 'fedavg' with "
                    "secagg.enabled (updates are clipped at the sites before encoding)"
                )
        return config

    def to_flat(self) -> dict[str, Any]:
        """The inverse of :meth:`from_flat` (enums as their string values)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            for g in fields(getattr(self, f.name)):
                value = getattr(getattr(self, f.name), g.name)
                out[f"{f.name}.{g.name}"] = value.value if isinstance(value, enum.Enum) else value
        return out


_S = TypeVar("_S")


@functools.lru_cache(maxsize=16)
def _parse_cached(
    cls: type[RunConfig], key: tuple[tuple[str, type, Any], ...], strict: bool, complete: bool
) -> RunConfig:
    return cls._parse({k: v for k, _, v in key}, strict=strict, complete=complete)


def _section_class(f: dataclasses.Field[Any]) -> type:
    return type(f.default_factory())  # type: ignore[misc]  # every section has a factory


def _build_section(section: str, section_cls: type[_S], values: dict[str, Any], strict: bool) -> _S:
    known = {f.name: f for f in fields(section_cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in known:
            if strict:
                raise ConfigError(
                    f"unknown config key {key!r}; {section} has: {', '.join(sorted(known))}"
                )
            continue
        kwargs[name] = _coerce(key, known[name].default, value)
    return section_cls(**kwargs)


def _coerce(key: str, default: object, value: object) -> object:
    """Check ``value`` against the type of the field's default and convert if lossless."""
    if isinstance(default, enum.StrEnum):
        return _enum_value(type(default), key, value)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {type(default).__name__}")  # pragma: no cover


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key} must be >= 1, got {value}")


def _fraction(key: str, value: float, *, allow_zero: bool, allow_one: bool = True) -> None:
    lo_ok = value >= 0.0 if allow_zero else value > 0.0
    hi_ok = value <= 1.0 if allow_one else value < 1.0
    if not (lo_ok and hi_ok):
        lo = "[0" if allow_zero else "(0"
        hi = "1]" if allow_one else "1)"
        raise ConfigError(f"{key} must be in {lo}, {hi}, got {value}")
