"""Pareto front and hypervolume of search results (pure functions, no MLflow).

A point is a mapping that holds at least the objective keys (by default val_accuracy to maximise,
flops_frac and params_frac to minimise). Everything is converted to minimisation internally
(a maximised value v becomes -v), so one dominance rule serves all objective directions.

Why written here: Optuna 5 has an exact hypervolume only in its private `optuna._hypervolume`
module, and search fronts are small (tens to a few hundred trials), so a short exact algorithm
is fast enough and keeps us off private APIs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .names import FLOPS_FRAC, OBJECTIVES, PARAMS_FRAC, VAL_ACC, VAL_LOSS

Objectives = Sequence[tuple[str, str]]

# Reference point of the hypervolume: the worst model worth counting (accuracy 0, and the dense
# model's cost). Every front point then spans a box up to it, so HV lies in [0, 1] for accuracies
# and fractions in [0, 1].
DEFAULT_REF: dict[str, float] = {VAL_ACC: 0.0, FLOPS_FRAC: 1.0, PARAMS_FRAC: 1.0}


def _sign(mode: str) -> float:
    if mode == "min":
        return 1.0
    if mode == "max":
        return -1.0
    raise ValueError(f"objective mode must be 'min' or 'max', not {mode!r}")


def _value(point: Mapping[str, Any], key: str) -> float:
    """The objective as a float; NaN when missing or not a number (such points rank nowhere)."""
    v = point.get(key)
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return f


def _matrix(points: Sequence[Mapping[str, Any]], objectives: Objectives) -> np.ndarray:
    """n x d array of objective values, all to be minimised."""
    signs = np.array([_sign(m) for _, m in objectives])
    raw = np.array([[_value(p, k) for k, _ in objectives] for p in points], dtype=float)
    return raw.reshape(len(points), len(objectives)) * signs


def _loss(point: Mapping[str, Any]) -> float:
    """The validation loss, +inf where unknown (a record from before it was kept)."""
    v = _value(point, VAL_LOSS)
    return math.inf if math.isnan(v) else v


def _ranked(points: Sequence[Mapping[str, Any]], objectives: Objectives) -> np.ndarray:
    """`_matrix` with accuracy ranked lexicographically: (accuracy, then lower val loss).

    Why: accuracy on a small validation set is coarse (digits: 144 images, one is 0.7 points),
    so models tie often; on a tie the smaller used to dominate, and the search named as best a
    model 2.5 test points worse than its equally scored, lower-loss sibling (docs/benchmarks.md,
    ninth runs). Ranks keep every order of accuracies that differ; only ties are split.
    """
    m = _matrix(points, objectives)
    cols = [i for i, (k, _) in enumerate(objectives) if k == VAL_ACC]
    if not cols:
        return m
    col = cols[0]
    keys = [(m[i, col], _loss(p)) for i, p in enumerate(points)]
    order = sorted({k for k in keys if not math.isnan(k[0])})
    rank = {k: float(r) for r, k in enumerate(order)}
    m[:, col] = [rank.get(k, math.nan) if not math.isnan(k[0]) else math.nan for k in keys]
    return m


def dominates(a: Mapping[str, Any], b: Mapping[str, Any],
              objectives: Objectives = OBJECTIVES) -> bool:
    """True if `a` is at least as good as `b` in every objective and better in one (equal
    accuracies: the lower validation loss is the better)."""
    m = _ranked([a, b], objectives)
    return bool(np.all(m[0] <= m[1]) and np.any(m[0] < m[1]))


def front(points: Sequence[Mapping[str, Any]], objectives: Objectives = OBJECTIVES) -> list[int]:
    """Indices (ascending) of the non-dominated points.

    Deterministic ties: among points with identical objective values only the first (lowest
    index) is on the front, so a re-logged duplicate trial never doubles a front entry. Points
    with a missing or NaN objective are never on the front. Every other point is then weakly
    dominated by a front point (dominated, or equal to an earlier front point).
    """
    return _nondominated(_ranked(points, objectives))


def _nondominated(m: np.ndarray) -> list[int]:
    """Row indices of `front` for an n x d minimisation matrix (NaN rows excluded)."""
    valid = np.flatnonzero(~np.isnan(m).any(axis=1))
    others = m[valid]
    out: list[int] = []
    for i in valid:
        le = np.all(others <= m[i], axis=1)
        if np.any(le & np.any(others < m[i], axis=1)):
            continue  # strictly dominated
        if valid[le & np.all(others == m[i], axis=1)][0] == i:  # first of its duplicates
            out.append(int(i))
    return out


def _hv_min(pts: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    """Exact hypervolume dominated by `pts` (minimisation, all strictly better than `ref`).

    2-D: a sweep over x. More dimensions: slice along the last objective; between two
    consecutive values of it the cross-section is the (d-1)-D volume of the points already
    passed. O(n^(d-1) log n), plenty for fronts of a few hundred points in 3-D.
    """
    if not pts:
        return 0.0
    d = len(ref)
    if d == 1:
        return ref[0] - min(p[0] for p in pts)
    if d == 2:
        total, y_best = 0.0, ref[1]
        for x, y in sorted(pts):
            if y < y_best:
                total += (ref[0] - x) * (y_best - y)
                y_best = y
        return total
    ordered = sorted(pts, key=lambda p: p[-1])
    total = 0.0
    for i, p in enumerate(ordered):
        upper = ordered[i + 1][-1] if i + 1 < len(ordered) else ref[-1]
        depth = upper - p[-1]
        if depth > 0:
            total += depth * _hv_min([q[:-1] for q in ordered[: i + 1]], ref[:-1])
    return total


def reference(ref: Mapping[str, float] | Sequence[float] | None,
              objectives: Objectives = OBJECTIVES) -> tuple[float, ...]:
    """The reference point as a tuple aligned with `objectives` (in their own directions)."""
    if ref is None:
        ref = DEFAULT_REF
    if isinstance(ref, Mapping):
        missing = [k for k, _ in objectives if k not in ref]
        if missing:
            raise ValueError(f"reference point lacks {missing}")
        return tuple(float(ref[k]) for k, _ in objectives)
    if len(ref) != len(objectives):
        raise ValueError(f"reference point has {len(ref)} values for {len(objectives)} objectives")
    return tuple(float(r) for r in ref)


def hypervolume(points: Sequence[Mapping[str, Any]],
                ref: Mapping[str, float] | Sequence[float] | None = None,
                objectives: Objectives = OBJECTIVES) -> float:
    """Exact volume of objective space dominated by `points` and bounded by `ref`.

    `ref` defaults to DEFAULT_REF (accuracy 0, flops_frac 1, params_frac 1): a single point
    (acc .9, flops .5, params .5) has HV 0.9 * 0.5 * 0.5. Points not strictly better than the
    reference in every objective, or with NaN objectives, add nothing.
    """
    r = np.array(reference(ref, objectives)) * np.array([_sign(m) for _, m in objectives])
    m = _matrix(points, objectives)
    keep = ~np.isnan(m).any(axis=1) & np.all(m < r, axis=1)
    m = m[keep]
    if len(m) == 0:
        return 0.0
    # Dominated points never change the volume: dropping them first keeps the recursion small.
    return float(_hv_min([tuple(m[i]) for i in _nondominated(m)], tuple(r)))


def feasible_front(points: Sequence[Mapping[str, Any]],
                   objectives: Objectives = OBJECTIVES) -> list[Mapping[str, Any]]:
    """The non-dominated points among the feasible ones (`feasible` missing counts as True),
    sorted by FLOPs fraction then accuracy: the search's front, computed once per search."""
    feasible = [p for p in points if p.get("feasible", True)]
    return sorted((feasible[i] for i in front(feasible, objectives)),
                  key=lambda p: (float(p[FLOPS_FRAC]), -float(p[VAL_ACC])))


def best(front_pts: Sequence[Mapping[str, Any]],
         retrained: str = "finalist") -> Mapping[str, Any] | None:
    """The point a search names best among the points of its front: the most accurate of
    those retrained at full length (`retrained` true) where any are, else of all; on a tie in
    accuracy the lower validation loss, then the smaller model (FLOPs, then parameters), then
    the earlier point.

    Why the retrained first: a finalist's accuracy comes after the full fine-tune, any other
    trial's after the short one, so comparing the two compares training lengths. The finalists
    are the top in-budget points by validation accuracy at search time; a trial that was not
    retrained reaches the front past them only on noise (on digits, 144 validation images: one
    image is 0.7 points), and naming it best would ship a briefly trained model in place of
    the one the finalist stage just retrained.
    """
    pool = [p for p in front_pts if p.get(retrained)] or list(front_pts)
    if not pool:
        return None
    return min(pool, key=lambda p: (-_value(p, VAL_ACC), _loss(p), _value(p, FLOPS_FRAC),
                                    _value(p, PARAMS_FRAC)))
