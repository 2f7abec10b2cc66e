"""The baselines a user would try by hand, as the first trials of every search.

Each method may declare `baselines` (hyperparameter settings that are the classic hand-tuned
uses of it: one-shot and AGP magnitude pruning, say). A new search enqueues every declared
setting of the methods in its space, each at the full budget: first with the global split
(`global_split.py`, when the space offers it: one importance ranking over all layers, which for
one-shot magnitude filter pruning under flops= is Torch-Pruning's global group-magnitude
pruning, the strongest hand baseline), then with the size-prior split of the budget (larger
layers pruned harder, the default of `autoprune prune`) and with the uniform split (the same
sparsity in every layer). All global ones come first, then all size-prior ones, so a search
too short for every baseline (`limit`) still gets the strongest of each method. The sampler
then starts from points a user would have tried, and the search can never return a model worse
than they are (up to the noise of one run). Nothing here names a method: the settings come
from the registry.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import optuna

from ..engine import STUDY
from ..pruning import get_method
from .projection import PRIOR_STRENGTH, CostTable, size_prior
from .space import Dist, SearchSpace

BASELINE_ATTR = "baseline"  # Optuna user attr of an enqueued baseline trial
VARIANTS_ATTR = "baseline_variants"  # Optuna study attr: the baselines whose variants ran
# The size prior's strength of the best baseline's variant: twice the default, which spares the
# small layers more. AGP magnitude on LeNet-5, 18 epochs, seeds 0 and 2: at 355.9x weights test
# 0.9834 / 0.9838 against 0.9780 / 0.9767 at 0.5; at 71.2x a tie, 0.9922 / 0.9926 against
# 0.9921 / 0.9928 (docs/benchmarks.md, fourteenth runs).
STRONGER_PRIOR = 1.0
log = logging.getLogger("autoprune")


def _fits(dist: Dist, value: Any) -> bool:
    if dist.fixed:
        return dist.value == value
    if dist.kind == "categorical":
        return value in dist.choices
    return not isinstance(value, str) and dist.low <= value <= dist.high


def _strength(space: SearchSpace) -> float:
    """The size prior's strength of the baselines: the space's fixed value, or where it is
    searched the default (0.5) if the range holds it, else the nearer end of the range."""
    d = space.prior_strength
    return d.value if d.fixed else min(max(PRIOR_STRENGTH, d.low), d.high)


def baseline_params(space: SearchSpace, table: CostTable, layers: list[str],
                    granularity: str, recipe: dict[str, Any] | None = None
                    ) -> list[dict[str, Any]]:
    """Optuna parameter sets (names as `SearchSpace.suggest` samples them) of the baselines.

    A setting the space cannot express (a hyperparameter fixed to another value, or outside
    its searched range) is skipped. Hyperparameters a setting leaves open take the method's
    paper default where the space allows it, else the sampler's choice. Searched fine-tune
    settings take their values in `recipe` (the study's own fine-tune recipe, what a user runs
    by hand: `lr_scale` 1) where the space's range holds them, or `study` where that is one of
    the choices (the augmentation of both of the study's recipes, as they are).
    """
    keys = space.alloc_keys(layers)
    strength = _strength(space)
    prior = size_prior(table, [n for n in layers if n in table.layers], granularity, strength)
    searched = {} if space.prior_strength.fixed or space.prior != "size" \
        else {"prior_strength": strength}
    lo, hi = (space.allocation.low or 0.0), (space.allocation.high or 1.0)

    # With a searched strength whose range holds 0, the uniform split is strength 0 with the
    # offsets at 0.5 (the same plan as offsets of 1 - p): the sampler then learns from the
    # baselines that strength matters (at 71.2x uniform scores val 0.80-0.95, the prior 0.985)
    # in one number, where the offsets would spread that over every layer's.
    flat = bool(searched) and space.prior_strength.low == 0.0

    def alloc(kind: str) -> dict[str, float] | None:
        out = {"prior_strength": 0.0} if flat and kind == "uniform" else dict(searched)
        if space.allocation.fixed:
            return out
        for key, members in keys.items():
            p = next((prior[m] for m in members if m in prior), 0.5)
            # sampled a is an offset from the prior (`with_prior`): 0.5 gives the prior,
            # 1 - p cancels it (every layer alike); with prior "none" the roles swap
            size_a, uniform_a = (0.5, 1.0 - p) if space.prior == "size" else (p, 0.5)
            uniform_a = 0.5 if flat else uniform_a
            a = size_a if kind == "size" else uniform_a
            if not lo <= a <= hi:
                return None
            out[f"alloc.{key}"] = a
        return out

    split = {"split": "sampled"} if len(space.split) > 1 else {}  # sampled, when a choice
    recipe = recipe or {}
    hand_ft = {}
    for k, d in space.finetune.items():
        if d.fixed:
            continue
        if _fits(d, STUDY):  # "the study's own" is a choice (`finetune.augment`)
            hand_ft[f"finetune.{k}"] = STUDY
        elif k in recipe and _fits(d, recipe[k]):
            hand_ft[f"finetune.{k}"] = recipe[k]
    glob: list[dict[str, Any]] = []
    out: dict[str, list[dict[str, Any]]] = {"size": [], "uniform": []}
    for method, dists in space.methods.items():
        cls = get_method(method)
        defaults = {f: getattr(cls.Params(), f) for f in dists}
        for setting in cls.baselines:
            if any(hp not in dists or not _fits(dists[hp], v) for hp, v in setting.items()):
                continue
            params: dict[str, Any] = {"method": method, **hand_ft}
            for hp, dist in dists.items():
                value = setting.get(hp, defaults[hp])
                if not dist.fixed and _fits(dist, value):
                    params[f"{method}.{hp}"] = value
            if space.target_floor < 1.0:
                params["target"] = 1.0
            if "global" in space.split:
                g = {**params, "split": "global"} if len(space.split) > 1 else params
                if g not in glob:
                    glob.append(g)
            if "sampled" not in space.split:
                continue
            for kind, listed in out.items():
                a = alloc(kind)
                if a is not None and {**params, **split, **a} not in listed:
                    listed.append({**params, **split, **a})
    # strongest split first, so that a `limit` cuts the uniform ones (at 71.2x uniform scores
    # val 0.80-0.95, the size prior 0.985): under params= digits-lenet's 8 slots hold the
    # global and size-prior splits of 4 settings
    return glob + out["size"] + out["uniform"]


def enqueue_baselines(ot_study: optuna.Study, params: list[dict[str, Any]], limit: int) -> int:
    """Enqueue up to `limit` baselines into a study that has no trial yet; return how many."""
    if ot_study.trials or limit <= 0:
        return 0  # a resumed study keeps what it has
    for p in params[:limit]:
        ot_study.enqueue_trial(p, user_attrs={BASELINE_ATTR: True})
    n = min(len(params), limit)
    if n:
        log.info(f"the first {n} trials are hand baselines (enqueued)")
    return n


def variant_axes(space: SearchSpace) -> dict[str, tuple[Any, list[Any]]]:
    """What the best hand baseline is tried again with: {Optuna name: (the baselines' value,
    [the others])}. The searched fine-tune choices besides `study` (`finetune.augment`), and
    where the size prior's strength is searched, `STRONGER_PRIOR` (the baselines hold 0.5)."""
    out: dict[str, tuple[Any, list[Any]]] = {
        f"finetune.{k}": (STUDY, [v for v in d.choices if v != STUDY])
        for k, d in space.finetune.items() if d.kind == "categorical" and STUDY in d.choices}
    d, base = space.prior_strength, _strength(space)
    if space.prior == "size" and not d.fixed and base < STRONGER_PRIOR \
            and _fits(d, STRONGER_PRIOR):
        out["prior_strength"] = (base, [STRONGER_PRIOR])
    return out


def enqueue_variants(ot_study: optuna.Study, axes: dict[str, tuple[Any, list[Any]]]) -> int:
    """Once every hand baseline has finished, enqueue the most accurate in-budget one of each
    method that holds the study's recipes again with every combination of the values in `axes`
    (`variant_axes`) that it can take, as baselines; once per study.

    The baselines all train with the study's own recipes and the default prior, so TPE's good
    trials all hold them and it hardly proposes another value: at 355.9x weights on LeNet-5,
    two sampled trials of ten tried `augment: none` (one killed by the time limit), where plain
    images score val 0.959 against 0.955 at a trial's length. The best hand run, repeated
    without augmentation or with the small layers spared more, is a user's next try by hand,
    and puts those values among the good trials: TPE then tried `none` in 4 of 10, and the
    variant was the pick, 0.30 test points above the same baseline with the study's shift
    (docs/benchmarks.md, thirteenth runs). Each method's best, not only the best of all: with
    the study's recipes ADMM's and AGP's baselines at 355.9x were 4 validation images apart
    (0.9532 against 0.9525), so which one's variants ran was a coin's throw, while what a
    method gains from the variants differs (seventeenth runs).
    """
    from optuna.trial import TrialState

    from ..record import TrialRecord

    if not axes or ot_study.user_attrs.get(VARIANTS_ATTR) is not None:
        return 0
    hand = [t for t in ot_study.get_trials(deepcopy=False) if t.user_attrs.get(BASELINE_ATTR)]
    if not hand or not all(t.state.is_finished() for t in hand):
        return 0
    recipes = [k for k, (base, _) in axes.items() if base == STUDY]
    done = [(TrialRecord.from_optuna(t), t) for t in hand if t.state == TrialState.COMPLETE
            and all(t.params.get(k) == STUDY for k in recipes)]
    best: dict[Any, optuna.trial.FrozenTrial] = {}  # method -> its best, the best of all first
    for _, t in sorted(((r, t) for r, t in done if r.feasible),
                       key=lambda rt: (-rt[0].val_accuracy, rt[1].number)):
        best.setdefault(t.params.get("method"), t)
    count = 0
    for t in best.values():
        # the dimensions this baseline holds at the baselines' value (a global split: no prior)
        held = {k: [base, *alts] for k, (base, alts) in axes.items()
                if k in t.params and t.params[k] == base}
        variants = [{**t.params, **dict(zip(held, combo, strict=True))}
                    for combo in itertools.product(*held.values())][1:]  # [0]: the baseline
        for p in variants:
            ot_study.enqueue_trial(p, user_attrs={BASELINE_ATTR: True})
        count += len(variants)
        if variants:
            log.info(f"trial {t.number}, the best hand baseline of {t.params.get('method')}, "
                     "is tried again with "
                     + "; ".join(", ".join(f"{k}={p[k]}" for k in held if p[k] != t.params[k])
                                 for p in variants))
    ot_study.set_user_attr(VARIANTS_ATTR, [t.number for t in best.values()])
    return count
