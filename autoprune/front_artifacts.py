"""The tables and the plot of a search's front, as stored on its MLflow parent run (pure: no
MLflow here; tracking.Tracker logs what these functions return)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import pareto
from .names import FLOPS_FRAC, PARAMS_FRAC, TEST_ACC, VAL_ACC

# The four kept fractions of a budget kind (keys of a trial's metrics): MACs of the compacted
# model, MACs of the nonzero weights, nonzero params (biases, BN included), nonzero weights.
FRACTIONS = (FLOPS_FRAC, "sparse_flops_frac", PARAMS_FRAC, "weights_frac")
# Columns of the front/trial tables, in this order.
POINT_COLUMNS = ("trial", "method", VAL_ACC, TEST_ACC, *FRACTIONS, "feasible", "run_id")
# Short metric names of every trial run, what a user compares in the runs table and charts
# (the UI groups metrics by the part before '/': an "acc" and a "frac" section).
SHORT_ACC = {"acc/val": VAL_ACC, "acc/test": TEST_ACC}
SHORT_FRAC = {"frac/flops": FLOPS_FRAC, "frac/sparse_flops": "sparse_flops_frac",
              "frac/params": PARAMS_FRAC, "frac/weights": "weights_frac"}
# The front on the parent run as a curve: accuracy at step = FLOPs fraction in permille, so the
# parent's chart of this metric is accuracy against FLOPs, nothing to download.
FRONT_CURVE = "front/val_acc_by_flops_permille"


def short_metrics(metrics: Mapping[str, Any], dense_val: float | None = None,
                  dense_test: float | None = None) -> dict[str, float]:
    """The short-named metrics of a trial: accuracies, drop vs dense, the four fractions
    (read with .get(): a record without one of them still gives the others)."""
    out: dict[str, float] = {}
    for short, key in (*SHORT_ACC.items(), *SHORT_FRAC.items()):
        if (x := number(metrics.get(key))) is not None:
            out[short] = x
    dense_val = number(metrics.get("dense_val_accuracy", dense_val))
    dense_test = number(metrics.get("dense_test_accuracy", dense_test))
    if dense_val is not None and "acc/val" in out:
        out["acc/drop_val"] = dense_val - out["acc/val"]
    if dense_test is not None and "acc/test" in out:
        out["acc/drop_test"] = dense_test - out["acc/test"]
    return out


def run_name(trial: int, method: str, metrics: Mapping[str, Any] | None = None) -> str:
    """`t7 admm/filter val 0.981 flops 0.38`: method and result at first sight in the table."""
    metrics = metrics or {}
    gran = metrics.get("granularity")
    name = f"t{trial} {method}" + (f"/{gran}" if isinstance(gran, str) and gran else "")
    if (val := number(metrics.get(VAL_ACC))) is not None:
        name += f" val {val:.3f}"
    if (flops := number(metrics.get(FLOPS_FRAC))) is not None:
        name += f" flops {flops:.2f}"
    return name


def front_curve(front_pts: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """The front as FRONT_CURVE points (step: FLOPs fraction in permille, value: validation
    accuracy); of two points at one step the more accurate stays (a chart draws one a step)."""
    best: dict[int, float] = {}
    for p in front_pts:
        val, flops = number(p.get(VAL_ACC)), number(p.get(FLOPS_FRAC))
        if val is not None and flops is not None:
            step = int(round(flops * 1000))
            best[step] = max(val, best.get(step, val))
    return sorted(best.items())


def search_name(study: str, budget_limits: Mapping[str, float],
                front_pts: Sequence[Mapping[str, Any]]) -> str:
    """The parent run's name once ranked: `search digits-lenet flops=0.4: best t1 admm ...`
    (the UI shows parents with their children folded: the name is what is seen)."""
    best = max(front_pts, key=lambda p: number(p.get(VAL_ACC)) or 0.0, default=None)
    limits = ",".join(f"{k}={float(v):g}" for k, v in budget_limits.items())
    if best is None:
        return f"search {study} {limits}: no trial in budget"
    return f"search {study} {limits}: best " + run_name(int(best.get("trial", -1)),
                                                         str(best.get("method")), best)


def front_table(points: Sequence[Mapping[str, Any]], on_front: set[int],
                dense_val: float | None) -> dict[str, list]:
    """Every trial as columns for `MlflowClient.log_table` (the UI's artifact view renders it
    as a table): accuracy, drop vs dense, the four fractions, whether on the front."""
    cols: dict[str, list] = {c: [] for c in ("trial", "method", VAL_ACC, "acc_drop", TEST_ACC,
                                             *FRACTIONS, "feasible", "pareto")}
    for p in points:
        val = number(p.get(VAL_ACC))
        for c in cols:
            if c == "acc_drop":
                v = None if val is None or dense_val is None else dense_val - val
            elif c == "pareto":
                v = id(p) in on_front
            elif c == "feasible":
                v = bool(p.get("feasible", True))
            else:
                v = p.get(c)
            cols[c].append(v)
    return cols


def number(v: Any) -> float | None:
    """A metric value, or None for what MLflow cannot plot (strings, None, arrays)."""
    if isinstance(v, (bool, int, float, np.generic)):
        return float(v)
    if isinstance(v, np.ndarray) and v.size == 1:
        return float(v.item())
    if callable(getattr(v, "numel", None)) and v.numel() == 1:
        return float(v.item())  # a one-element torch tensor (torch is not imported here)
    return None


def columns_of(points: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """POINT_COLUMNS, then any other keys the points carry (sorted, for stable tables)."""
    extra = sorted({k for p in points for k in p} - set(POINT_COLUMNS))
    return (*POINT_COLUMNS, *extra)


def row(p: Mapping[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    """A table row: nested values (hyperparameter dicts) as JSON text."""
    return {c: json.dumps(v, default=str) if isinstance(v := p.get(c), (dict, list, tuple))
            else v for c in columns}


def csv_text(rows: list[dict[str, Any]], columns: Sequence[str] = POINT_COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def pareto_figure(points: Sequence[Mapping[str, Any]], front_pts: Sequence[Mapping[str, Any]],
                  budget_limits: Mapping[str, float], dense: Mapping[str, Any]) -> Any:
    """Validation accuracy against FLOPs and params fractions: every trial grey, the front in
    red, joined per panel by the staircase of that projection's front, the dense model as a star
    (at cost 1.0), budget limits as dashed lines.

    Built on `matplotlib.figure.Figure` (Agg canvas), not pyplot: no global backend or figure
    state, so it is safe in a driver that also runs other code.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    dense_acc = number(dense.get(VAL_ACC))
    for ax, key, budget_key, label in ((axes[0], FLOPS_FRAC, "flops", "FLOPs fraction"),
                                       (axes[1], PARAMS_FRAC, "params", "params fraction")):
        def xy(pts: Iterable[Mapping[str, Any]], k: str = key) -> tuple[list, list]:
            ok = [p for p in pts if number(p.get(k)) is not None
                  and number(p.get(VAL_ACC)) is not None]
            return [float(p[k]) for p in ok], [float(p[VAL_ACC]) for p in ok]

        ax.scatter(*xy(points), s=18, color="0.7", label="trials", zorder=1)
        ax.scatter(*xy(front_pts), s=36, color="tab:red", label="Pareto front", zorder=3)
        # the line joins the front of this projection only (3-D front points need not be
        # monotone in one cost), as a staircase: the best accuracy reachable at each cost
        feasible = [p for p in points if p.get("feasible", True)]
        stair = [feasible[i] for i in pareto.front(feasible, ((VAL_ACC, "max"), (key, "min")))]
        sx, sy = xy(sorted(stair, key=lambda p: float(p[key])))
        ax.plot(sx, sy, drawstyle="steps-post", color="tab:red", lw=1.2, zorder=2)
        if dense_acc is not None:
            ax.scatter([1.0], [dense_acc], marker="*", s=160, color="black", label="dense",
                       zorder=4)
        if budget_key in budget_limits:
            ax.axvline(float(budget_limits[budget_key]), ls="--", color="tab:blue",
                       label=f"budget {budget_key}={float(budget_limits[budget_key]):g}")
        ax.set_xlabel(label)
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("validation accuracy")
    fig.suptitle("accuracy vs cost (front: feasible, non-dominated in accuracy/FLOPs/params)")
    return fig
