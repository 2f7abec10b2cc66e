"""The budget grammar: `flops=0.4`, `flops=0.4,params=0.3`, `weights=1.405%`.

A budget caps what fraction of the dense model a pruned model may keep, in four kinds (any may be
combined):
- `flops`: MACs of the *compacted* model, what runs on dense hardware (Torch-Pruning's, NNI's and
  NNCF's count); only pruning whole channels lowers it;
- `sparse_flops`: MACs of the nonzero weights (the papers' count for unstructured pruning);
- `params`: nonzero parameters, biases and BatchNorm included;
- `weights`: nonzero conv/linear weights only (the ADMM paper's 71.2x is weights=0.01405).
 It is parsed once, from user input, so every mistake becomes a one-line `UserError`; after
that it is a plain value that the search, the trials and the export all check the same way.
`violation` follows Optuna's constraint convention (<= 0 is feasible), so it can be handed to
`trial.set_constraint` as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import UserError
from .names import VAL_ACC

KEYS = ("flops", "sparse_flops", "params", "weights")  # canonical order of `str(budget)`
# the trial result field holding each kind's kept fraction (`flops_frac` is the compacted count)
FRACTION_KEYS = {"flops": "flops_frac", "sparse_flops": "sparse_flops_frac",
                 "params": "params_frac", "weights": "weights_frac"}
STRUCTURED_KEYS = ("flops",)  # kinds only whole-channel (structured) pruning can lower
# Fractions are ratios of integers computed in floating point: a model sitting exactly on its
# limit may land an ulp above it. `satisfied` forgives that much, never more.
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Budget:
    """Upper limits on kept fractions, e.g. {"flops": 0.4}: keep at most 40 % of the MACs."""

    limits: dict[str, float] = field(hash=False)

    def __hash__(self) -> int:  # a frozen value should be usable as a key despite its dict
        return hash(tuple(sorted(self.limits.items())))

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse 'key=value[,key=value]' (keys in `KEYS`), values in (0, 1] or (0, 100]%."""
        if not isinstance(text, str):
            raise UserError(f"a budget is a string like flops=0.4, got {type(text).__name__}")
        if not text.strip():
            raise UserError("empty budget: expected e.g. flops=0.4 or flops=0.4,params=0.3")
        limits: dict[str, float] = {}
        for item in text.split(","):
            key, sep, raw = item.partition("=")
            key, raw = key.strip().lower(), raw.strip()
            if not sep or not key or not raw:
                raise UserError(f"budget item {item.strip()!r} in {text.strip()!r} is not "
                                f"key=value (e.g. flops=0.4)")
            if key not in KEYS:
                raise UserError(f"unknown budget key {key!r}; use {', '.join(KEYS)}")
            if key in limits:
                raise UserError(f"budget key {key!r} given twice in {text.strip()!r}")
            limits[key] = _parse_value(key, raw)
        return cls({k: limits[k] for k in KEYS if k in limits})

    @property
    def structured(self) -> bool:
        """True when only whole-channel pruning can meet it (a `flops=` limit below 1)."""
        return any(self.limits.get(k, 1.0) < 1.0 for k in STRUCTURED_KEYS)

    def objectives(self, front: bool = False) -> tuple[tuple[str, str], ...]:
        """What the sampler optimises (trial result keys, Tune's "max"/"min").

        By default validation accuracy alone, with the budget as a constraint (`violation`):
        the user asked for the most accurate model within the budget. With several objectives
        Optuna's TPE takes its good trials from the non-dominated front, and a front of
        accuracy against size is mostly small, weaker trials: in the 71.2x runs of
        docs/benchmarks.md (eleventh) 5 of 7 sampled trials aimed below 0.9 of the budget.

        `front=True` adds the kept fraction of each budgeted kind, minimised, for a user who
        wants the whole trade-off explored. Only the budgeted kinds: under `weights=` a FLOPs
        axis made every filter-pruned trial a front point (eighth runs). The front the user
        sees keeps every kind either way (`pareto.front`); this is the sampler's view.
        """
        sizes = tuple((FRACTION_KEYS[k], "min") for k in self.limits) if front else ()
        return ((VAL_ACC, "max"),) + sizes

    def violation(self, fracs: dict[str, float]) -> float:
        """max over limited keys of (fraction - limit): <= 0 means the budget is met."""
        return max(float(fracs[k]) - v for k, v in self.limits.items())

    def satisfied(self, fracs: dict[str, float]) -> bool:
        return self.violation(fracs) <= TOLERANCE

    def __str__(self) -> str:
        # repr(float) is the shortest string that parses back to the same float: round-trips.
        return ",".join(f"{k}={self.limits[k]!r}" for k in KEYS if k in self.limits)


def _parse_value(key: str, raw: str) -> float:
    percent = raw.endswith("%")
    number = raw[:-1].strip() if percent else raw
    try:
        value = float(number)
    except ValueError:
        raise UserError(f"budget {key}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise UserError(f"budget {key}={raw!r} must be a finite number")
    if percent:
        value /= 100.0
    if not 0.0 < value <= 1.0:
        raise UserError(f"budget {key}={raw!r} must be a fraction in (0, 1] (or a percentage in "
                        f"(0, 100]%)")
    return value
