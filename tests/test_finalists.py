"""The finalist stage: the top in-budget front points retrained with the full fine-tune.

A real (tiny) search on the offline digits study with real Ray, Optuna and MLflow: the chosen
trials are retrained for longer, `best`, the front, `report` and `export` use the retrained
models, and the MLflow finalist runs hang under their trials. Resuming after the driver was
killed during the stage is tested in test_reliability.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch
from conftest import QUICK_SPACE
from mlflow import MlflowClient

import autoprune
from autoprune import store
from autoprune.orchestration.finalists import choose
from autoprune.record import TrialRecord

STUDY = "digits-lenet"


def _rec(trial: int, val: float, flops: float, params: float, feasible: bool = True,
         loss: float | None = None) -> TrialRecord:
    return TrialRecord(trial=trial, method="magnitude", val_accuracy=val, flops_frac=flops,
                       params_frac=params, layer_sparsity={"conv1": 0.5}, feasible=feasible,
                       val_loss=loss)


def test_choose_takes_the_most_accurate_in_budget_trials():
    records = [_rec(0, 0.90, 0.10, 0.30),  # on the front for its FLOPs, but least accurate
               _rec(1, 0.95, 0.39, 0.35, loss=0.20),
               _rec(2, 0.99, 0.45, 0.45, feasible=False),  # over budget: never a finalist
               _rec(3, 0.93, 0.20, 0.20),
               _rec(4, 0.95, 0.30, 0.30, loss=0.10)]  # ties trial 1, lower loss: before it
    assert [r.trial for r in choose(records, 2)] == [4, 1]
    assert [r.trial for r in choose(records, 3)] == [4, 1, 3]
    assert [r.trial for r in choose(records, 10)] == [4, 1, 3, 0]
    assert choose(records, 0) == []


@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory) -> tuple[Path, dict]:
    """One search of 4 quick trials (a 0.5-epoch AGP ramp, 1 fine-tune epoch) with 2
    finalists of 3 fine-tune epochs, which their ramp shares (`stretch`)."""
    from autoprune.pipeline import Workbench
    from autoprune.study import load_study

    out = tmp_path_factory.mktemp("finalists") / "runs"
    Workbench.open(load_study(STUDY), out, device="cpu")  # the dense cache, trained once
    space = out.parent / "space.yaml"
    space.write_text(QUICK_SPACE.replace("gradual: false", "gradual: true")
                     .replace("epochs: 0\n", "epochs: 0.5\n"))
    summary = autoprune.search(STUDY, "flops=0.4", space=str(space), trials=4, workers=2,
                               out=str(out), finalists=2, final_epochs=3)
    return out, summary


def test_finalists_retrain_and_best_export_report_use_them(searched, tmp_path):
    out, summary = searched
    finals = summary["finalists"]
    # 3.5 epochs in all (ramp 0.5 + 3), shared 1:2 as the trial's 0.5 + 1: ramp 7/6, FT 2
    assert len(finals) == 2 and all(f["epochs"] == 2 for f in finals)
    ot = optuna.load_study(study_name=STUDY, storage=store.optuna_url(out / STUDY))
    for f in finals:
        result = ot.user_attrs[f"finalist.{f['trial']}"]
        assert result["phase_epochs"] == pytest.approx(3.5 / 3)
        assert json.loads(result["hparams"])["epochs"] == pytest.approx(3.5 / 3)
    search_time = {r.trial: r for r in store.trial_records(ot, finalists=False)}
    # the most accurate in-budget trials (ties: the lower validation loss, kept for each)
    ranked = sorted((r for r in search_time.values() if r.feasible),
                    key=lambda r: (-r.val_accuracy, r.val_loss, r.flops_frac, r.params_frac))
    assert all(r.val_loss is not None and r.val_loss > 0 for r in ranked)
    assert sorted(f["trial"] for f in finals) == sorted(r.trial for r in ranked[:2])
    assert all(ot.user_attrs[f"finalist.{f['trial']}"]["val_loss"] > 0 for f in finals)
    for f in finals:  # chosen by search-time accuracy, among in-budget trials
        assert search_time[f["trial"]].feasible
        assert f["search_val_accuracy"] == search_time[f["trial"]].val_accuracy
        ckpt = Path(ot.user_attrs[f"finalist.{f['trial']}"]["checkpoint"])
        assert ckpt.name == f"final-{f['trial']}.pt"
        # the retrained weights are another model than the trial's (3.5 epochs, not 1.5)
        a = torch.load(ckpt, weights_only=True)
        b = torch.load(search_time[f["trial"]].checkpoint, weights_only=True)
        assert any(not torch.equal(a[k], b[k]) for k in a)
    # best: a point of the printed front, with the finalist's numbers; the most accurate
    # retrained one where the front has any (a short trial is not compared with them)
    best = summary["best"]
    assert best is not None and best["trial"] in {p["trial"] for p in summary["pareto"]}
    by_trial = {f["trial"]: f for f in finals}
    on_front = [p for p in summary["pareto"] if p["trial"] in by_trial]
    pool = on_front or summary["pareto"]
    assert best["val_accuracy"] == max(p["val_accuracy"] for p in pool)
    assert best["finalist"] == bool(on_front)
    for p in on_front:  # the front shows a retrained trial with its finalist's numbers
        f = by_trial[p["trial"]]
        assert p["finalist"] and p["val_accuracy"] == f["val_accuracy"]
        assert p["test_accuracy"] == f["test_accuracy"]
        assert p["search_val_accuracy"] == f["search_val_accuracy"]
    if best["trial"] in by_trial:  # the rerun command repeats the finalist, ramp and all
        assert "--finetune epochs=2" in best["rerun"]
        assert f"--set epochs={3.5 / 3}" in best["rerun"]

    # MLflow: one finalist run per finalist, nested under its trial's run; the trial run
    # shows the retrained accuracy and keeps the search-time one under search/
    client = MlflowClient(store.default_tracking_uri(out))
    exp = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trial_runs = {int(r.data.tags["autoprune.trial"]): r for r in runs
                  if r.data.tags.get("autoprune.role") == "trial"}
    final_runs = [r for r in runs if r.data.tags.get("autoprune.role") == "finalist"]
    assert sorted(int(r.data.tags["autoprune.finalist_of"]) for r in final_runs) == \
        sorted(f["trial"] for f in finals)
    for r in final_runs:
        n = int(r.data.tags["autoprune.finalist_of"])
        f = next(f for f in finals if f["trial"] == n)
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == trial_runs[n].info.run_id
        assert r.data.metrics["val_accuracy"] == pytest.approx(f["val_accuracy"])
        steps = client.get_metric_history(r.info.run_id, "finetune/val_accuracy")
        assert len(steps) == 2, "two fine-tune epochs, not the trial's one"
        ramp = client.get_metric_history(r.info.run_id, "prune/val_accuracy")
        assert len(ramp) == 2, "a ramp of 7/6 epochs (two epoch records), not the trial's 0.5"
        assert json.loads(r.data.params["hparams"])["epochs"] == pytest.approx(3.5 / 3)
        tm = trial_runs[n].data.metrics
        assert tm["val_accuracy"] == pytest.approx(f["val_accuracy"])
        assert tm["search/val_accuracy"] == pytest.approx(f["search_val_accuracy"])

    # report reads the retrained accuracy from MLflow
    rows = autoprune.report(str(out), STUDY)
    row = rows[rows["trial"] == best["trial"]].iloc[0]
    assert row["val_accuracy"] == pytest.approx(best["val_accuracy"])
    assert sorted(rows[rows["finalist"]]["trial"]) == sorted(f["trial"] for f in finals)

    # export ships the finalist's weights and reproduces its test accuracy from the file
    card = autoprune.export(str(out), STUDY, tmp_path / "best")
    assert card["source"]["checkpoint"] == best["checkpoint"]
    assert card["exported"]["test_accuracy"] == pytest.approx(best["test_accuracy"], abs=1e-9)


def test_resume_with_every_finalist_done_repeats_nothing(searched):
    out, first = searched
    ot = optuna.load_study(study_name=STUDY, storage=store.optuna_url(out / STUDY))
    before = {k: json.dumps(v, sort_keys=True) for k, v in ot.user_attrs.items()
              if k.startswith(store.FINALIST_PREFIX)}
    space = out.parent / "space.yaml"
    again = autoprune.search(STUDY, "flops=0.4", space=str(space), trials=4, workers=2,
                             out=str(out), finalists=2, final_epochs=3, resume=True)
    ot = optuna.load_study(study_name=STUDY, storage=store.optuna_url(out / STUDY))
    after = {k: json.dumps(v, sort_keys=True) for k, v in ot.user_attrs.items()
             if k.startswith(store.FINALIST_PREFIX)}
    assert after == before
    assert again["best"]["trial"] == first["best"]["trial"]
    assert again["best"]["val_accuracy"] == first["best"]["val_accuracy"]
    shutil.rmtree(out / STUDY / "tune", ignore_errors=True)


def test_time_matched_finalist_length():
    """By default a finalist fine-tunes for as many epochs as fit in its share of the trial
    stage's time, never fewer than the floor nor more than the ceiling."""
    from autoprune.orchestration.finalists import finalist_seconds, pack, plan

    assert finalist_seconds(60.0, k=3, at_once=2) == 30.0  # two rounds of finalists
    assert finalist_seconds(60.0, k=2, at_once=2) == 60.0
    # on CPUs every finalist runs at once on a share of the trials' cores, none left idle
    assert pack(3, workers=2, cpus=1.0, gpus=0.0) == (3, 0.6666)
    assert 3 * pack(3, 2, 1.0, 0.0)[1] <= 2.0  # (Ray can place all three)
    assert pack(1, workers=4, cpus=1.0, gpus=0.0) == (1, 4.0)
    assert pack(2, workers=3, cpus=1.0, gpus=0.0) == (2, 1.0)  # whole CPUs above one
    assert pack(1, workers=4, cpus=1.0, gpus=0.0, available=2.0) == (1, 2.0)
    assert pack(3, workers=2, cpus=1.0, gpus=0.5) == (2, 1.0)  # a GPU is not split further
    # one process per finalist: never more CPUs than the largest node has (two 1-CPU nodes)
    assert pack(1, workers=2, cpus=1.0, gpus=0.0, available=2.0, node=1.0) == (1, 1.0)
    assert pack(3, workers=2, cpus=1.0, gpus=0.0, available=2.0, node=1.0) == (3, 0.6666)
    spec = plan(_rec(0, 0.9, 0.3, 0.3), epochs=12, seconds=30.0, max_epochs=100)
    assert spec.epochs_for(1.0) == 30
    assert spec.epochs_for(10.0) == 12  # the floor
    assert spec.epochs_for(0.01) == 100  # the ceiling
    # the time spent timing an epoch, and the trial's own phase (stretch adds it back), are
    # part of the finalist's time: its whole length fits in it
    assert spec.epochs_for(0.5, phase=2.5, spent=5.0) == 47  # 25 s left: 50 epochs, 2.5 phase
    assert spec.epochs_for(1.0, phase=2.0, spent=30.0) == 12  # still the floor
    assert plan(_rec(0, 0.9, 0.3, 0.3), epochs=12).epochs_for(0.01) == 12  # --final-epochs


def test_refit_fills_the_time_left_at_the_fine_tunes_pace():
    """Once the masks are fixed, a time-fitted finalist's fine-tune takes what is left at the
    fine-tune's measured pace, within [what its trial had, max_epochs]."""
    from autoprune.orchestration.finalists import plan

    spec = plan(_rec(0, 0.9, 0.3, 0.3), epochs=12, seconds=30.0, max_epochs=100)
    # an epoch takes 2 s and 20 s are left: 10 epochs, not the plan's 15
    assert spec.refit(15, left=20.0, epoch_seconds=2.0, least=4) == 10
    assert spec.refit(15, left=-3.0, epoch_seconds=2.0, least=4) == 4
    assert spec.refit(15, left=1e4, epoch_seconds=2.0, least=4) == 100
    assert plan(_rec(0, 0.9, 0.3, 0.3), epochs=12).refit(15, 20.0, 2.0, 4) == 15


def test_the_fine_tune_is_as_long_as_refit_says(pretrained, digits):
    """`prune_and_finetune` asks `refit` once the masks are fixed, with the fine-tune's timed
    seconds per epoch, and fine-tunes for the epochs it returns instead of the recipe's;
    the timing runs on a copy (the same weights as without it)."""
    from conftest import fresh_digits_lenet

    from autoprune.engine import Recipe
    from autoprune.graph import build_channel_graph
    from autoprune.pruning.runner import prune_and_finetune

    def run(refit):
        model = fresh_digits_lenet(pretrained)
        res = prune_and_finetune(model, digits, build_channel_graph(model, digits.example()),
                                 "magnitude", {"conv2": 0.5, "fc1": 0.8},
                                 {"gradual": True, "epochs": 1.0}, Recipe(epochs=0, batch_size=64),
                                 Recipe(epochs=2, batch_size=64), seed=0, refit=refit)
        return model, res

    seen: list[float] = []
    model, res = run(lambda seconds: seen.append(seconds) or 2)
    assert len(seen) == 1 and seen[0] > 0
    assert sum(r["phase"] == "finetune" for r in res.history) == 2
    plain, _ = run(None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 plain.state_dict().values(), strict=True))
    _, longer = run(lambda seconds: 3)
    assert sum(r["phase"] == "finetune" for r in longer.history) == 3


def test_stretch_shares_the_finalist_length_as_the_trial_did():
    """A method with its own phase gets the same share of a finalist's epochs as it had of
    its trial's (an AGP ramp of 2 + 4 fine-tune epochs at 23 becomes 25/6 times longer); a
    one-shot method, or a finalist no longer than its trial, keeps every epoch for the
    fine-tune; a length at its valid maximum stays there and the fine-tune takes the rest."""
    from autoprune.orchestration.finalists import Finalist, stretch
    from autoprune.pruning import get_method

    def phase_of(method: str):
        cls = get_method(method)
        return lambda p: (float(cls.make_params(**p).epochs) if p.get("gradual", True) and
                          "epochs" in p else 0.0)

    def spec(method: str, params: dict) -> Finalist:
        return Finalist(trial=0, method=method, params=params, targets={}, finetune={})

    agp = spec("magnitude", {"gradual": True, "epochs": 2.0, "norm": 1})
    params, ft = stretch(agp, 23, 4.0, phase_of("magnitude"))
    assert params == {"gradual": True, "epochs": pytest.approx(2.0 * 25 / 6), "norm": 1}
    assert ft == 17  # 25 - 8.33, rounded: the whole length is unchanged
    one_shot = spec("magnitude", {"gradual": False, "epochs": 2.0})
    assert stretch(one_shot, 23, 4.0, phase_of("magnitude")) == (one_shot.params, 23)
    assert stretch(agp, 4, 4.0, phase_of("magnitude")) == (agp.params, 4)  # not longer
    # ADMM's W-steps are its length (iterations and rho stay); 20 epochs each at most
    admm = spec("admm", {"admm_iters": 4, "epochs_per_iter": 5.0, "rho": 1e-3})
    params, ft = stretch(admm, 76, 4.0, lambda p: p["admm_iters"] * p["epochs_per_iter"])
    assert params == {"admm_iters": 4, "epochs_per_iter": 20.0, "rho": 1e-3}
    assert ft == 16  # 96 in all, 80 of them W-steps at the cap
    assert get_method("taylor").stretched({"batches": 8}, 4.0) == {"batches": 8}  # no length
