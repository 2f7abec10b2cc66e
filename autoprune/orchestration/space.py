"""Declarative search spaces (`search_spaces/*.yaml`) -> a define-by-run function for Optuna.

A space says which pruning methods compete, which of their hyperparameters are searched and
over what ranges, which fine-tune settings are searched, and how per-layer sparsity is
parametrised:

    methods:      declared | {method: declared | {[declared: true,] hyperparameter: spec}}
    finetune:     {recipe key: distribution | fixed value}
    sparsity:     {target_floor, allocation, prior, max_sparsity, exclude, groups}

Each method declares its own search ranges next to its hyperparameters (`hp(search=...)` in
its file), so this module never names a method. `methods: declared` is every registered
method with its declared ranges (the built-in spaces); `method: declared` picks one method that
way, and `{declared: true, ...}` starts from the declared ranges and overrides the listed
hyperparameters. A plain mapping lists exactly what is searched: unlisted hyperparameters keep
the paper defaults of the method's `Params`.

A distribution is `{low, high}` (optionally `log: true`, `int: true`, `step`) or
`{choices: [...]}`; any other value is fixed. Everything is checked when the file is loaded,
against the method registry and each method's own hyperparameter ranges (declared ranges
included), so a typo fails in a second with the file and key named, not hours later inside a
Ray worker.

The space is *conditional*: `suggest` samples the method first and only that method's
hyperparameters (named `<method>.<hp>`), so samplers never see parameters that did not matter.
`decode` turns the flat config Ray hands a trial back into a typed `TrialPlan`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import yamlio
from ..engine import Recipe
from ..errors import UserError

TOP_KEYS = ("methods", "finetune", "sparsity", "description")
SPARSITY_KEYS = ("target_floor", "allocation", "prior", "max_sparsity", "exclude", "groups")
PRIORS = ("size", "none")  # what the sampled allocation is an offset from (projection.py)
DIST_KEYS = ("low", "high", "log", "int", "step", "choices")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")  # no '/': Ray un-flattens config keys on it
_TYPES = {"float": float, "int": int, "bool": bool, "str": str}


@dataclass(frozen=True)
class Dist:
    """One searched (or fixed) value: float/int range, categorical, or a constant."""

    kind: str  # "float" | "int" | "categorical" | "fixed"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    value: Any = None

    @property
    def fixed(self) -> bool:
        return self.kind == "fixed"

    def suggest(self, trial: Any, name: str) -> Any:
        """Ask `trial` (an optuna.Trial, or Ray's wrapper of one) for this value under `name`."""
        if self.kind == "float":
            return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        return self.value

    def probes(self) -> list[Any]:
        """Values whose validity implies that of every sample (range ends, every choice)."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "fixed":
            return [self.value]
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]


@dataclass(frozen=True)
class TrialPlan:
    """What one trial runs, decoded from its sampled config."""

    method: str
    params: dict[str, Any]  # typed hyperparameters of `method` (searched and fixed ones)
    finetune: dict[str, Any]  # overrides of the study's fine-tune recipe
    target: float  # fraction of the budget aimed at, in (0, 1]
    allocation: dict[str, float]  # per prunable layer, groups expanded
    prunable: list[str]  # layers left after the space's exclusions, in model order


@dataclass(frozen=True)
class SearchSpace:
    methods: dict[str, dict[str, Dist]]
    finetune: dict[str, Dist] = field(default_factory=dict)
    target_floor: float = 0.6
    allocation: Dist = Dist("float", 0.05, 0.95)
    prior: str = "size"  # the allocation moves around projection.size_prior, or "none"
    max_sparsity: float = 0.99
    exclude: tuple[str, ...] = ()
    groups: dict[str, str] = field(default_factory=dict)  # group name -> regex on layer names
    source: str = "<search space>"

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        p = Path(path)
        d = yamlio.load(p, "search space")
        return cls.from_dict(d, source=str(p))

    @classmethod
    def from_dict(cls, d: Any, source: str = "<search space>") -> SearchSpace:
        """Validate a parsed space; every problem is a one-line `UserError` naming the key."""
        def fail(key: str, msg: str) -> UserError:
            return UserError(f"{source}: {key}: {msg}")

        if not isinstance(d, dict):
            raise UserError(f"{source}: a search space must be a mapping with a 'methods' key, "
                            f"got {type(d).__name__}")
        unknown = [k for k in d if k not in TOP_KEYS]
        if unknown:
            raise fail(str(unknown[0]), f"unknown top-level key; allowed: {', '.join(TOP_KEYS)}")
        methods = _parse_methods(d.get("methods"), fail)
        finetune = _parse_finetune(d.get("finetune"), fail)
        sp = d.get("sparsity") or {}
        if not isinstance(sp, dict):
            raise fail("sparsity", f"must be a mapping, got {type(sp).__name__}")
        bad = [k for k in sp if k not in SPARSITY_KEYS]
        if bad:
            raise fail(f"sparsity.{bad[0]}", f"unknown key; allowed: {', '.join(SPARSITY_KEYS)}")
        floor = _number(sp.get("target_floor", 0.6), "sparsity.target_floor", fail)
        if not 0.0 < floor <= 1.0:
            raise fail("sparsity.target_floor", f"must be in (0, 1], got {floor}")
        max_s = _number(sp.get("max_sparsity", 0.99), "sparsity.max_sparsity", fail)
        if not 0.0 < max_s < 1.0:
            raise fail("sparsity.max_sparsity", f"must be in (0, 1), got {max_s}")
        alloc = _parse_dist(sp.get("allocation", {"low": 0.05, "high": 0.95}),
                            "sparsity.allocation", fail)
        if alloc.kind not in ("float", "fixed"):
            raise fail("sparsity.allocation", "must be {low, high} or a fixed number")
        for v in alloc.probes():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise fail("sparsity.allocation", f"values must lie in (0, 1), got {v!r}")
        prior = sp.get("prior", "size")
        if prior not in PRIORS:
            raise fail("sparsity.prior", f"must be one of {', '.join(PRIORS)}, got {prior!r}")
        exclude = _parse_patterns(sp.get("exclude", []), "sparsity.exclude", fail)
        groups_raw = sp.get("groups") or {}
        if not isinstance(groups_raw, dict):
            raise fail("sparsity.groups", "must be a mapping of group name -> regex")
        groups: dict[str, str] = {}
        for name, pattern in groups_raw.items():
            if not isinstance(name, str) or not _GROUP_NAME.match(name):
                raise fail(f"sparsity.groups.{name}", "group names use letters, digits, _ . -")
            groups[name] = _parse_patterns([pattern], f"sparsity.groups.{name}", fail)[0]
        return cls(methods=methods, finetune=finetune, target_floor=float(floor),
                   allocation=alloc, prior=prior, max_sparsity=float(max_s),
                   exclude=tuple(exclude),
                   groups=groups, source=source)

    # -- layers -------------------------------------------------------------------------------
    def prunable(self, layers: list[str]) -> list[str]:
        """`layers` minus those matching an `exclude` pattern; refuses to exclude them all."""
        kept = [n for n in layers if not any(re.search(p, n) for p in self.exclude)]
        if layers and not kept:
            raise UserError(f"{self.source}: sparsity.exclude: the patterns exclude every "
                            f"prunable layer of the model ({', '.join(layers)})")
        return kept

    def alloc_keys(self, layers: list[str]) -> dict[str, list[str]]:
        """Allocation parameter -> the layers it drives (first matching group wins)."""
        keys: dict[str, list[str]] = {}
        for n in self.prunable(layers):
            group = next((g for g, p in self.groups.items() if re.search(p, n)), None)
            keys.setdefault(group if group is not None else n, []).append(n)
        for key, members in keys.items():
            if key in self.groups and key in layers and members != [key]:
                raise UserError(f"{self.source}: sparsity.groups.{key}: a group may not be "
                                f"named like a layer of the model")
        return keys

    # -- Optuna -------------------------------------------------------------------------------
    def suggest(self, trial: Any, layers: list[str]) -> dict[str, Any]:
        """Define-by-run space: sample a method, then only its hyperparameters.

        Returns the fixed values (method hyperparameters, fine-tune settings, target) as
        constants: Ray merges them into the trial's config, so a config is self-describing,
        and Optuna's sampler never sees them.
        """
        keys = self.alloc_keys(layers)  # validates the exclusions before anything is sampled
        const: dict[str, Any] = {}
        method = trial.suggest_categorical("method", list(self.methods))
        for hp, dist in self.methods[method].items():
            name = f"{method}.{hp}"
            if dist.fixed:
                const[name] = dist.value
            else:
                dist.suggest(trial, name)
        for key, dist in self.finetune.items():
            name = f"finetune.{key}"
            if dist.fixed:
                const[name] = dist.value
            else:
                dist.suggest(trial, name)
        if self.target_floor < 1.0:
            trial.suggest_float("target", self.target_floor, 1.0)
        else:
            const["target"] = 1.0
        if not self.allocation.fixed:
            for key in keys:
                self.allocation.suggest(trial, f"alloc.{key}")
        return const

    def define_by_run(self, layers: list[str]) -> Callable[[Any], dict[str, Any]]:
        """`suggest` bound to a model's layers, as `OptunaSearch(space=...)` wants it.

        Unlike a lambda it pickles, which Ray needs: Tune saves the searcher's state
        (including its `space`) to the experiment folder.
        """
        return functools.partial(self.suggest, layers=list(layers))

    def decode(self, config: dict[str, Any], layers: list[str]) -> TrialPlan:
        """The typed plan of a config produced by `suggest` (extra keys are ignored)."""
        from ..pruning import get_method

        def get(name: str, dist: Dist) -> Any:
            if dist.fixed:
                return dist.value
            if name not in config:
                raise UserError(f"trial config lacks '{name}': was it sampled from "
                                f"{self.source}? (the space changed since, or a resume mixes "
                                f"spaces)")
            return config[name]

        keys = self.alloc_keys(layers)  # validates the exclusions first
        method = config.get("method")
        if method not in self.methods:
            raise UserError(f"trial config method {method!r} is not in {self.source} "
                            f"(methods: {', '.join(self.methods)})")
        raw = {hp: get(f"{method}.{hp}", d) for hp, d in self.methods[method].items()}
        typed = get_method(method).make_params(**dict(raw))
        params = {hp: getattr(typed, hp) for hp in raw}
        finetune = {k: get(f"finetune.{k}", d) for k, d in self.finetune.items()}
        target = float(get("target", Dist("float"))) if self.target_floor < 1.0 else 1.0
        allocation: dict[str, float] = {}
        for key, members in keys.items():
            value = float(get(f"alloc.{key}", self.allocation))
            allocation.update(dict.fromkeys(members, value))
        return TrialPlan(method=method, params=params, finetune=finetune, target=target,
                         allocation=allocation, prunable=self.prunable(layers))


# -- validation helpers ----------------------------------------------------------------------
def _number(v: Any, key: str, fail) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise fail(key, f"must be a finite number, got {v!r}")
    return float(v)


def _parse_dist(spec: Any, key: str, fail, int_field: bool = False) -> Dist:
    """A mapping is a distribution, anything else a fixed value."""
    if not isinstance(spec, dict):
        return Dist("fixed", value=spec)
    bad = [k for k in spec if k not in DIST_KEYS]
    if bad:
        raise fail(key, f"unknown distribution key '{bad[0]}'; use low/high (with log, int, "
                        f"step) or choices")
    if "choices" in spec:
        if len(spec) > 1:
            raise fail(key, "'choices' cannot be combined with low/high/log/int/step")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise fail(key, "choices must be a non-empty list")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise fail(key, f"choices must be plain values, got {c!r}")
        if len({repr(c) for c in choices}) != len(choices):
            raise fail(key, "choices contain duplicates")
        return Dist("categorical", choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise fail(key, "a range needs both low and high")
    low = _number(spec["low"], f"{key}.low", fail)
    high = _number(spec["high"], f"{key}.high", fail)
    if low >= high:
        raise fail(key, f"low must be < high, got low={spec['low']} high={spec['high']}")
    for flag in ("log", "int"):
        if not isinstance(spec.get(flag, False), bool):
            raise fail(f"{key}.{flag}", f"must be true or false, got {spec[flag]!r}")
    log, is_int = spec.get("log", False), spec.get("int", False) or int_field
    step = spec.get("step")
    if step is not None:
        step = _number(step, f"{key}.step", fail)
        if step <= 0:
            raise fail(f"{key}.step", f"must be > 0, got {step}")
        if log:
            raise fail(key, "step cannot be combined with log: true")
    if log and low <= 0:
        raise fail(key, f"a log range needs low > 0, got {spec['low']}")
    if is_int:
        if not (low.is_integer() and high.is_integer() and (step is None or step.is_integer())):
            raise fail(key, f"an integer range needs integer low/high/step, got "
                            f"low={spec['low']} high={spec['high']}")
        return Dist("int", low, high, log, step)
    return Dist("float", low, high, log, step)


def _parse_patterns(v: Any, key: str, fail) -> list[str]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list):
        raise fail(key, "must be a regex or a list of regexes")
    for p in items:
        if not isinstance(p, str) or not p:
            raise fail(key, f"must be non-empty regex strings, got {p!r}")
        try:
            re.compile(p)
        except re.error as exc:
            raise fail(key, f"invalid regex {p!r}: {exc}") from None
    return list(items)


def _field_types(params_cls: type) -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else _TYPES.get(str(f.type), object)
            for f in dataclasses.fields(params_cls)}


DECLARED = "declared"  # methods (or one method) taken from the methods' declared ranges


def _parse_methods(m: Any, fail) -> dict[str, dict[str, Dist]]:
    from ..pruning import get_method, load_all

    if m == DECLARED:
        m = dict.fromkeys(sorted(load_all()), DECLARED)
    if not isinstance(m, dict) or not m:
        raise fail("methods", f"must be a non-empty mapping of method -> hyperparameters, or "
                              f"'{DECLARED}' for every method with its declared ranges")
    out: dict[str, dict[str, Dist]] = {}
    for name, hps in m.items():
        key = f"methods.{name}"
        if not isinstance(name, str):
            raise fail(key, "method names are strings")
        try:
            cls = get_method(name)
        except UserError as exc:
            raise fail(key, str(exc)) from None
        hps = _with_declared(cls, hps, key, fail)
        types = _field_types(cls.Params)
        dists: dict[str, Dist] = {}
        for hp, spec in hps.items():
            hkey = f"{key}.{hp}"
            if hp not in types:
                raise fail(hkey, f"method '{name}' has no hyperparameter '{hp}'; known: "
                                 f"{', '.join(types)}")
            dist = _parse_dist(spec, hkey, fail, int_field=types[hp] is int)
            if dist.kind == "float" and types[hp] is not float:
                raise fail(hkey, f"a float range for a {types[hp].__name__} hyperparameter; "
                                 f"use choices or a fixed value")
            for v in dist.probes():
                try:
                    cls.make_params(**{hp: v})
                except UserError as exc:
                    raise fail(hkey, str(exc)) from None
            dists[hp] = dist
        out[name] = dists
    return out


def _with_declared(cls: Any, hps: Any, key: str, fail) -> dict[str, Any]:
    """A method's entry as {hp: spec}: `declared` and `declared: true` merge its own ranges."""
    if hps == DECLARED:
        return cls.search_space()
    hps = hps or {}
    if not isinstance(hps, dict):
        raise fail(key, f"must map hyperparameters to distributions (or be '{DECLARED}'), "
                        f"got {hps!r}")
    if DECLARED not in hps:
        return hps
    flag = hps[DECLARED]
    if not isinstance(flag, bool):
        raise fail(f"{key}.{DECLARED}", f"must be true or false, got {flag!r}")
    rest = {k: v for k, v in hps.items() if k != DECLARED}
    return {**cls.search_space(), **rest} if flag else rest


def _parse_finetune(f: Any, fail) -> dict[str, Dist]:
    f = f or {}
    if not isinstance(f, dict):
        raise fail("finetune", f"must be a mapping of recipe keys, got {f!r}")
    types = {fl.name: str(fl.type) for fl in dataclasses.fields(Recipe)}
    out: dict[str, Dist] = {}
    for k, spec in f.items():
        key = f"finetune.{k}"
        if k not in types:
            raise fail(key, f"unknown fine-tune recipe key; known: {', '.join(types)}")
        dist = _parse_dist(spec, key, fail, int_field=types[k] == "int")
        for v in dist.probes():
            _check_recipe_value(k, types[k], v, key, fail)
        out[k] = dist
    return out


def _check_recipe_value(k: str, type_name: str, v: Any, key: str, fail) -> None:
    expected = _TYPES.get(type_name)
    ok = (isinstance(v, expected) and not isinstance(v, bool) if expected in (int, str)
          else isinstance(v, (int, float)) and not isinstance(v, bool) if expected is float
          else isinstance(v, list))
    if not ok:
        raise fail(key, f"expects {type_name}, got {v!r}")
    try:
        Recipe(**{k: v})
    except UserError as exc:
        raise fail(key, str(exc)) from None
