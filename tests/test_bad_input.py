"""Bad input: a one-line error naming the problem, exit code 2, no traceback, nothing changed.

A table of mistakes is driven through `autoprune.cli.main` in-process (a few need the session
Ray: those that get as far as checking the cluster's resources); each one runs against an output
folder that already holds files, which must stay byte-identical. Hypothesis then fuzzes the
parsers of budgets, search spaces and studies: whatever they are given, only `UserError` escapes.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoprune.budget import Budget
from autoprune.cli import main
from autoprune.errors import UserError
from autoprune.orchestration.space import SearchSpace
from autoprune.study import study_from_dict

GOOD_SPACE = "methods:\n  magnitude: {epochs: 0}\nfinetune: {epochs: 1}\n"

# name -> file text, written into the case's folder and referred to as {name}
FILES = {
    "study_bad_yaml.yaml": "model: [lenet-digits\ndataset: digits\n",
    "study_wrong_type.yaml": "model: lenet-digits\ndataset: digits\ntrials: many\n",
    "study_unknown_key.yaml": "model: lenet-digits\ndataset: digits\nmodle: lenet5\n",
    "study_list.yaml": "- model\n- dataset\n",
    "study_no_model.yaml": "dataset: digits\n",
    "study_bad_model.yaml": "model: nosuchnet\ndataset: digits\n",
    "study_bad_dataset.yaml": "model: lenet-digits\ndataset: nosuchdata\n",
    "study_bad_recipe.yaml": "model: lenet-digits\ndataset: digits\nfinetune: {lr: -1}\n",
    "space_bad_yaml.yaml": "methods:\n  magnitude: {epochs: [0\n",
    "space_unknown_key.yaml": GOOD_SPACE + "searchers: 3\n",
    "space_empty_methods.yaml": "methods: {}\n",
    "space_empty_file.yaml": "",
    "space_wrong_type.yaml": "methods:\n  magnitude: {epochs: {low: a, high: 2}}\n",
    "space_unknown_method.yaml": "methods:\n  pruneit: {}\n",
    "space_unknown_hp.yaml": "methods:\n  magnitude: {rho: 0.1}\n",
    "space_hp_out_of_range.yaml": "methods:\n  admm: {rho: {low: -1.0, high: 1.0}}\n",
    "space_bad_finetune.yaml": "methods:\n  magnitude: {}\nfinetune: {epochs: many}\n",
    "space_bad_regex.yaml": GOOD_SPACE + "sparsity: {exclude: ['fc(']}\n",
    "not_a_checkpoint.pt": "this is not a checkpoint\n",
}

# (id, arguments, words the error line must contain). {out} is the pre-existing output folder,
# {dir} the case's folder, {name} a file of FILES, {other_model} a real checkpoint of lenet300.
CASES = [
    ("budget-range", ["search", "--budget", "flops=1.5"], "must be a fraction"),
    ("budget-key", ["search", "--budget", "macs=0.4"], "unknown budget key"),
    ("budget-form", ["search", "--budget", "flops"], "is not key=value"),
    ("budget-nan", ["search", "--budget", "flops=nan"], "finite"),
    ("budget-empty", ["search", "--budget", " "], "empty budget"),
    ("study-unknown", ["search", "--study", "nosuchstudy"], "unknown study"),
    ("study-yaml", ["search", "--study", "{study_bad_yaml.yaml}"], "not valid YAML"),
    ("study-type", ["search", "--study", "{study_wrong_type.yaml}"], "'trials'"),
    ("study-key", ["search", "--study", "{study_unknown_key.yaml}"], "unknown key(s) modle"),
    ("study-list", ["search", "--study", "{study_list.yaml}"], "must be a mapping"),
    ("study-no-model", ["search", "--study", "{study_no_model.yaml}"], "'model' is required"),
    ("study-recipe", ["search", "--study", "{study_bad_recipe.yaml}"], "'finetune'"),
    ("model-unknown", ["search", "--study", "{study_bad_model.yaml}"], "unknown model"),
    ("dataset-unknown", ["search", "--study", "{study_bad_dataset.yaml}"], "unknown dataset"),
    ("data-missing", ["search", "--study", "lenet300-mnist", "--data-root", "{dir}"],
     "mnist"),
    ("space-missing", ["search", "--space", "{dir}/nosuch.yaml"], "not found"),
    ("space-yaml", ["search", "--space", "{space_bad_yaml.yaml}"], "not valid YAML"),
    ("space-key", ["search", "--space", "{space_unknown_key.yaml}"], "searchers"),
    ("space-empty-methods", ["search", "--space", "{space_empty_methods.yaml}"],
     "non-empty mapping"),
    ("space-empty-file", ["search", "--space", "{space_empty_file.yaml}"], "mapping"),
    ("space-type", ["search", "--space", "{space_wrong_type.yaml}"], "finite number"),
    ("space-method", ["search", "--space", "{space_unknown_method.yaml}"], "pruneit"),
    ("space-hp", ["search", "--space", "{space_unknown_hp.yaml}"], "no hyperparameter 'rho'"),
    ("space-hp-range", ["search", "--space", "{space_hp_out_of_range.yaml}"], "admm.rho"),
    ("space-finetune", ["search", "--space", "{space_bad_finetune.yaml}"], "finetune.epochs"),
    ("space-regex", ["search", "--space", "{space_bad_regex.yaml}"], "invalid regex"),
    ("trials-zero", ["search", "--trials", "0"], "--trials"),
    ("workers-text", ["search", "--workers", "many"], "--workers"),
    ("cpus-negative", ["search", "--cpus-per-trial", "-1"], "--cpus-per-trial"),
    ("time-limit", ["search", "--time-limit", "soon"], "--time-limit"),
    ("sampler", ["search", "--sampler", "grid"], "--sampler"),
    ("objective", ["search", "--objective", "speed"], "--objective"),
    ("unknown-option", ["search", "--trails", "3"], "--trails"),
    ("gpus-too-many", ["search", "--gpus-per-trial", "64"], "--gpus-per-trial 64"),
    ("cpus-too-many", ["search", "--cpus-per-trial", "512"], "--cpus-per-trial 512"),
    ("ray-address", ["search", "--ray-address", "no-port-here"], "--ray-address"),
    ("optuna-storage", ["search", "--optuna-storage", "nosuchdb://x/y"], "--optuna-storage"),
    ("out-unwritable", ["search", "--out", "{dir}/not_a_checkpoint.pt/runs"],
     "cannot write to --out"),
    ("dense-not-checkpoint", ["search", "--dense-checkpoint", "{not_a_checkpoint.pt}"],
     "not a readable weights-only checkpoint"),
    ("dense-other-model", ["search", "--dense-checkpoint", "{other_model}"],
     "does not fit model"),
    ("dense-missing", ["search", "--dense-checkpoint", "{dir}/nosuch.pt"], "not found"),
    ("prune-method", ["prune", "--method", "nosuch"], "unknown method"),
    ("prune-set-range", ["prune", "--method", "admm", "--set", "rho=-1"], "admm.rho"),
    ("prune-set-unknown", ["prune", "--method", "admm", "--set", "nosuch=1"], "nosuch"),
    ("prune-set-type", ["prune", "--method", "magnitude", "--set", "epochs=abc"],
     "magnitude.epochs"),
    ("prune-set-form", ["prune", "--method", "magnitude", "--set", "epochs"], "key=value"),
    ("prune-budget", ["prune", "--method", "magnitude", "--budget", "flops=0"],
     "must be a fraction"),
    ("prune-layer-name", ["prune", "--method", "magnitude", "--layer-sparsity", "conv9=0.5"],
     "conv9"),
    ("prune-layer-value", ["prune", "--method", "magnitude", "--layer-sparsity", "conv1=1.5"],
     "must be in [0, 1)"),
    ("prune-finetune-key", ["prune", "--method", "magnitude", "--finetune", "bogus=1"],
     "--finetune 'bogus=1'"),
    ("prune-finetune-type", ["prune", "--method", "magnitude", "--finetune", "epochs=abc"],
     "epochs must be a number"),
]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    from autoprune.models import build_model

    d = tmp_path_factory.mktemp("bad-input")
    for name, text in FILES.items():
        (d / name).write_text(text)
    torch.save(build_model("lenet300", 10, 1, 28).state_dict(), d / "other_model.pt")
    return d


@pytest.mark.parametrize(("args", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(args, words, case_dir, tmp_path,
                                                          ray_session, capsys):
    out = tmp_path / "out"
    (out / "digits-lenet").mkdir(parents=True)
    (out / "earlier.txt").write_text("results of an earlier run\n")
    (out / "digits-lenet" / "notes.md").write_text("keep me\n")
    before = tree_hashes(out)
    subst = {"out": str(out), "dir": str(case_dir), "other_model": str(case_dir / "other_model.pt"),
             **{name: str(case_dir / name) for name in FILES}}
    argv = list(args)
    for key, value in subst.items():
        argv = [a.replace("{" + key + "}", value) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's errors
        rc = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("autoprune"), err
    error_lines = [ln for ln in lines if "error:" in ln]
    assert len(error_lines) == 1, err
    assert words in error_lines[0], error_lines[0]
    after = tree_hashes(out)
    assert {k: after.get(k) for k in before} == before, "existing files unchanged"
    new = set(after) - set(before)  # at most the study folder's lock file, empty
    assert all(Path(f).name == ".lock" for f in new), sorted(new)


# ---- fuzzing the parsers -------------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
_SPACE_WORDS = ["methods", "finetune", "sparsity", "description", "magnitude", "admm", "l0",
                "asfp", "adaptive_l1", "radmm", "epochs", "gradual", "rho", "low", "high",
                "log", "int", "step", "choices", "lr", "batch_size", "optimizer",
                "target_floor", "allocation", "max_sparsity", "exclude", "groups", "conv1"]
_STUDY_WORDS = ["name", "model", "dataset", "data", "dense", "prune", "finetune", "space",
                "budget", "trials", "val_fraction", "train_subset", "epochs", "lr",
                "optimizer", "schedule", "milestones", "lenet-digits", "digits"]


def _trees(words: list[str]):
    keys = st.one_of(st.sampled_from(words), st.text(max_size=8), st.integers(-3, 3))
    return st.recursive(
        st.one_of(_scalars, st.sampled_from(words)),
        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                st.dictionaries(keys, inner, max_size=5)),
        max_leaves=20)


def _top(words: list[str]):
    return st.dictionaries(st.sampled_from(words), _trees(words), max_size=5)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=30),
                 st.lists(st.tuples(st.sampled_from(["flops", "params", "FLOPS", "x", ""]),
                                    st.sampled_from(["=", "", "=="]),
                                    st.one_of(st.floats().map(repr), st.text(max_size=6),
                                              st.integers(-5, 200).map(lambda i: f"{i}%"))),
                          max_size=3).map(lambda items: ",".join("".join(t) for t in items)),
                 _scalars))
def test_budget_parser_only_raises_user_errors(text):
    try:
        b = Budget.parse(text)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert b.limits and all(0 < v <= 1 for v in b.limits.values())
    assert Budget.parse(str(b)) == b  # what it prints, it reads back


@settings(max_examples=300, deadline=None)
@given(st.one_of(_top(_SPACE_WORDS), _trees(_SPACE_WORDS)))
def test_space_loader_only_raises_user_errors(d):
    try:
        space = SearchSpace.from_dict(d)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert space.methods


@settings(max_examples=300, deadline=None)
@given(st.one_of(_top(_STUDY_WORDS), _trees(_STUDY_WORDS)))
def test_study_loader_only_raises_user_errors(d):
    try:
        study = study_from_dict(d)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(study.model, str) and isinstance(study.dataset, str)


# ---- security invariants -------------------------------------------------------------------------

def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name):
            yield node, f"{node.func.value.id}.{node.func.attr}"


def test_checkpoints_and_yaml_are_only_read_safely():
    """Every torch.load passes weights_only=True; YAML only through safe_load; no pickle."""
    import autoprune

    root = Path(autoprune.__file__).parent
    loads = 0
    for path in root.rglob("*.py"):
        for call, name in _calls(ast.parse(path.read_text())):
            where = f"{path.relative_to(root)}:{call.lineno}"
            if name == "torch.load":
                loads += 1
                kw = {k.arg: k.value for k in call.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) \
                    and kw["weights_only"].value is True, where
            assert name not in ("yaml.load", "yaml.unsafe_load", "yaml.full_load",
                                "pickle.load", "pickle.loads", "cloudpickle.load"), where
    assert loads >= 3  # dense baselines, exports, trial checkpoints


def test_ui_binds_loopback_unless_told():
    from autoprune.cli import build_parser

    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"
    assert build_parser().parse_args(["ui", "--host", "0.0.0.0"]).host == "0.0.0.0"


def test_user_model_code_is_imported_only_when_named(tmp_path, monkeypatch):
    """Listing or loading studies never imports a model module; building one named does."""
    import sys

    from autoprune.cli import main as cli_main
    from autoprune.models import build_model
    from autoprune.study import load_study

    (tmp_path / "usermodels_probe.py").write_text(
        "import torch\nIMPORTED = True\n"
        "def net(num_classes=10):\n    return torch.nn.Linear(64, num_classes)\n")
    study = tmp_path / "mine.yaml"
    study.write_text("model: usermodels_probe:net\ndataset: digits\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli_main(["studies", "--json"]) == 0
    assert load_study(str(study)).model == "usermodels_probe:net"
    assert "usermodels_probe" not in sys.modules
    build_model("usermodels_probe:net", 10)
    assert sys.modules.pop("usermodels_probe").IMPORTED
