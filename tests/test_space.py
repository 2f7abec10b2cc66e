"""Search spaces: strict validation, one-line messages, conditional Optuna sampling, decoding."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import yaml

from autoprune.errors import UserError
from autoprune.orchestration.space import Dist, SearchSpace
from autoprune.paths import SPACES_DIR
from autoprune.pruning import load_all

optuna.logging.set_verbosity(optuna.logging.WARNING)

LENET = ["conv1", "conv2", "fc1", "fc2"]
RESNET20 = ["conv1", *[f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(3)
                       for c in (1, 2)], "layer2.0.shortcut.0", "layer3.0.shortcut.0", "fc"]
ALL_SIX = ("magnitude", "admm", "radmm", "l0", "adaptive_l1", "asfp")
DOC_HPS = {  # hyperparameter names of METHODS.md that the built-in spaces must search
    "magnitude": {"gradual", "epochs", "granularity", "norm"},
    "admm": {"rho", "rho_mult", "admm_iters", "epochs_per_iter", "granularity"},
    "radmm": {"rho", "eps", "admm_iters", "epochs_per_iter", "granularity"},
    "l0": {"lam", "init_drop", "epochs", "granularity", "gate_lr"},
    "adaptive_l1": {"lam0", "filter_share", "epochs"},
    "asfp": {"epochs", "asymptotic"},
}

BASE = {
    "methods": {"magnitude": {"gradual": {"choices": [False, True]},
                              "epochs": {"low": 0.5, "high": 2.0},
                              "frequency": {"low": 2, "high": 20, "int": True},
                              "ramp": 0.5}},
    "finetune": {"lr": {"low": 0.005, "high": 0.1, "log": True}, "epochs": 3},
    "sparsity": {"target_floor": 0.6, "allocation": {"low": 0.05, "high": 0.95},
                 "max_sparsity": 0.98, "exclude": ["fc2$"]},
}


def with_(path: str, value, base: dict = BASE) -> dict:
    """A copy of `base` with the dotted `path` set to `value` (None deletes it)."""
    d = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node.setdefault(p, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return d


def require(*methods: str) -> None:
    missing = [m for m in methods if m not in load_all()]
    if missing:
        pytest.skip(f"pruning method(s) not registered yet: {', '.join(missing)}")


# -- validation --------------------------------------------------------------------------------
BAD = [
    (["not", "a", "mapping"], "must be a mapping with a 'methods' key"),
    ({}, "methods: must be a non-empty mapping"),
    ({"methods": {}}, "methods: must be a non-empty mapping"),
    (with_("colour", "blue"), "colour: unknown top-level key"),
    (with_("methods.nosuchmethod", {}), "methods.nosuchmethod: unknown method 'nosuchmethod'"),
    (with_("methods.magnitude", [1, 2]), "methods.magnitude: must map hyperparameters"),
    (with_("methods.magnitude.nosuch", 1),
     "methods.magnitude.nosuch: method 'magnitude' has no hyperparameter 'nosuch'"),
    (with_("methods.magnitude.ramp", {"low": 0.01, "high": 0.5}),
     "methods.magnitude.ramp: magnitude.ramp must be in [0.05, 1.0], got 0.01"),
    (with_("methods.magnitude.epochs", {"low": 2.0, "high": 1.0}), "low must be < high"),
    (with_("methods.magnitude.epochs", {"low": 1.0, "high": 1.0}), "low must be < high"),
    (with_("methods.magnitude.epochs", {"low": 1.0}), "a range needs both low and high"),
    (with_("methods.magnitude.epochs", {"low": "a", "high": 2}), "epochs.low: must be a finite"),
    (with_("methods.magnitude.epochs", {"lo": 1, "high": 2}), "unknown distribution key 'lo'"),
    (with_("methods.magnitude.epochs", {"low": 0.0, "high": 2.0, "log": True}),
     "a log range needs low > 0"),
    (with_("methods.magnitude.epochs", {"low": 0.5, "high": 2.0, "log": "yes"}),
     "epochs.log: must be true or false"),
    (with_("methods.magnitude.gradual", "yes"), "magnitude.gradual expects bool, got 'yes'"),
    (with_("methods.magnitude.gradual", {"low": 0, "high": 1}), "a float range for a bool"),
    (with_("methods.magnitude.gradual", {"choices": []}), "choices must be a non-empty list"),
    (with_("methods.magnitude.gradual", {"choices": [True, True]}), "duplicates"),
    (with_("methods.magnitude.gradual", {"choices": [True], "low": 0}), "cannot be combined"),
    (with_("methods.magnitude.frequency", {"low": 1.5, "high": 3}), "integer range"),
    (with_("methods.magnitude.frequency", {"choices": [5, 0]}),
     "magnitude.frequency must be in [1, 100000], got 0"),
    (with_("finetune.lrr", 0.1), "finetune.lrr: unknown fine-tune recipe key"),
    (with_("finetune.lr", "fast"), "finetune.lr: expects float, got 'fast'"),
    (with_("finetune.batch_size", 12.5), "finetune.batch_size: expects int"),
    (with_("finetune.optimizer", {"choices": ["sgd", "rmsprop"]}),
     "recipe optimizer must be sgd or adam"),
    (with_("finetune", [1]), "finetune: must be a mapping"),
    (with_("sparsity", 3), "sparsity: must be a mapping"),
    (with_("sparsity.floor", 0.5), "sparsity.floor: unknown key"),
    (with_("sparsity.target_floor", 0.0), "sparsity.target_floor: must be in (0, 1]"),
    (with_("sparsity.target_floor", "high"), "sparsity.target_floor: must be a finite number"),
    (with_("sparsity.target_floor", float("nan")), "must be a finite number"),
    (with_("sparsity.max_sparsity", 1.0), "sparsity.max_sparsity: must be in (0, 1)"),
    (with_("sparsity.allocation", {"low": 0.0, "high": 0.5}), "values must lie in (0, 1)"),
    (with_("sparsity.allocation", 1.5), "values must lie in (0, 1)"),
    (with_("sparsity.allocation", {"choices": [0.1, 0.2]}), "must be {low, high} or a fixed"),
    (with_("sparsity.prior_strength", {"low": -1, "high": 1}), "values must lie in [0, 3]"),
    (with_("sparsity.prior_strength", "strong"), "values must lie in [0, 3]"),
    (with_("sparsity.prior_strength", {"choices": [0.5, 1]}), "must be {low, high} or a fixed"),
    (with_("sparsity.exclude", ["fc("]), "sparsity.exclude: invalid regex 'fc('"),
    (with_("sparsity.exclude", 3), "sparsity.exclude: must be a regex or a list"),
    (with_("sparsity.groups", ["a"]), "sparsity.groups: must be a mapping"),
    (with_("sparsity.groups", {"a/b": "conv"}), "group names use letters"),
    (with_("sparsity.groups", {"stage": 7}), "sparsity.groups.stage: must be non-empty regex"),
]


@pytest.mark.parametrize("d, fragment", BAD)
def test_bad_spaces_are_one_line_user_errors(d, fragment):
    with pytest.raises(UserError) as info:
        SearchSpace.from_dict(d, source="bad.yaml")
    msg = str(info.value)
    assert fragment in msg, msg
    assert msg.startswith("bad.yaml") and "\n" not in msg


def test_load_reports_file_problems(tmp_path):
    with pytest.raises(UserError, match="cannot read search space"):
        SearchSpace.load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("methods:\n  magnitude: {gradual: [true\nsparsity: 1\n")
    with pytest.raises(UserError) as info:
        SearchSpace.load(broken)
    assert str(info.value).startswith(f"{broken}: not valid YAML at line")
    assert "\n" not in str(info.value)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("methods:\n  magnitude:\n    gradual: maybe\n")
    with pytest.raises(UserError, match=r"wrong\.yaml: methods\.magnitude\.gradual: .*bool"):
        SearchSpace.load(wrong)


def test_defaults_and_parsed_values():
    s = SearchSpace.from_dict({"methods": {"magnitude": None}})
    assert s.methods == {"magnitude": {}}
    assert (s.target_floor, s.max_sparsity, s.exclude, s.groups) == (0.6, 0.999, (), {})
    assert (s.allocation.low, s.allocation.high) == (0.05, 0.95)
    s = SearchSpace.from_dict(BASE)
    mag = s.methods["magnitude"]
    assert mag["frequency"].kind == "int" and mag["epochs"].kind == "float"
    assert mag["gradual"].choices == (False, True) and mag["ramp"].value == 0.5
    assert s.finetune["lr"].log and s.finetune["epochs"].value == 3


def test_excluding_every_layer_is_refused():
    s = SearchSpace.from_dict(with_("sparsity.exclude", ["conv", "fc"]), source="x.yaml")
    trial = optuna.create_study().ask()
    for call in (lambda: s.prunable(LENET), lambda: s.suggest(trial, LENET),
                 lambda: s.decode({"method": "magnitude"}, LENET)):
        with pytest.raises(UserError, match="x.yaml: sparsity.exclude: the patterns exclude"):
            call()


# -- Optuna --------------------------------------------------------------------------------------
def test_suggest_and_decode_with_a_real_study():
    s = SearchSpace.from_dict(BASE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    const = s.suggest(trial, LENET)
    assert const == {"magnitude.ramp": 0.5, "finetune.epochs": 3}
    p = trial.params
    assert set(p) == {"method", "magnitude.gradual", "magnitude.epochs", "magnitude.frequency",
                      "finetune.lr", "target", "alloc.conv1", "alloc.conv2", "alloc.fc1"}
    assert 0.6 <= p["target"] <= 1.0 and 0.005 <= p["finetune.lr"] <= 0.1
    assert all(0.05 <= p[f"alloc.{n}"] <= 0.95 for n in ("conv1", "conv2", "fc1"))
    plan = s.decode({**p, **const, "optuna_trial": 0}, LENET)
    assert plan.method == "magnitude" and plan.prunable == ["conv1", "conv2", "fc1"]
    assert plan.params == {"gradual": p["magnitude.gradual"], "epochs": p["magnitude.epochs"],
                           "frequency": p["magnitude.frequency"], "ramp": 0.5}
    assert isinstance(plan.params["frequency"], int)
    assert plan.finetune == {"lr": p["finetune.lr"], "epochs": 3}
    assert plan.target == p["target"]
    assert plan.allocation == {n: p[f"alloc.{n}"] for n in ("conv1", "conv2", "fc1")}
    with pytest.raises(UserError, match="trial config lacks 'alloc.fc1'"):
        s.decode({k: v for k, v in p.items() if k != "alloc.fc1"}, LENET)
    with pytest.raises(UserError, match="method 'admm' is not in"):
        s.decode({**p, "method": "admm"}, LENET)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_only_the_chosen_methods_hyperparameters_are_sampled():
    require("admm")
    d = with_("methods.admm", {"rho": {"low": 1e-4, "high": 1e-1, "log": True},
                               "admm_iters": {"low": 2, "high": 6, "int": True},
                               "granularity": {"choices": ["weight", "filter"]},
                               "epochs_per_iter": 0.5})
    s = SearchSpace.from_dict(d)
    sampler = optuna.samplers.TPESampler(seed=0, multivariate=True, group=True,
                                         n_startup_trials=4)
    study = optuna.create_study(sampler=sampler)
    seen = set()
    for i in range(12):
        trial = study.ask()
        const = s.suggest(trial, LENET)
        method = trial.params["method"]
        seen.add(method)
        method_keys = {k for k in trial.params if k.startswith(("magnitude.", "admm."))}
        assert method_keys and all(k.startswith(f"{method}.") for k in method_keys)
        if method == "admm":
            assert method_keys == {"admm.rho", "admm.admm_iters", "admm.granularity"}
            assert const["admm.epochs_per_iter"] == 0.5 and "magnitude.ramp" not in const
            plan = s.decode({**trial.params, **const}, LENET)
            assert plan.params["epochs_per_iter"] == 0.5
            assert isinstance(plan.params["admm_iters"], int)
            assert plan.params["granularity"] in ("weight", "filter")
        study.tell(trial, float(i % 3))
    assert seen == {"magnitude", "admm"}


def test_ray_optuna_search_passes_the_config_that_decode_reads(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    s = SearchSpace.from_dict(BASE)
    searcher = OptunaSearch(space=s.define_by_run(LENET), metric="val_accuracy",
                            mode="max", sampler=optuna.samplers.RandomSampler(seed=0))
    config = searcher.suggest("trial_1")
    assert config["magnitude.ramp"] == 0.5 and config["finetune.epochs"] == 3
    plan = s.decode(config, LENET)
    assert plan.method == "magnitude" and set(plan.allocation) == {"conv1", "conv2", "fc1"}
    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune checkpoints the searcher: must pickle
    assert (tmp_path / "searcher.pkl").stat().st_size > 0


def test_fixed_target_and_allocation_sample_nothing_extra():
    d = with_("sparsity", {"target_floor": 1.0, "allocation": 0.3})
    s = SearchSpace.from_dict(d)
    trial = optuna.create_study().ask()
    const = s.suggest(trial, LENET)
    assert const["target"] == 1.0
    assert not any(k.startswith("alloc.") or k == "target" for k in trial.params)
    plan = s.decode({**trial.params, **const}, LENET)
    assert plan.target == 1.0 and plan.allocation == dict.fromkeys(LENET, 0.3)


def test_groups_share_one_allocation_parameter():
    d = with_("sparsity", {"groups": {"stage1": r"layer1\.", "stage23": r"layer[23]\.",
                                      "nothing": "nomatch"}, "exclude": "shortcut"})
    s = SearchSpace.from_dict(d)
    keys = s.alloc_keys(RESNET20)
    assert list(keys) == ["conv1", "stage1", "stage23", "fc"]
    assert len(keys["stage1"]) == 6 and len(keys["stage23"]) == 12
    trial = optuna.create_study().ask()
    const = s.suggest(trial, RESNET20)
    alloc = {k for k in trial.params if k.startswith("alloc.")}
    assert alloc == {"alloc.conv1", "alloc.stage1", "alloc.stage23", "alloc.fc"}
    plan = s.decode({**trial.params, **const}, RESNET20)
    assert "layer2.0.shortcut.0" not in plan.allocation and len(plan.allocation) == 20
    assert plan.allocation["layer3.2.conv2"] == trial.params["alloc.stage23"]
    assert plan.allocation["layer1.0.conv1"] == trial.params["alloc.stage1"]


def test_group_named_like_a_layer_is_refused():
    s = SearchSpace.from_dict(with_("sparsity.groups", {"conv2": "conv"}), source="g.yaml")
    with pytest.raises(UserError, match="g.yaml: sparsity.groups.conv2: .*named like a layer"):
        s.alloc_keys(LENET)


# -- the built-in spaces ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["default", "deep"])
def test_builtin_spaces_search_the_declared_hyperparameters(name):
    """The built-in files list no method: every registered one competes with its declared ranges."""
    assert yaml.safe_load((SPACES_DIR / f"{name}.yaml").read_text())["methods"] == "declared"
    s = SearchSpace.load(SPACES_DIR / f"{name}.yaml")
    assert set(s.methods) == set(load_all()) >= set(ALL_SIX)
    for method, hps in DOC_HPS.items():  # METHODS.md's knobs of the six seed methods
        assert set(s.methods[method]) == hps, method
    for method, dists in s.methods.items():
        assert dists, f"{method} declares no search range"
        assert all(not d.fixed for d in dists.values()), method
        if "epochs" in dists:  # quick CPU trials
            assert dists["epochs"].high <= 3, method
    for method in ("admm", "radmm"):  # ADMM iterations x epochs per iteration <= 3 epochs
        hps = s.methods[method]
        assert hps["admm_iters"].high * hps["epochs_per_iter"].high <= 3
    admm = s.methods["admm"]  # today's ranges, now declared in admm.py
    assert (admm["rho"].low, admm["rho"].high, admm["rho"].log) == (1e-4, 1e-1, True)
    assert admm["admm_iters"].kind == "int" and admm["rho_mult"].choices == (1.0, 1.3, 2.0)


def test_deep_space_groups_resnet_stages():
    d = yaml.safe_load((SPACES_DIR / "deep.yaml").read_text())
    d["methods"] = {"magnitude": "declared"}
    s = SearchSpace.from_dict(d, source="deep.yaml")
    keys = s.alloc_keys(RESNET20)
    assert list(keys) == ["conv1", "stage1", "stage2", "stage3", "fc"]
    assert "layer2.0.shortcut.0" in keys["stage2"] and len(keys["stage3"]) == 7


@pytest.mark.parametrize("name", ["default", "deep"])
def test_builtin_spaces_load_strictly(name):
    s = SearchSpace.load(SPACES_DIR / f"{name}.yaml")
    assert set(s.methods) == set(load_all())
    assert s.target_floor == 0.6 and s.max_sparsity == 0.999
    assert s.split == ("sampled", "global")  # both splits compete (global_split.py)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    splits = set()
    for _ in range(12):
        trial = study.ask()
        const = s.suggest(trial, RESNET20)
        plan = s.decode({**trial.params, **const}, RESNET20)
        splits.add(plan.split)
        # the allocation is sampled (and decoded) only where it is used
        assert set(plan.allocation) == (set(RESNET20) if plan.split == "sampled" else set())
        assert any(k.startswith("alloc.") for k in trial.params) == (plan.split == "sampled")
        study.tell(trial, 0.0)
    assert splits == {"sampled", "global"}


@pytest.mark.parametrize("method", sorted(load_all()))
def test_every_declared_range_is_valid_and_sampled(method):
    """A method's declared ranges pass the same checks as a YAML range, and decode to Params."""
    cls = load_all()[method]
    s = SearchSpace.from_dict({"methods": {method: "declared"}}, source="declared")
    assert set(s.methods[method]) == set(cls.search_space())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(4):
        trial = study.ask()
        const = s.suggest(trial, LENET)
        plan = s.decode({**trial.params, **const}, LENET)
        cls.make_params(**plan.params)
        study.tell(trial, 0.0)


def test_declared_merges_with_overrides():
    d = {"methods": {"admm": {"declared": True, "rho": 1e-3,
                              "granularity": {"choices": ["filter"]}},
                     "magnitude": "declared", "asfp": {"declared": False, "epochs": 1.0}}}
    s = SearchSpace.from_dict(d)
    assert set(s.methods) == {"admm", "magnitude", "asfp"}  # only the listed methods compete
    admm = s.methods["admm"]
    assert set(admm) == DOC_HPS["admm"]
    assert admm["rho"].fixed and admm["rho"].value == 1e-3
    assert admm["granularity"].choices == ("filter",) and admm["admm_iters"].kind == "int"
    assert set(s.methods["magnitude"]) == DOC_HPS["magnitude"]
    assert s.methods["asfp"] == {"epochs": Dist("fixed", value=1.0)}
    trial = optuna.create_study().ask()
    const = s.suggest(trial, LENET)
    if trial.params["method"] == "admm":
        assert const["admm.rho"] == 1e-3 and "admm.rho" not in trial.params
        assert "admm.rho_mult" in trial.params


@pytest.mark.parametrize("d, fragment", [
    ({"methods": "all"}, "methods: must be a non-empty mapping of method -> hyperparameters, or "
                         "'declared'"),
    ({"methods": {"admm": "everything"}}, "methods.admm: must map hyperparameters"),
    ({"methods": {"admm": {"declared": "yes"}}}, "methods.admm.declared: must be true or false"),
    ({"methods": {"admm": {"declared": True, "rho": {"low": 1.0, "high": 5.0}}}},
     "methods.admm.rho: admm.rho must be in"),
])
def test_bad_declared_entries(d, fragment):
    with pytest.raises(UserError) as info:
        SearchSpace.from_dict(d, source="bad.yaml")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_declared_range_outside_the_valid_range_fails_at_load():
    """A method file's own mistake is caught like a YAML one, naming the method and field."""
    import dataclasses

    from autoprune.pruning.base import METHODS, Pruner, hp, register

    @register
    class _Bad(Pruner):
        name = "_bad_declared"

        @dataclasses.dataclass
        class Params:
            k: float = hp(0.5, 0.0, 1.0, search=(0.1, 2.0))

        def final_masks(self):
            return {}

    try:
        with pytest.raises(UserError, match=r"^x\.yaml: methods\._bad_declared\.k: .*must be in "
                                            r"\[0\.0, 1\.0\], got 2\.0$"):
            SearchSpace.from_dict({"methods": "declared"}, source="x.yaml")
    finally:
        METHODS.pop("_bad_declared", None)


def test_hp_search_metadata_and_abstract_pruner():
    import dataclasses

    from autoprune.pruning.base import Pruner, hp

    @dataclasses.dataclass
    class P:
        a: float = hp(1.0, 0.0, 10.0, search=(0.5, 2.0), log=True)
        b: str = hp("x", choices=("x", "y"), search_choices=("x", "y"))
        c: int = hp(3, 1, 9)

    class M(Pruner):
        Params = P

    assert M.search_space() == {"a": {"low": 0.5, "high": 2.0, "log": True},
                                "b": {"choices": ["x", "y"]}}
    assert [d.get("search") for d in M.describe()] == [
        {"low": 0.5, "high": 2.0, "log": True}, {"choices": ["x", "y"]}, None]
    with pytest.raises(TypeError, match="abstract"):  # final_masks is the one required method
        M(None, {}, None)
    with pytest.raises(ValueError):
        hp(1.0, search=(0, 1), search_choices=(0, 1))


def test_search_tracking_and_export_never_name_a_method():
    """Adding a method is one file: no module outside `pruning/` knows a method by name."""
    import autoprune

    root = Path(autoprune.__file__).parent
    files = [f for f in sorted(root.rglob("*.py")) if "pruning" not in f.relative_to(root).parts]
    assert any("space" in f.name for f in files) and len(files) > 10
    for f in files:
        text = f.read_text()
        for method in load_all():
            assert f'"{method}"' not in text and f"'{method}'" not in text, (f.name, method)


def test_exponent_numbers_are_floats_in_space_and_study_files(tmp_path):
    """`1e-3` and `1.0e6` are strings to PyYAML (YAML 1.1); users mean numbers (YAML 1.2)."""
    from autoprune.study import load_study

    space_file = tmp_path / "space.yaml"
    space_file.write_text("methods:\n  admm: {rho: {low: 1e-4, high: 1e-1, log: true}}\n"
                          "finetune: {lr: 5e-4}\n")
    space = SearchSpace.load(space_file)
    rho = space.methods["admm"]["rho"]
    assert (rho.low, rho.high) == (1e-4, 1e-1)
    assert space.finetune["lr"].value == 5e-4

    study_file = tmp_path / "study.yaml"
    study_file.write_text("model: lenet-digits\ndataset: digits\n"
                          "dense: {lr: 1e-3, epochs: 2}\nfinetune: {weight_decay: 5.0e0}\n")
    study = load_study(str(study_file))
    assert study.dense.lr == 1e-3 and isinstance(study.dense.epochs, int)
    assert study.finetune.weight_decay == 5.0
    # strings that only look numeric stay strings; the recipe then names the bad key
    study_file.write_text("model: lenet-digits\ndataset: digits\ndense: {lr: 1e}\n")
    with pytest.raises(UserError, match="lr must be a number"):
        load_study(str(study_file))


def test_allocation_prior_key():
    base = {"methods": {"magnitude": {}}}
    assert SearchSpace.from_dict(base).prior == "size"
    assert SearchSpace.from_dict({**base, "sparsity": {"prior": "none"}}).prior == "none"
    with pytest.raises(UserError, match="sparsity.prior"):
        SearchSpace.from_dict({**base, "sparsity": {"prior": "flops"}})


def test_prior_strength_key():
    """A searched strength is one more parameter of sampled trials only; a config without it
    (made before it was searched) decodes to the default prior, and it needs prior: size."""
    base = {"methods": {"magnitude": {"gradual": False}},
            "sparsity": {"split": ["sampled", "global"]}}
    assert SearchSpace.from_dict(base).prior_strength.value == 0.5
    searched = copy.deepcopy(base)
    searched["sparsity"]["prior_strength"] = {"low": 0.0, "high": 1.5}
    s = SearchSpace.from_dict(searched)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        const = s.suggest(trial, LENET)
        plan = s.decode({**trial.params, **const}, LENET)
        seen.add(plan.split)
        assert ("prior_strength" in trial.params) == (plan.split == "sampled")
        if plan.split == "sampled":
            assert plan.prior_strength == trial.params["prior_strength"]
            assert 0.0 <= plan.prior_strength <= 1.5
    assert seen == {"sampled", "global"}
    old = {"method": "magnitude", "split": "sampled", "target": 1.0,
           **{f"alloc.{n}": 0.5 for n in LENET}}
    assert s.decode(old, LENET).prior_strength == 0.5
    fixed = copy.deepcopy(base)
    fixed["sparsity"]["prior_strength"] = 1.2
    assert SearchSpace.from_dict(fixed).decode(old, LENET).prior_strength == 1.2
    fixed["sparsity"]["prior"] = "none"
    with pytest.raises(UserError, match="prior_strength: only applies with prior: size"):
        SearchSpace.from_dict(fixed)


def test_split_key():
    """`sparsity.split` chooses how a budget is split; a space without it is sampled only, and
    its configs (which carry no `split`) still decode."""
    base = {"methods": {"magnitude": {"gradual": False}}}
    plain = SearchSpace.from_dict(base)
    assert plain.split == ("sampled",)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    const = plain.suggest(trial, LENET)
    assert "split" not in trial.params and "split" not in const
    assert plain.decode({**trial.params, **const}, LENET).split == "sampled"
    only = SearchSpace.from_dict({**base, "sparsity": {"split": "global"}})
    trial = study.ask()
    const = only.suggest(trial, LENET)
    assert const["split"] == "global" and not any(k.startswith("alloc.") for k in trial.params)
    plan = only.decode({**trial.params, **const}, LENET)
    assert plan.split == "global" and plan.allocation == {}
    both = SearchSpace.from_dict({**base, "sparsity": {"split": ["sampled", "global"]}})
    cfg = {"method": "magnitude", "split": "global", "target": 0.9}
    assert both.decode(cfg, LENET).split == "global"
    with pytest.raises(UserError, match="split 'global' is not in"):
        plain.decode(cfg, LENET)
    for bad in (["sampled", "local"], [], ["global", "global"], 3):
        with pytest.raises(UserError, match="sparsity.split"):
            SearchSpace.from_dict({**base, "sparsity": {"split": bad}})
