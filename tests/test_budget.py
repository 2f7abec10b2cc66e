"""The budget grammar: what parses, what is refused (with which message), and the checks."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoprune.budget import KEYS, Budget
from autoprune.errors import UserError


@pytest.mark.parametrize("text, limits", [
    ("flops=0.4", {"flops": 0.4}),
    ("params=0.014", {"params": 0.014}),
    ("flops=0.4,params=0.3", {"flops": 0.4, "params": 0.3}),
    ("params=0.3,flops=0.4", {"flops": 0.4, "params": 0.3}),
    ("  flops = 0.4 ,  params=0.3  ", {"flops": 0.4, "params": 0.3}),
    ("FLOPS=0.5", {"flops": 0.5}),
    ("flops=40%", {"flops": 0.4}),
    ("params=1.4 %", {"params": 0.014}),
    ("flops=1", {"flops": 1.0}),
    ("flops=100%", {"flops": 1.0}),
    ("flops=1e-3", {"flops": 0.001}),
    ("weights=1.405%", {"weights": 0.01405}),
    ("weights=0.00281,sparse_flops=0.05", {"sparse_flops": 0.05, "weights": 0.00281}),
    ("params=0.3,weights=0.2,sparse_flops=0.5,flops=0.6",
     {"flops": 0.6, "sparse_flops": 0.5, "params": 0.3, "weights": 0.2}),
])
def test_parse_valid(text, limits):
    b = Budget.parse(text)
    assert b.limits == pytest.approx(limits, rel=1e-15)
    assert list(b.limits) == [k for k in KEYS if k in limits]  # canonical order


def test_only_a_flops_limit_asks_for_structured_pruning():
    assert Budget.parse("flops=0.4").structured
    assert Budget.parse("flops=0.4,params=0.1").structured
    assert not Budget.parse("sparse_flops=0.4,weights=0.01").structured
    assert not Budget.parse("flops=1,params=0.1").structured


@pytest.mark.parametrize("text, fragment", [
    ("", "empty budget"),
    ("   ", "empty budget"),
    ("flops", "not key=value"),
    ("flops=", "not key=value"),
    ("=0.4", "not key=value"),
    ("flops=0.4,", "not key=value"),
    ("flops=0.4;params=0.3", "is not a number"),
    ("latency=0.4", "unknown budget key 'latency'"),
    ("flops=0.4,flops=0.5", "given twice"),
    ("flops=0.4,FLOPS=0.5", "given twice"),
    ("flops=abc", "is not a number"),
    ("flops=0", "must be a fraction in (0, 1]"),
    ("flops=-0.1", "must be a fraction in (0, 1]"),
    ("flops=1.5", "must be a fraction in (0, 1]"),
    ("flops=40", "must be a fraction in (0, 1]"),
    ("flops=140%", "must be a fraction in (0, 1]"),
    ("flops=0%", "must be a fraction in (0, 1]"),
    ("flops=nan", "finite"),
    ("flops=inf", "finite"),
    ("params=-inf%", "finite"),
    ("flops=%", "is not a number"),
])
def test_parse_invalid(text, fragment):
    with pytest.raises(UserError) as info:
        Budget.parse(text)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg


def test_parse_rejects_non_string():
    with pytest.raises(UserError, match="string like flops=0.4"):
        Budget.parse(None)  # type: ignore[arg-type]


def test_canonical_string_round_trips():
    assert str(Budget.parse("params = 30% , flops=0.4")) == "flops=0.4,params=0.3"
    assert str(Budget.parse("params=0.014")) == "params=0.014"
    b = Budget.parse("flops=0.123456789012345")
    assert Budget.parse(str(b)) == b


def test_violation_and_satisfied():
    b = Budget.parse("flops=0.4,params=0.3")
    assert b.violation({"flops": 0.35, "params": 0.1}) == pytest.approx(-0.05)
    assert b.violation({"flops": 0.35, "params": 0.32}) == pytest.approx(0.02)
    assert b.violation({"flops": 0.5, "params": 0.32}) == pytest.approx(0.1)
    assert b.satisfied({"flops": 0.4, "params": 0.3})  # exactly on the limit is within
    assert not b.satisfied({"flops": 0.41, "params": 0.1})
    only_flops = Budget.parse("flops=0.4")
    assert only_flops.satisfied({"flops": 0.39, "params": 0.99})  # params unconstrained


def test_budget_is_a_value():
    a, b = Budget.parse("flops=0.4,params=0.3"), Budget.parse("params=0.3,flops=0.4")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1


# -- fuzz --------------------------------------------------------------------------------------
_pieces = st.sampled_from(["flops", "params", "FLOPS", "x", "=", ",", "%", " ", "0.4", "1",
                           "0", "-", "e", "nan", "inf", ".", "1e-3", "100", "\n"])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=30), st.lists(_pieces, max_size=10).map("".join)))
def test_parse_fuzz_only_user_errors_and_round_trip(text):
    try:
        b = Budget.parse(text)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert b.limits and set(b.limits) <= {"flops", "params"}
    assert all(0 < v <= 1 and math.isfinite(v) for v in b.limits.values())
    assert Budget.parse(str(b)) == b


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["flops", "params"]),
                       st.floats(min_value=1e-12, max_value=1.0), min_size=1))
def test_valid_budgets_round_trip(limits):
    b = Budget(dict(limits))
    again = Budget.parse(str(b))
    assert again.limits == b.limits
