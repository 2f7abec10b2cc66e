"""The schema of a search-space file: distributions and the checks of every section.

`space.SearchSpace.from_dict` calls these; each problem is a one-line `UserError` naming the
file and key (`fail(key, message)`), so a typo fails when the file is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from ..engine import STUDY, Recipe
from ..errors import UserError
from ..pruning.hparams import field_type

DIST_KEYS = ("low", "high", "log", "int", "step", "choices")
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


def number(v: Any, key: str, fail) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise fail(key, f"must be a finite number, got {v!r}")
    return float(v)


def parse_dist(spec: Any, key: str, fail, int_field: bool = False) -> Dist:
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
    low = number(spec["low"], f"{key}.low", fail)
    high = number(spec["high"], f"{key}.high", fail)
    if low >= high:
        raise fail(key, f"low must be < high, got low={spec['low']} high={spec['high']}")
    for flag in ("log", "int"):
        if not isinstance(spec.get(flag, False), bool):
            raise fail(f"{key}.{flag}", f"must be true or false, got {spec[flag]!r}")
    log, is_int = spec.get("log", False), spec.get("int", False) or int_field
    step = spec.get("step")
    if step is not None:
        step = number(step, f"{key}.step", fail)
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


def parse_patterns(v: Any, key: str, fail) -> list[str]:
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
    return {f.name: field_type(f) for f in dataclasses.fields(params_cls)}


DECLARED = "declared"  # methods (or one method) taken from the methods' declared ranges


def parse_methods(m: Any, fail) -> dict[str, dict[str, Dist]]:
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
            dist = parse_dist(spec, hkey, fail, int_field=types[hp] is int)
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


def parse_finetune(f: Any, fail) -> dict[str, Dist]:
    f = f or {}
    if not isinstance(f, dict):
        raise fail("finetune", f"must be a mapping of recipe keys, got {f!r}")
    types = {fl.name: str(fl.type) for fl in dataclasses.fields(Recipe)}
    out: dict[str, Dist] = {}
    for k, spec in f.items():
        key = f"finetune.{k}"
        if k not in types:
            raise fail(key, f"unknown fine-tune recipe key; known: {', '.join(types)}")
        dist = parse_dist(spec, key, fail, int_field=types[k] == "int")
        for v in dist.probes():
            _check_recipe_value(k, types[k], v, key, fail)
        out[k] = dist
    return out


def _check_recipe_value(k: str, type_name: str, v: Any, key: str, fail) -> None:
    if isinstance(v, str) and v == STUDY:  # the study's own setting, whatever it is
        return
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
