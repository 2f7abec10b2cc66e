"""Reading YAML files: safe loading, YAML 1.2 numbers, one-line errors.

PyYAML implements YAML 1.1, where `1e-3` and `1.0e6` are strings (a float there needs a dot
and a signed exponent). Every study and search space writes learning rates and rho that way,
so this loader resolves numbers as YAML 1.2 (and JSON, and Python) do. It is a `SafeLoader`
subclass: no Python objects are ever constructed from a file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


class _Loader(yaml.SafeLoader):
    """SafeLoader whose float resolver follows YAML 1.2's core schema."""


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
                       |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                       |[-+]?\.(?:inf|Inf|INF)
                       |\.(?:nan|NaN|NAN))$""", re.X)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers
                                   .items()}
for _first in list(_Loader.yaml_implicit_resolvers):
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, rx) for tag, rx in _Loader.yaml_implicit_resolvers[_first]
        if tag != "tag:yaml.org,2002:float"]
# Integers keep their own (earlier) resolver: only text that is not an int becomes a float.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def loads(text: str, source: str = "<yaml>") -> Any:
    """Parse YAML text; a syntax error is a one-line `UserError` naming `source` and the line."""
    loader = _Loader(text)  # what yaml.load does, with our SafeLoader subclass
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise UserError(f"{source}: not valid YAML{where}: {problem}") from None
    finally:
        loader.dispose()


def load(path: str | Path, what: str = "file") -> Any:
    """Read and parse a YAML file; unreadable files are one-line `UserError`s too."""
    p = Path(path)
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a text file (expected a YAML {what})") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    return loads(text, str(p))
