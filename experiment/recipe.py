"""Experiment recipes: every stage's settings in one TOML file, validated on load.

A recipe has one table per concern (``[experiment]``, ``[data]``, ``[segment]``,
``[classify]``, ``[pseudo_classify]``, ``[autoencode]``, ``[embed]``, ``[cluster]``,
``[evaluate]``); each becomes a frozen dataclass below. A missing table or setting takes the
default written here; an unknown table or setting, a value of the wrong type or out of
range is an error naming the file, the table and the setting. All problems of a file are
reported together, one line each, so a user fixes a recipe in one pass.

Two recipes ship in ``experiment/recipes/``: ``demo`` (CPU, minutes, synthetic data) and
``report`` (the report's settings, for a GPU and the real data). ``load_recipe`` takes one
of those names or a path.
"""

from __future__ import annotations

import sys
import types
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pneumo.shards import selections
from pneumo.shards.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli is the same parser, published before it joined the stdlib
    import tomli as tomllib

ARMS = ("none", "labels", "pseudo", "leaky", "imagenet")
SHIPPED = ("demo", "report")


class RecipeError(ConfigError):
    """A recipe file is unreadable or has bad settings (one line per problem).

    ``problems`` holds ``(setting, reason)`` pairs when raised by a settings object.
    """

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _at_least(low: int) -> Any:
    return lambda v: None if v >= low else f"must be at least {low}"


def _probability(v: Any) -> str | None:
    return None if 0 < v < 1 else "must be between 0 and 1 (exclusive)"


def _multiple_of_32(v: Any) -> str | None:
    return None if v >= 32 and v % 32 == 0 else "must be a multiple of 32 (U-Net strides), >= 32"


def _pos_rate(v: Any) -> str | None:
    if v is None or (len(v) == 2 and all(0 <= p <= 1 for p in v)):
        return None
    return 'must be two probabilities like [0.8, 0.4], or "none"'


def _arms(v: Any) -> str | None:
    bad = [a for a in v if a not in ARMS]
    if bad or not v:
        return f"must be a non-empty list of {', '.join(ARMS)}"
    if len(set(v)) != len(v):
        return "names an arm twice"
    return None


def _fractions(v: Any) -> str | None:
    if not v or any(not 0 < f <= 1 for f in v):
        return "must be a non-empty list of fractions in (0, 1], like [0.01, 0.1, 1.0]"
    if len(set(v)) != len(v):
        return "names a fraction twice"
    return None


def _kinds(v: Any) -> str | None:
    return (
        None
        if v and set(v) <= {"ae", "vae"} and len(set(v)) == len(v)
        else 'must list "ae" and/or "vae"'
    )


def _balance(v: Any) -> str | None:
    if v in ("none", "classes"):
        return None
    if v.startswith("pos-rate:"):
        try:
            rate = float(v.split(":", 1)[1])
        except ValueError:
            rate = -1.0
        if 0 < rate < 1:
            return None
    return 'must be "none", "classes" or "pos-rate:R" with 0 < R < 1'


def _check(check: Any, default: Any = None, **kw: Any) -> Any:
    """A dataclass field with a default and a range check (a function -> problem or None)."""
    return field(default=default, metadata={"check": check}, **kw)


class _Section:
    """Validation shared by every table: types from the annotations, ranges from metadata."""

    TABLE = ""

    def __post_init__(self) -> None:
        problems = field_problems(self)
        if problems:
            text = "; ".join(f"[{self.TABLE}] {name}: {why}" for name, why in problems)
            raise RecipeError(text, problems)


@dataclass(frozen=True, kw_only=True)
class ExperimentSettings(_Section):
    """``[experiment]``: what to compare and how to summarise it."""

    TABLE = "experiment"
    name: str = "experiment"
    description: str = ""
    seeds: int = _check(_at_least(1), 3)  # segmentation seeds 0..seeds-1 per arm
    arms: tuple[str, ...] = _check(_arms, ("none", "labels", "pseudo"))
    pretrain_seed: int = _check(_at_least(0), 0)  # one pretraining per arm, shared by seeds
    # Shares of the SIIM training patients every arm and seed segments with (nested subsets).
    label_fractions: tuple[float, ...] = _check(_fractions, (1.0,))
    bootstrap_resamples: int = _check(_at_least(100), 10_000)
    bootstrap_seed: int = _check(_at_least(0), 0)
    confidence: float = _check(_probability, 0.95)


@dataclass(frozen=True, kw_only=True)
class DataSettings(_Section):
    """``[data]``: the manifest selections (``--where`` expressions) of every stage."""

    TABLE = "data"
    siim_train: str = selections.SIIM_TRAIN
    siim_val: str = selections.SIIM_VAL
    siim_test: str = selections.SIIM_TEST
    nih_train: str = selections.NIH_TRAIN
    nih_val: str = selections.NIH_VAL
    nih_test: str = selections.NIH_TEST


@dataclass(frozen=True, kw_only=True)
class SegmentSettings(_Section):
    """``[segment]``: the U-Net runs, identical for every arm and seed (the report: 512 px,
    batch 8, Adam 1e-4)."""

    TABLE = "segment"
    size: int = _check(_multiple_of_32, 512)
    batch_size: int = _check(_at_least(1), 8)
    lr: float = _check(_positive, 1e-4)
    warmup_steps: int = _check(_at_least(0), 100)
    epochs: int = _check(_at_least(1), 10)
    steps_per_epoch: int | None = _check(_at_least(1), None)  # none: one pass over train
    pos_rate: tuple[float, float] | None = _check(_pos_rate, (0.8, 0.4))
    workers: int = _check(_at_least(0), 2)
    encoder: str = "resnet34"
    in_channels: int = _check(lambda v: None if v in (1, 3) else "must be 1 or 3", 1)
    focal_weight: float = _check(_at_least(0), 10.0)
    dice_weight: float = _check(_at_least(0), 1.0)
    checkpoint_every: int = _check(_at_least(1), 500)
    amp: bool = True


@dataclass(frozen=True, kw_only=True)
class ClassifySettings(_Section):
    """``[classify]`` (labels and leaky arms) and ``[pseudo_classify]``: the ResNet-34
    classifier whose trunk becomes the U-Net encoder (the report: SGD 1e-3, momentum 0.9,
    lr / 10 after 5 epochs without validation-loss improvement)."""

    TABLE = "classify"
    size: int = _check(_multiple_of_32, 512)
    batch_size: int = _check(_at_least(1), 32)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = _check(_positive, 1e-3)
    momentum: float = _check(_at_least(0), 0.9)
    plateau_patience: int = _check(_at_least(0), 5)
    plateau_factor: float = _check(_probability, 0.1)
    balance: str = _check(_balance, "pos-rate:0.5")
    epochs: int = _check(_at_least(1), 10)
    steps_per_epoch: int | None = _check(_at_least(1), None)
    workers: int = _check(_at_least(0), 2)
    amp: bool = True


@dataclass(frozen=True, kw_only=True)
class AutoencodeSettings(_Section):
    """``[autoencode]``: the AE (BCE) and beta-VAE (ELBO) trained on unlabelled NIH train."""

    TABLE = "autoencode"
    kinds: tuple[str, ...] = _check(_kinds, ("ae", "vae"))
    size: int = _check(_multiple_of_32, 256)
    latent_dim: int = _check(_at_least(2), 128)
    beta: float = _check(_at_least(0), 4.0)
    kl_anneal_steps: int = _check(_at_least(0), 1000)
    batch_size: int = _check(_at_least(1), 32)
    lr: float = _check(_positive, 1e-4)
    epochs: int = _check(_at_least(1), 50)
    steps_per_epoch: int | None = _check(_at_least(1), None)
    workers: int = _check(_at_least(0), 2)
    amp: bool = True


@dataclass(frozen=True, kw_only=True)
class EmbedSettings(_Section):
    """``[embed]``: which autoencoder's latent codes are clustered (the VAE's ``mu``)."""

    TABLE = "embed"
    source: Literal["ae", "vae"] = "vae"
    batch_size: int = _check(_at_least(1), 64)
    workers: int = _check(_at_least(0), 2)


@dataclass(frozen=True, kw_only=True)
class ClusterSettings(_Section):
    """``[cluster]``: PCA then DBSCAN into 14 pseudo-classes (the report)."""

    TABLE = "cluster"
    pca: int = _check(_at_least(2), 50)
    clusters: int = _check(_at_least(2), 14)
    method: Literal["dbscan", "hdbscan", "kmeans"] = "dbscan"
    min_samples: int = _check(_at_least(1), 10)
    noise: Literal["drop", "class"] = "drop"


@dataclass(frozen=True, kw_only=True)
class EvaluateSettings(_Section):
    """``[evaluate]``: how every segmentation run is scored on SIIM test."""

    TABLE = "evaluate"
    tta: bool = False
    batch_size: int = _check(_at_least(1), 8)
    workers: int = _check(_at_least(0), 2)


_TABLES: dict[str, type[_Section]] = {
    "experiment": ExperimentSettings,
    "data": DataSettings,
    "segment": SegmentSettings,
    "classify": ClassifySettings,
    "pseudo_classify": ClassifySettings,
    "autoencode": AutoencodeSettings,
    "embed": EmbedSettings,
    "cluster": ClusterSettings,
    "evaluate": EvaluateSettings,
}
_PSEUDO_DEFAULTS = {"balance": "classes"}  # DeepCluster's uniform-over-clusters sampler


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A whole recipe: one settings object per table, plus where it came from."""

    source: str  # a shipped name or the file's path
    text: str  # the TOML as read, for the report
    experiment: ExperimentSettings = field(default_factory=ExperimentSettings)
    data: DataSettings = field(default_factory=DataSettings)
    segment: SegmentSettings = field(default_factory=SegmentSettings)
    classify: ClassifySettings = field(default_factory=ClassifySettings)
    pseudo_classify: ClassifySettings = field(
        default_factory=lambda: ClassifySettings(**_PSEUDO_DEFAULTS)
    )
    autoencode: AutoencodeSettings = field(default_factory=AutoencodeSettings)
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read and validate a recipe: ``demo``, ``report`` or a TOML file.

    Raises:
        RecipeError: the file is missing or not TOML, or one or more settings are bad
            (one line each: ``FILE: [table] setting: reason``).
    """
    source = str(name_or_path)
    if source in SHIPPED:
        text = (resources.files("pneumo.experiment") / "recipes" / f"{source}.toml").read_text()
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as e:
            raise RecipeError(
                f"recipe {source}: cannot read it ({e.strerror}); give a TOML file or one of "
                f"{', '.join(SHIPPED)}"
            ) from e
    return parse_recipe(text, source)


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Validate the TOML ``text`` of a recipe (``source`` names it in errors)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{source}: not valid TOML: {e}") from e
    problems: list[str] = []
    tables: dict[str, Any] = {}
    for table, values in doc.items():
        if table not in _TABLES:
            problems.append(f"{source}: [{table}]: unknown table (known: {', '.join(_TABLES)})")
        elif not isinstance(values, dict):
            problems.append(f"{source}: {table}: must be a [{table}] table")
        else:
            base = _PSEUDO_DEFAULTS if table == "pseudo_classify" else {}
            built = _build(_TABLES[table], {**base, **values}, f"{source}: [{table}]", problems)
            if built is not None:
                tables[table] = built
    if problems:
        raise RecipeError("\n".join(problems))
    return Recipe(source=source, text=text, **tables)


def _build(cls: type[_Section], values: dict[str, Any], where: str, problems: list[str]) -> Any:
    """One table's dataclass, or None with a line per bad setting added to ``problems``."""
    hints = typing.get_type_hints(cls)
    specs = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name not in specs:
            known = ", ".join(sorted(specs))
            problems.append(f"{where} {name}: unknown setting (known: {known})")
            continue
        converted, why = _convert(value, hints[name])
        if why is None and converted is not None and "check" in specs[name].metadata:
            why = specs[name].metadata["check"](converted)
        if why:
            problems.append(f"{where} {name}: {why}, got {value!r}")
        else:
            kwargs[name] = converted
    if len(kwargs) < len(values):
        return None
    try:
        return cls(**kwargs)
    except RecipeError as e:  # a rule between settings (none today) or a default gone bad
        problems += [f"{where} {name}: {why}" for name, why in e.problems]
        return None


def field_problems(obj: Any) -> list[tuple[str, str]]:
    """``(setting, reason)`` for every field of ``obj`` failing its type or range check."""
    hints = typing.get_type_hints(type(obj))
    out = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        _, why = _convert(value, hints[f.name])
        if why is None and value is not None and "check" in f.metadata:
            why = f.metadata["check"](value)
        if why:
            out.append((f.name, why))
    return out


def _convert(value: Any, hint: Any) -> tuple[Any, str | None]:
    """``value`` as the annotated type (TOML arrays become tuples, "none" None), or a reason."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or value == "none":
            return None, None
        inner = next(a for a in args if a is not type(None))
        converted, why = _convert(value, inner)
        return converted, (why + ' or "none"') if why else None
    if origin is Literal:
        return value, None if value in args else "must be one of " + ", ".join(map(repr, args))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return value, "must be a list"
        items = [_convert(v, args[0]) for v in value]
        if args[-1] is not Ellipsis and len(value) != len(args):
            return value, f"must be a list of {len(args)}"
        bad = [why for _, why in items if why]
        return tuple(v for v, _ in items), (f"list items {bad[0]}" if bad else None)
    if hint is bool:
        return value, None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value, None if ok else "must be an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (float(value) if ok else value), None if ok else "must be a number"
    if hint is str:
        return value, None if isinstance(value, str) else "must be a string"
    raise TypeError(f"unsupported setting type {hint}")  # a programming error, not bad input
