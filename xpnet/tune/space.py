"""Search spaces over a run's settings, and their grammar.

On the command line, one ``--space`` per setting::

    lr=loguniform(1e-4,1e-2)        a float, uniform in log space
    reg=uniform(0,0.5)              a float, uniform
    batch_size=int(50,400)          an integer, uniform (intlog(a,b): in log space)
    hidden_dims=choice(100,500,1000) one of the values (a size, or layers as 512x256)
    epochs=10                       a fixed value

In a JSON or YAML file, the same names: ``{"lr": {"loguniform": [1e-4, 1e-2]},
"hidden_dims": {"choice": [100, 500, 1000]}, "epochs": 10}``.

Unknown names, unknown kinds and impossible ranges are refused with a
:class:`SpaceError` (a ValueError) before anything runs. Parsing needs no Optuna.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace

from ..experiment import DATASETS, MODELS, NORMALIZATIONS, UPDATE_RULES, check_model_settings
from ..input_checks import check_flag, file_path, short_repr
from ..training.settings import SolverSettings

__all__ = [
    "SearchSpace",
    "Dimension",
    "SpaceError",
    "parse_space",
    "load_space_file",
    "check_run_setting",
    "check_experiment",
    "check_model_combinations",
    "SETTINGS",
]


class SpaceError(ValueError):
    """A search space that cannot be searched: the message names the setting and the problem."""


def _positive(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _non_negative(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _hidden_dims(v):
    """A hidden-layer list from 100 or "512x256"; None when the value is not one."""
    if _positive_int(v):
        return [v]
    if isinstance(v, str) and re.fullmatch(r"\d+(x\d+)*", v):
        dims = [int(d) for d in v.split("x")]
        return dims if all(d > 0 for d in dims) else None
    return None


# name -> (type, test of one value, what a valid value is)
SETTINGS = {
    "lr": ("float", _positive, "a finite number > 0"),
    "lr_decay": ("float", _positive, "a finite number > 0"),
    "reg": ("float", _non_negative, "a finite number >= 0"),
    "weight_scale": ("float", _positive, "a finite number > 0"),
    "dropout": ("float", lambda v: _non_negative(v) and v < 1, "a probability in [0, 1)"),
    "batch_size": ("int", _positive_int, "a positive integer"),
    "epochs": ("int", _positive_int, "a positive integer"),
    "num_filters": ("int", _positive_int, "a positive integer"),
    "filter_size": ("int", lambda v: _positive_int(v) and v % 2 == 1, "an odd positive integer"),
    "hidden_dims": ("dims", lambda v: _hidden_dims(v) is not None, "a layer size like 100, or sizes like 512x256"),
    "model": ("str", lambda v: v in MODELS, f"one of {', '.join(MODELS)}"),
    "normalization": ("str", lambda v: v in ("none", *NORMALIZATIONS), f"none or one of {', '.join(NORMALIZATIONS)}"),
    "update_rule": ("str", lambda v: v in UPDATE_RULES, f"one of {', '.join(UPDATE_RULES)}"),
}
KINDS = {
    "float": ("uniform", "loguniform", "choice", "fixed"),
    "int": ("int", "intlog", "choice", "fixed"),
    "dims": ("choice", "fixed"),
    "str": ("choice", "fixed"),
}


@dataclass(frozen=True)
class Dimension:
    """One searched setting: ``kind`` is uniform, loguniform, int, intlog, choice or fixed."""

    name: str
    kind: str
    values: tuple

    def suggest(self, trial):
        """The value an Optuna trial proposes for this setting."""
        if self.kind == "fixed":
            return self.values[0]
        if self.kind in ("uniform", "loguniform"):
            return trial.suggest_float(self.name, *self.values, log=self.kind == "loguniform")
        if self.kind in ("int", "intlog"):
            return trial.suggest_int(self.name, *self.values, log=self.kind == "intlog")
        return trial.suggest_categorical(self.name, list(self.values))


class SearchSpace:
    """Named dimensions; :meth:`suggest` turns a trial's proposals into run settings."""

    def __init__(self, dimensions: list):
        self.dimensions = {d.name: d for d in dimensions}

    def __repr__(self):
        return f"SearchSpace({list(self.dimensions.values())!r})"

    def describe(self) -> dict:
        """The space as JSON-ready data (the file form)."""
        return {
            d.name: (d.values[0] if d.kind == "fixed" else {d.kind: list(d.values)}) for d in self.dimensions.values()
        }

    @classmethod
    def from_description(cls, description: dict) -> SearchSpace:
        """The file form: {name: value or {kind: [values]}}; a string in the command line's
        grammar, like "loguniform(1e-4,1e-2)", is read as that distribution."""
        return cls([_dimension(name, _distribution(spec) or spec) for name, spec in description.items()])

    def suggest(self, trial) -> dict:
        """Settings for one run: {name: value} with hidden_dims as a list and normalization None for "none"."""
        return to_settings({name: d.suggest(trial) for name, d in self.dimensions.items()})

    def grid(self) -> dict:
        """{name: values} for Optuna's GridSampler; SpaceError unless every setting is a choice or fixed."""
        ranged = [d.name for d in self.dimensions.values() if d.kind not in ("choice", "fixed")]
        if ranged:
            raise SpaceError(
                f"--sampler grid needs choice(...) or a fixed value for every setting; {ranged} are ranges"
            )
        return {d.name: list(d.values) for d in self.dimensions.values()}


def to_settings(values: dict) -> dict:
    """Suggested values as run settings (hidden sizes as lists, "none" as None)."""
    settings = dict(values)
    if "hidden_dims" in settings:
        settings["hidden_dims"] = _hidden_dims(settings["hidden_dims"])
    if settings.get("normalization") == "none":
        settings["normalization"] = None
    return settings


def check_run_setting(name: str, value) -> None:
    """SpaceError unless ``value`` is a valid value of setting ``name`` in the form a run holds it
    (hidden sizes as a list, no normalization as None, which passes): a sweep's fixed settings."""
    if value is None:
        return
    if name == "hidden_dims" and isinstance(value, (list, tuple)) and value and all(_positive_int(v) for v in value):
        return
    _dimension(name, value)


def check_experiment(experiment, searched=()) -> None:
    """ValueError naming the first setting of ``experiment`` (an Experiment) that no run can
    take, other than those in ``searched``, which a sweep draws instead: every trial failed on
    such a setting, one by one, and a best model file holding one failed inside NumPy."""
    if experiment.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {short_repr(experiment.dataset)}; use one of {', '.join(DATASETS)}")
    if experiment.model not in MODELS:
        raise ValueError(f"unknown model {short_repr(experiment.model)}; use one of {', '.join(MODELS)}")
    if experiment.dataset != "cifar10" and (experiment.data_dir or experiment.num_train):
        raise ValueError("data_dir and num_train apply to the cifar10 dataset only")
    for name in ("download", "quiet", "cuda_graph"):  # a string is truthy: cuda_graph="False" asked for graphs
        check_flag(f"experiment.{name}", getattr(experiment, name))
    for name in SETTINGS:
        if name not in searched:
            try:
                check_run_setting(name, getattr(experiment, name))
            except SpaceError as error:
                raise ValueError(f"experiment.{error}") from None
    try:  # the Solver's own checks of what a run hands it beside these
        SolverSettings(print_every=experiment.print_every, seed=experiment.seed)
    except ValueError as error:
        raise ValueError(f"experiment.{error}") from None


def check_model_combinations(space: SearchSpace, experiment) -> None:
    """ValueError naming a model of the sweep (the space's choices, or the experiment's) that
    no hidden_dims and normalization of the sweep can build: every trial that drew it failed,
    one by one (a two-layer net given only 512x256, say)."""

    def options(name):
        dimension = space.dimensions.get(name)
        if dimension is None:
            return [getattr(experiment, name)]
        return [to_settings({name: value})[name] for value in dimension.values]

    for model in options("model"):
        errors = []
        for hidden_dims, normalization in itertools.product(options("hidden_dims"), options("normalization")):
            try:
                check_model_settings(SimpleNamespace(model=model, hidden_dims=hidden_dims, normalization=normalization))
                break
            except ValueError as error:
                errors.append(error)
        else:
            raise ValueError(
                f"model {model!r} cannot run with any hidden_dims and normalization of this sweep: {errors[0]}"
            )


def _number(text: str):
    text = text.strip().strip("'\"")
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _dimension(name: str, spec) -> Dimension:
    if name not in SETTINGS:
        raise SpaceError(f"unknown setting {name!r} in the search space; known: {', '.join(SETTINGS)}")
    kind_of_value, valid, meaning = SETTINGS[name]
    if isinstance(spec, dict):
        if len(spec) != 1:
            raise SpaceError(f'{name}: give one distribution, like {{"choice": [...]}}, got {short_repr(spec)}')
        ((kind, values),) = spec.items()
        values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    else:
        kind, values = "fixed", (spec,)
    if kind not in KINDS[kind_of_value]:
        raise SpaceError(f"{name}: {kind}(...) does not fit this setting; use one of {', '.join(KINDS[kind_of_value])}")
    if kind in ("uniform", "loguniform", "int", "intlog"):
        if len(values) != 2:
            raise SpaceError(f"{name}: {kind} takes two bounds, got {len(values)}: {short_repr(values)}")
        low, high = values
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise SpaceError(f"{name}: {kind} bounds must be finite numbers, got {short_repr(values)}")
        if kind in ("int", "intlog") and not all(isinstance(v, int) for v in values):
            raise SpaceError(f"{name}: {kind} bounds must be integers, got {short_repr(values)}")
        if not low < high:
            raise SpaceError(
                f"{name}: the range {kind}({low}, {high}) is empty; the low bound must be below the high one"
            )
        if kind in ("loguniform", "intlog") and low <= 0:
            raise SpaceError(f"{name}: {kind} needs bounds > 0, got {low}")
    if not values:
        raise SpaceError(f"{name}: {kind}() needs at least one value")
    for value in values:
        if not valid(value):
            raise SpaceError(f"{name}: {short_repr(value)} is not {meaning}")
    if kind in ("uniform", "loguniform", "int", "intlog"):
        values = tuple(float(v) for v in values) if kind_of_value == "float" else values
    return Dimension(name, kind, tuple(values))


_EXPRESSION = re.compile(r"^\s*(\w+)\s*=\s*(?:(\w+)\s*\((.*)\)|(.+?))\s*$")
_CALL = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$")
_DISTRIBUTIONS = frozenset(kind for kinds in KINDS.values() for kind in kinds if kind != "fixed")


def _call_spec(kind: str, arguments: str) -> dict:
    """{kind: [values]} of ``kind(arguments)`` as the command line writes it."""
    return {kind: [_number(a) for a in arguments.split(",") if a.strip()]}


def _distribution(spec):
    """{kind: [values]} for a string like "loguniform(1e-4,1e-2)" naming a distribution, else None."""
    match = _CALL.match(spec) if isinstance(spec, str) else None
    return _call_spec(*match.groups()) if match and match.group(1) in _DISTRIBUTIONS else None


def parse_space(expressions: list) -> SearchSpace:
    """A search space from ``--space`` expressions like ``lr=loguniform(1e-4,1e-2)`` (one
    expression alone may be given as a string)."""
    if isinstance(expressions, str):  # else read a character at a time: "cannot read --space 'l'"
        expressions = [expressions]
    if isinstance(expressions, Mapping):
        raise SpaceError(
            "parse_space takes --space expressions; a mapping is a space file's: SearchSpace.from_description"
        )
    if not isinstance(expressions, (list, tuple)):
        raise SpaceError(f"parse_space takes a list of --space expressions, got {type(expressions).__name__}")
    dimensions = {}
    for text in expressions:
        if not isinstance(text, str):  # a regular expression's "expected string or bytes-like object"
            raise SpaceError(f"cannot read --space {text!r}: write name=kind(values), e.g. lr=loguniform(1e-4,1e-2)")
        match = _EXPRESSION.match(text)
        if not match:
            raise SpaceError(f"cannot read --space {text!r}: write name=kind(values), e.g. lr=loguniform(1e-4,1e-2)")
        name, kind, arguments, fixed = match.groups()
        if name in dimensions:
            raise SpaceError(f"{name} is given twice in the search space")
        if kind is None:
            spec = _number(fixed)
        else:
            spec = _call_spec(kind, arguments)
        dimensions[name] = _dimension(name, spec)
    return SearchSpace(list(dimensions.values()))


# A search space is a few lines; reading stops past this, so /dev/zero or a data file given by
# mistake is refused at once rather than read into memory (a pipe such as /dev/stdin still works).
MAX_SPACE_FILE_CHARS = 1 << 20


def load_space_file(path) -> SearchSpace:
    """A search space from a JSON file, or a YAML one (``.yaml``/``.yml``, needs PyYAML)."""
    path = file_path("load_space_file", "path", path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_SPACE_FILE_CHARS + 1)
    except OSError as exc:
        raise SpaceError(f"cannot read the search space file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise SpaceError(f"{path} is not a search space file: it is not UTF-8 text ({exc.reason})") from exc
    if len(text) > MAX_SPACE_FILE_CHARS:
        raise SpaceError(f"{path} is not a search space file: it holds more than {MAX_SPACE_FILE_CHARS} characters")
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            description = yaml.safe_load(text)
        else:
            description = json.loads(text)
    except ImportError as exc:
        raise SpaceError(f"{path}: YAML files need PyYAML (pip install pyyaml), or write the space as JSON") from exc
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError's message
        raise SpaceError(f"{path} is not a valid search space file: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError does not derive from ValueError
        raise SpaceError(f"{path} is not a valid search space file: {exc}") from exc
    if not isinstance(description, dict):
        raise SpaceError(f"{path}: a search space is a mapping of setting names, got {type(description).__name__}")
    return SearchSpace.from_description(description)
