"""The searched augmentation (`finetune.augment: {choices: [study, none]}` in the default space).

What users rely on: `none` really trains both phases of a trial on plain images (so a trial
measures what its finalist will run), `study` is exactly the study's own recipes, the hand
baselines keep the study's recipes, and a choice that cannot change anything (a study without
augmentation) or cannot run (a streamed dataset) is not searched.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from autoprune.engine import STUDY, Recipe
from autoprune.errors import UserError
from autoprune.orchestration.space import SearchSpace
from autoprune.orchestration.summary import rerun_command
from autoprune.paths import SPACES_DIR
from autoprune.pipeline import Workbench, run_pruning
from autoprune.study import load_study


@pytest.fixture(scope="module")
def shifted(tmp_path_factory) -> Workbench:
    """The digits study with both of its recipes shifting the images, as lenet5-mnist does."""
    wb = Workbench.open(load_study("digits-lenet"), tmp_path_factory.mktemp("dense"), seed=0)
    st = wb.study
    return dataclasses.replace(wb, study=dataclasses.replace(
        st, prune=dataclasses.replace(st.prune, augment="shift"),
        finetune=dataclasses.replace(st.finetune, augment="shift")))


def _weights(wb: Workbench, finetune: dict, ramp: float = 1) -> dict[str, torch.Tensor]:
    params = {"gradual": True, "epochs": ramp} if ramp else {}
    model, _ = run_pruning(wb, "magnitude", params, {n: 0.5 for n in wb.layers},
                           finetune=finetune, seed=3)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_none_trains_both_phases_plainly_and_study_is_the_recipe_itself(shifted):
    own = _weights(shifted, {"epochs": 1})
    assert _same(own, _weights(shifted, {"epochs": 1, "augment": STUDY}))
    # the method's own phase alone (no fine-tune): `none` reaches it too
    assert not _same(_weights(shifted, {"epochs": 0}),
                     _weights(shifted, {"epochs": 0, "augment": "none"}))
    # the fine-tune alone (one-shot pruning)
    assert not _same(_weights(shifted, {"epochs": 1}, ramp=0),
                     _weights(shifted, {"epochs": 1, "augment": "none"}, ramp=0))
    plain = dataclasses.replace(shifted, study=dataclasses.replace(
        shifted.study, prune=dataclasses.replace(shifted.study.prune, augment="none"),
        finetune=dataclasses.replace(shifted.study.finetune, augment="none")))
    assert _same(_weights(plain, {"epochs": 1}),
                 _weights(shifted, {"epochs": 1, "augment": "none"}))


def test_a_recipe_override_of_study_keeps_the_recipe_and_bad_keys_still_fail():
    r = Recipe(lr=0.1, augment="shift")
    assert r.overridden({"augment": STUDY}) == r
    assert r.overridden({"augment": "none", "lr": 0.2}) == Recipe(lr=0.2, augment="none")
    with pytest.raises(UserError, match="unknown recipe key"):
        r.overridden({"mixup": 0.2})
    with pytest.raises(UserError, match="augment"):
        r.overridden({"augment": "mixup"})


def test_the_default_space_searches_augment_only_where_it_changes_something():
    space = SearchSpace.load(SPACES_DIR / "default.yaml")
    assert space.finetune["augment"].choices == (STUDY, "none")
    # lenet5-mnist shifts its digits: both choices stay
    assert space.for_data({"shift"}, "none", False) is space
    # digits-lenet trains without augmentation: `none` would repeat `study`
    for augments, default in (({"none"}, "none"), ({"none"}, "crop-flip")):
        fixed = space.for_data(augments, default, False).finetune["augment"]
        assert fixed.fixed and fixed.value == STUDY
    # a dataset whose default is crop + flip keeps `none` as a real choice
    assert space.for_data({"crop-flip"}, "crop-flip", False) is space
    # an image folder crops on its own: only `study` can run
    assert space.for_data({"crop-flip"}, "crop-flip", True).finetune["augment"].value == STUDY
    forced = SearchSpace.from_dict({"methods": "declared", "finetune": {"augment": "none"}})
    with pytest.raises(UserError, match="in-memory"):
        forced.for_data({"crop-flip"}, "crop-flip", True)
    with pytest.raises(UserError, match="finetune.augment"):
        SearchSpace.from_dict({"methods": "declared",
                               "finetune": {"augment": {"choices": [STUDY, "mixup"]}}})


def test_hand_baselines_keep_the_study_recipes(digits):
    from autoprune.flops import Accountant
    from autoprune.models import build_model
    from autoprune.orchestration.baselines import baseline_params
    from autoprune.orchestration.projection import CostTable

    table = CostTable.from_accountant(Accountant(build_model("lenet-digits", 10, 1, 8),
                                                 digits.example()))
    space = SearchSpace.load(SPACES_DIR / "default.yaml")
    recipe = dataclasses.asdict(Recipe(lr=0.02, augment="shift"))
    params = baseline_params(space, table, list(table.layers), "weight", recipe)
    assert params and all(p["finetune.augment"] == STUDY for p in params)


def test_a_rerun_command_names_no_study_override():
    point = {"method": "magnitude", "hparams": "{}", "layer_sparsity": {"conv1": 0.5},
             "finetune": {"augment": STUDY, "lr_scale": 2.0}}
    cmd = rerun_command(point, "digits-lenet", "params=0.5")
    assert "augment" not in cmd and "lr_scale=2.0" in cmd
    point["finetune"]["augment"] = "none"
    assert "augment=none" in rerun_command(point, "digits-lenet", "params=0.5")


def test_the_best_hand_baseline_is_tried_again_without_augmentation():
    """Once every hand baseline has finished, the most accurate in-budget one is enqueued again
    with `none` (as a baseline, once per study): otherwise TPE's good trials all hold `study`."""
    import optuna
    from optuna.trial import TrialState

    from autoprune.orchestration.baselines import (
        BASELINE_ATTR,
        enqueue_variants,
        variant_axes,
    )

    axes = variant_axes(SearchSpace.load(SPACES_DIR / "default.yaml"))
    assert axes == {"finetune.augment": (STUDY, ["none"]), "prior_strength": (0.5, [1.0])}
    ot = optuna.create_study(direction="maximize")
    for x in (0.1, 0.2, 0.3):
        ot.enqueue_trial({"x": x, "finetune.augment": STUDY}, user_attrs={BASELINE_ATTR: True})

    def run(val: float, violation: float) -> None:
        t = ot.ask()
        t.suggest_float("x", 0.0, 1.0)
        t.suggest_categorical("finetune.augment", [STUDY, "none"])
        for k in ("flops_frac", "params_frac"):
            t.set_user_attr(k, 0.5)
        t.set_constraint("budget", violation)
        ot.tell(t, val)

    run(0.90, 0.0)
    run(0.99, 0.3)  # the most accurate, but over budget
    assert enqueue_variants(ot, axes) == 0  # a baseline is still waiting
    run(0.95, 0.0)
    assert enqueue_variants(ot, axes) == 1
    waiting = ot.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs[BASELINE_ATTR]
    assert waiting[0].system_attrs["fixed_params"] == {"x": 0.3, "finetune.augment": "none"}
    assert enqueue_variants(ot, axes) == 0  # once per study
    assert enqueue_variants(optuna.create_study(), {}) == 0


def test_each_methods_best_hand_baseline_is_tried_again():
    """The variants run for the best baseline of every method, the best of all first: which
    method a ratio favours can show only once it has them (a tie before is a coin's throw)."""
    import optuna
    from optuna.trial import TrialState

    from autoprune.orchestration.baselines import BASELINE_ATTR, VARIANTS_ATTR, enqueue_variants

    axes = {"finetune.augment": (STUDY, ["none"])}
    ot = optuna.create_study(direction="maximize")
    hand = [("a", 0.1, 0.90), ("b", 0.2, 0.93), ("a", 0.3, 0.95), ("b", 0.4, 0.91)]
    for method, x, _ in hand:
        ot.enqueue_trial({"method": method, "x": x, "finetune.augment": STUDY},
                         user_attrs={BASELINE_ATTR: True})
    for _, _, val in hand:
        t = ot.ask()
        t.suggest_categorical("method", ["a", "b"])
        t.suggest_float("x", 0.0, 1.0)
        t.suggest_categorical("finetune.augment", [STUDY, "none"])
        for k in ("flops_frac", "params_frac"):
            t.set_user_attr(k, 0.5)
        t.set_constraint("budget", 0.0)
        ot.tell(t, val)
    assert enqueue_variants(ot, axes) == 2
    waiting = [w.system_attrs["fixed_params"] for w in ot.get_trials(states=(TrialState.WAITING,))]
    assert waiting == [{"method": "a", "x": 0.3, "finetune.augment": "none"},
                       {"method": "b", "x": 0.2, "finetune.augment": "none"}]
    assert ot.user_attrs[VARIANTS_ATTR] == [2, 1]


def _variants_of(params: dict, axes: dict) -> list[dict]:
    """The variants enqueued when `params` is the one finished hand baseline."""
    import optuna

    from autoprune.orchestration.baselines import BASELINE_ATTR, enqueue_variants

    ot = optuna.create_study(direction="maximize")
    ot.enqueue_trial(params, user_attrs={BASELINE_ATTR: True})
    t = ot.ask()
    t.suggest_categorical("finetune.augment", [STUDY, "none"])
    if "prior_strength" in params:
        t.suggest_float("prior_strength", 0.0, 1.5)
    for k in ("flops_frac", "params_frac"):
        t.set_user_attr(k, 0.5)
    t.set_constraint("budget", 0.0)
    ot.tell(t, 0.9)
    enqueue_variants(ot, axes)
    return [w.system_attrs["fixed_params"]
            for w in ot.get_trials(states=(optuna.trial.TrialState.WAITING,))]


def test_the_best_size_prior_baseline_is_tried_again_with_the_small_layers_spared_more():
    """A baseline with the default size prior (strength 0.5) is also tried at
    `STRONGER_PRIOR`, with and without the study's augmentation (at 355.9x the stronger prior
    tested 0.5 points higher over 18 epochs, on two seeds); one with the uniform split
    (strength 0) or the global split (no prior) only without the augmentation; a space that
    fixes the strength, or whose range lacks the stronger one, adds nothing."""
    from autoprune.orchestration.baselines import STRONGER_PRIOR, variant_axes

    space = SearchSpace.load(SPACES_DIR / "default.yaml")
    axes = variant_axes(space)
    size = _variants_of({"finetune.augment": STUDY, "prior_strength": 0.5}, axes)
    assert size == [{"finetune.augment": STUDY, "prior_strength": STRONGER_PRIOR},
                    {"finetune.augment": "none", "prior_strength": 0.5},
                    {"finetune.augment": "none", "prior_strength": STRONGER_PRIOR}]
    flat = _variants_of({"finetune.augment": STUDY, "prior_strength": 0.0}, axes)
    assert flat == [{"finetune.augment": "none", "prior_strength": 0.0}]
    assert _variants_of({"finetune.augment": STUDY}, axes) == [{"finetune.augment": "none"}]
    for strength in (0.5, {"low": 0.0, "high": 0.8}):
        raw = {"methods": "declared", "sparsity": {"prior_strength": strength}}
        assert "prior_strength" not in variant_axes(SearchSpace.from_dict(raw))
