"""Pareto front and hypervolume: hand-made fronts, known boxes, and properties."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoprune.names import FLOPS_FRAC, PARAMS_FRAC, VAL_ACC, VAL_LOSS
from autoprune.pareto import DEFAULT_REF, best, dominates, front, hypervolume


def pt(acc: float, flops: float, params: float) -> dict:
    return {VAL_ACC: acc, FLOPS_FRAC: flops, PARAMS_FRAC: params}


def test_single_point_box():
    assert DEFAULT_REF == {VAL_ACC: 0.0, FLOPS_FRAC: 1.0, PARAMS_FRAC: 1.0}
    assert hypervolume([pt(0.9, 0.5, 0.5)]) == pytest.approx(0.9 * 0.5 * 0.5)
    assert hypervolume([]) == 0.0


def test_two_overlapping_boxes_inclusion_exclusion():
    a, b = pt(0.9, 0.5, 0.5), pt(0.95, 0.7, 0.4)
    union = 0.9 * 0.5 * 0.5 + 0.95 * 0.3 * 0.6 - 0.9 * 0.3 * 0.5
    assert hypervolume([a, b]) == pytest.approx(union)
    assert front([a, b]) == [0, 1]


def test_two_objective_staircase():
    objs = ((VAL_ACC, "max"), (FLOPS_FRAC, "min"))
    pts = [pt(0.5, 0.2, 1), pt(0.8, 0.5, 1), pt(0.9, 0.9, 1), pt(0.6, 0.6, 1)]
    # steps: [0.2,0.5)x0.5 + [0.5,0.9)x0.8 + [0.9,1)x0.9
    assert hypervolume(pts, objectives=objs) == pytest.approx(0.3 * 0.5 + 0.4 * 0.8 + 0.1 * 0.9)
    assert front(pts, objs) == [0, 1, 2]  # (0.6, 0.6) is dominated by (0.8, 0.5)


def test_custom_reference_and_points_outside_it():
    ref = {VAL_ACC: 0.5, FLOPS_FRAC: 0.8, PARAMS_FRAC: 1.0}
    assert hypervolume([pt(0.9, 0.5, 0.5)], ref=ref) == pytest.approx(0.4 * 0.3 * 0.5)
    # worse than the reference in flops: contributes nothing
    assert hypervolume([pt(0.99, 0.9, 0.1)], ref=ref) == 0.0
    assert hypervolume([pt(0.9, 0.5, 0.5)], ref=(0.5, 0.8, 1.0)) == pytest.approx(0.06)
    with pytest.raises(ValueError):
        hypervolume([pt(0.9, 0.5, 0.5)], ref=(0.5, 0.8))


def test_dominated_and_duplicate_points_excluded():
    pts = [
        pt(0.90, 0.5, 0.5),
        pt(0.85, 0.5, 0.5),  # dominated by 0 (lower accuracy)
        pt(0.90, 0.5, 0.5),  # duplicate of 0: only the first is kept
        pt(0.70, 0.2, 0.3),
        pt(0.70, 0.2, 0.4),  # dominated by 3 (more params)
        pt(0.95, 0.9, 0.9),
    ]
    assert front(pts) == [0, 3, 5]
    assert dominates(pts[0], pts[1]) and not dominates(pts[0], pts[2])
    assert not dominates(pts[0], pts[3]) and not dominates(pts[3], pts[0])


def test_missing_or_nan_objectives_never_on_front():
    pts = [pt(0.9, 0.5, 0.5), {VAL_ACC: 0.99, FLOPS_FRAC: 0.1}, pt(math.nan, 0.1, 0.1),
           {VAL_ACC: None, FLOPS_FRAC: 0.1, PARAMS_FRAC: 0.1}]
    assert front(pts) == [0]
    assert hypervolume(pts) == pytest.approx(0.225)


def test_best_prefers_the_retrained_finalists_over_a_short_trial():
    """The digits main job once named best a trial that was never retrained (val 0.9861 after
    its short fine-tune), over the finalist the stage had just retrained (val 0.9792, one
    validation image fewer, test 0.9861 against the trial's 0.9833): best is the most accurate
    finalist of the front, and only a front without finalists falls back to all of it."""
    short = {**pt(0.9861, 0.39, 0.40), "trial": 0, "finalist": False}
    final = {**pt(0.9792, 0.30, 0.30), "trial": 10, "finalist": True}
    other = {**pt(0.9700, 0.20, 0.20), "trial": 11, "finalist": True}
    assert best([short, final, other])["trial"] == 10
    assert best([short, {**final, "finalist": False}])["trial"] == 0
    # a tie in accuracy goes to the smaller model, then to the earlier point
    a, b = pt(0.95, 0.3, 0.3), pt(0.95, 0.2, 0.3)
    assert best([a, b]) is b and best([a, dict(a)]) is a
    assert best([]) is None


def test_equal_accuracy_is_decided_by_validation_loss():
    """Digits flops=0.4, seed 2 (ninth runs): two finalists scored val 0.9861 (142 of 144); the
    smaller was named best and tested 0.958, the other (val loss 0.038 against 0.071) 0.983.
    On equal accuracy the lower loss now ranks first, on the front and for best; a higher
    accuracy still wins whatever its loss, and hypervolume reads the accuracies alone."""
    small = {**pt(0.9861, 0.23, 0.11), VAL_LOSS: 0.071, "trial": 8}
    large = {**pt(0.9861, 0.26, 0.10), VAL_LOSS: 0.038, "trial": 12}
    worse = {**pt(0.9792, 0.20, 0.10), VAL_LOSS: 0.010, "trial": 13}
    assert front([small, large, worse]) == [0, 1, 2]  # small no longer dominates large
    assert dominates(large, {**large, VAL_LOSS: 0.05}) and not dominates(worse, large)
    assert best([small, large, worse])["trial"] == 12
    assert best([small, {**large, VAL_LOSS: None}])["trial"] == 8  # unknown loss: not preferred
    assert hypervolume([small, large]) == hypervolume([{**small, VAL_LOSS: 9}, large])


def test_bad_mode_rejected():
    with pytest.raises(ValueError):
        front([pt(1, 1, 1)], ((VAL_ACC, "up"),))


# ---- properties ------------------------------------------------------------------------------

unit = st.floats(0.0, 1.0, allow_nan=False)
# a coarse grid makes ties and duplicates frequent
grid = st.integers(0, 4).map(lambda i: i / 4)
points = st.lists(st.builds(pt, st.one_of(unit, grid), st.one_of(unit, grid),
                            st.one_of(unit, grid)), max_size=12)


def _hv_inclusion_exclusion(pts: list[dict]) -> float:
    """Independent oracle: union of boxes [p, ref] by inclusion-exclusion (small n only)."""
    boxes = [(p[VAL_ACC], 1 - p[FLOPS_FRAC], 1 - p[PARAMS_FRAC]) for p in pts]  # side lengths
    total = 0.0
    for r in range(1, len(boxes) + 1):
        for sub in itertools.combinations(boxes, r):
            total += (-1) ** (r + 1) * math.prod(min(b[k] for b in sub) for k in range(3))
    return total


@settings(max_examples=200, deadline=None)
@given(points)
def test_every_non_front_point_weakly_dominated_by_a_front_point(pts):
    f = front(pts)
    assert f == sorted(set(f))
    on = [pts[i] for i in f]
    for i, p in enumerate(pts):
        if i in f:
            assert not any(dominates(q, p) for q in pts)
        else:
            assert any(dominates(q, p) or q == p for q in on)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.builds(pt, unit, unit, unit), max_size=6))
def test_hypervolume_matches_inclusion_exclusion(pts):
    assert hypervolume(pts) == pytest.approx(_hv_inclusion_exclusion(pts), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(points, st.data())
def test_adding_a_dominated_point_keeps_hypervolume(pts, data):
    if not pts:
        return
    base = data.draw(st.sampled_from(pts))
    worse = pt(base[VAL_ACC] * data.draw(unit), base[FLOPS_FRAC] + (1 - base[FLOPS_FRAC])
               * data.draw(unit), base[PARAMS_FRAC] + (1 - base[PARAMS_FRAC]) * data.draw(unit))
    before = hypervolume(pts)
    assert hypervolume(pts + [worse]) == pytest.approx(before, abs=1e-12)
    # and the front alone carries all of it
    assert hypervolume([pts[i] for i in front(pts)]) == pytest.approx(before, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(points, st.builds(pt, unit, unit, unit))
def test_hypervolume_monotone(pts, extra):
    assert hypervolume(pts + [extra]) >= hypervolume(pts) - 1e-12
