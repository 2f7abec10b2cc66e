"""Hyperparameter fields of the pruning methods: declaration, parsing, checking, stretching.

A method's `Params` dataclass declares each hyperparameter with `hp`: its paper default, the
valid range or choices, the range the built-in spaces search, and whether it is a *length* (an
epoch count of the method's own phase). Lengths are what a longer run of the same method
scales (`stretch_lengths`): a finalist retrained for four times a trial's epochs runs an AGP
ramp, an L0 or regularised phase, ADMM's W-steps four times as long, not only a longer
fine-tune (LeNet-5 on MNIST at 355.9x weights, 18 epochs, 3 seeds, `bench/phase_stretch.py`: a
2-epoch AGP ramp then 16 fine-tune epochs gives test 0.9692, an 8-epoch ramp then 10 0.9801).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..errors import UserError


def hp(default: Any, low: float | None = None, high: float | None = None,
       choices: tuple | None = None, doc: str = "", *,
       search: tuple[float, float] | None = None, log: bool = False,
       search_choices: tuple | None = None, length: bool = False) -> Any:
    """A hyperparameter field: default, the valid range (inclusive) or choices, and what to search.

    `search=(low, high)` (with `log=True` for a log-uniform range; integer for an int field) or
    `search_choices=(...)` declares the range the built-in search spaces sample; a field with
    neither is fixed at its (paper) default there. Search ranges must lie inside the valid range:
    the search space loader checks them like ranges written in a YAML file. `length=True`
    marks an epoch count of the method's own phase (see `stretch_lengths`).
    """
    if search is not None and search_choices is not None:
        raise ValueError("hp(): give search=(low, high) or search_choices=(...), not both")
    if log and search is None:
        raise ValueError("hp(): log=True needs search=(low, high)")
    return dataclasses.field(default=default, metadata={
        "low": low, "high": high, "choices": choices, "doc": doc, "search": search,
        "log": log, "search_choices": search_choices, "length": length})


def search_spec(f: dataclasses.Field) -> dict[str, Any] | None:
    """A field's declared search range as a search-space distribution mapping, or None."""
    m = f.metadata
    if m.get("search_choices") is not None:
        return {"choices": list(m["search_choices"])}
    if m.get("search") is not None:
        low, high = m["search"]
        spec: dict[str, Any] = {"low": low, "high": high}
        if m.get("log"):
            spec["log"] = True
        return spec
    return None


def field_type(f: dataclasses.Field) -> type:
    t = f.type if isinstance(f.type, type) else {"float": float, "int": int, "bool": bool,
                                                  "str": str}.get(str(f.type), str)
    return t


def convert(method: str, f: dataclasses.Field, raw: str) -> Any:
    t = field_type(f)
    try:
        if t is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        return t(float(raw)) if t is int and raw.replace(".", "", 1).isdigit() else t(raw)
    except ValueError:
        raise UserError(f"{method}.{f.name} expects {t.__name__}, got '{raw}'") from None


def check_value(method: str, f: dataclasses.Field, v: Any) -> Any:
    t = field_type(f)
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if t is int and isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, t) or (t is not bool and isinstance(v, bool)):
        raise UserError(f"{method}.{f.name} expects {t.__name__}, got {v!r}")
    m = f.metadata
    if m.get("choices") and v not in m["choices"]:
        raise UserError(f"{method}.{f.name} must be one of {list(m['choices'])}, got {v!r}")
    if isinstance(v, float) and not math.isfinite(v):
        raise UserError(f"{method}.{f.name} must be finite, got {v}")
    if m.get("low") is not None and v < m["low"] or m.get("high") is not None and v > m["high"]:
        raise UserError(f"{method}.{f.name} must be in [{m['low']}, {m['high']}], got {v}")
    return v


def stretch_lengths(params_cls: type, values: dict[str, Any], factor: float) -> dict[str, Any]:
    """`values` (hyperparameters of `params_cls`) with each length field, given or at its
    default, multiplied by `factor` and kept inside its valid range (an int field rounds)."""
    out = dict(values)
    for f in dataclasses.fields(params_cls):
        if not f.metadata.get("length"):
            continue
        v = float(out.get(f.name, f.default)) * factor
        low, high = f.metadata.get("low"), f.metadata.get("high")
        v = min(max(v, low if low is not None else v), high if high is not None else v)
        out[f.name] = round(v) if field_type(f) is int else v
    return out
