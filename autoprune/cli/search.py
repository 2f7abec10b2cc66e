"""CLI commands of the search side: `search`, `report`, `ui`, and the printed front."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from . import progress_log


def _number(kind: type, minimum: float):
    """An argparse type: `kind` (int or float) at least `minimum`, else a one-line error."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
        if not v >= minimum:  # (also refuses nan)
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text}")
        return v
    return parse


_positive_int = _number(int, 1)
_non_negative_int = _number(int, 0)
_non_negative_float = _number(float, 0)


def cmd_search(args: argparse.Namespace) -> int:
    """Exit codes: 0 done (or the time limit reached with trials completed), 1 every trial
    failed or none completed within the time limit, 2 bad input, 130 interrupted (resumable)."""
    from ..orchestration import SearchOptions, parse_duration, resume_hint, search

    opts = SearchOptions(
        study=args.study, space=args.space, budget=args.budget, trials=args.trials,
        time_limit=parse_duration(args.time_limit), workers=args.workers,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        sampler=args.sampler, objective=args.objective, scheduler=args.scheduler,
        seed=args.seed, out=args.out, data_root=args.data_root, ray_address=args.ray_address,
        tracking_uri=args.tracking_uri, optuna_storage=args.optuna_storage,
        tune_storage=args.tune_storage, max_failures=args.max_failures, resume=args.resume,
        dense_checkpoint=args.dense_checkpoint, trial_workers=args.trial_workers,
        baselines=args.baselines, finalists=args.finalists, final_epochs=args.final_epochs)
    # Ray Tune prints hints on stdout; stdout carries only our table or the --json object.
    try:
        with contextlib.redirect_stdout(sys.stderr):
            progress_log(args.json)
            summary = search(opts)
    except KeyboardInterrupt:  # interrupted outside Tune's graceful stop (e.g. dense training)
        print(f"autoprune: search interrupted; the finished trials are kept. Resume with:\n"
              f"  {resume_hint(opts)}", file=sys.stderr)
        return 130
    best = summary.get("best")
    if best and best.get("checkpoint"):
        from ..reporting import measure_speedup

        best["cpu_speedup"] = measure_speedup(args.study, args.out, best["checkpoint"],
                                              data_root=args.data_root, seed=args.seed)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_front(summary)
        print(f"\nMLflow: autoprune ui --out {args.out}   "
              f"(tracking store {summary['tracking_uri']})")
    if summary["interrupted"]:
        print(f"autoprune: search interrupted ({summary['trials_completed']} trials completed, "
              f"{summary['trials_killed']} running trials stopped and recorded as killed). "
              f"Resume with:\n  {summary['resume_hint']}", file=sys.stderr)
        return 130
    if summary.get("time_limit_reached") and summary.get("open_ended"):
        print(f"autoprune: the search ran for its --time-limit: {summary['trials_completed']} "
              f"trials completed, {summary['trials_pruned']} stopped early, "
              f"{summary.get('trials_killed', 0)} running at the limit recorded as killed",
              file=sys.stderr)
        if summary["trials_completed"] == 0:
            return 1  # nothing to show for the time spent
    elif summary.get("time_limit_reached"):
        print(f"autoprune: --time-limit reached with {summary['trials_completed']} trials "
              f"completed; trials still running were stopped and recorded as killed. Continue "
              f"with:\n  {summary['resume_hint']}", file=sys.stderr)
        if summary["trials_completed"] == 0:
            return 1  # nothing to show for the time spent
    if summary["trials_completed"] == 0 and summary["trials_failed"] > 0:
        errors = "; ".join(summary["errors"][:3]) or "see the MLflow runs"
        print(f"autoprune: every trial failed ({summary['trials_failed']} of "
              f"{summary['trials_failed']}): {errors}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..reporting import report, trials_frame

    if args.csv:  # every trial, one row each (method, hyperparameters, sparsities, metrics)
        trials_frame(args.out, args.study, args.tracking_uri).to_csv(sys.stdout, index=False)
        return 0
    rows = report(args.out, args.study, tracking_uri=args.tracking_uri)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    dense_val = rows["metrics"].get("dense_val_accuracy")
    print(f"{'trial':>5} {'method':<12} {'val':>7} {'drop':>7} {'test':>7} {'flops':>7} "
          f"{'sparse':>7} {'params':>7} {'weights':>7}  run")
    for r in rows["pareto"]:
        val = r.get("val_accuracy")
        drop = dense_val - val if dense_val is not None and val is not None else None
        print(f"{r.get('trial', '-')!s:>5} {r.get('method') or '-':<12} {_f(val)} "
              f"{_f(drop, signed=True)} {_f(r.get('test_accuracy'))} {_f(r.get('flops_frac'))} "
              f"{_f(r.get('sparse_flops_frac'))} {_f(r.get('params_frac'))} "
              f"{_f(r.get('weights_frac'))}  {r.get('run_id', '')}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from ..reporting import serve_ui

    return serve_ui(args.out, host=args.host, port=args.port, tracking_uri=args.tracking_uri,
                    study=args.study, open_in_browser=args.open)


def add_commands(sub, common) -> None:
    p = sub.add_parser("search", help="search pruning methods, per-layer sparsity and "
                                      "hyperparameters under a budget (Ray Tune + Optuna)")
    common(p)
    p.add_argument("--space", default=None, help="search space YAML (default: the study's)")
    p.add_argument("--budget", default=None,
                   help="e.g. flops=0.4, params=0.02 or flops=0.4,params=0.3 "
                        "(default: the study's)")
    p.add_argument("--trials", type=_positive_int, default=None,
                   help="total number of trials (default: the study's; with --time-limit "
                        "and no --trials, trials start until the time is up)")
    p.add_argument("--time-limit", default=None,
                   help="stop starting trials after e.g. 30m (then the finalist stage runs)")
    p.add_argument("--workers", type=_positive_int, default=2, help="concurrent trials")
    p.add_argument("--cpus-per-trial", type=_non_negative_float, default=1.0)
    p.add_argument("--gpus-per-trial", type=_non_negative_float, default=0.0,
                   help="GPUs per trial, fractions allowed (e.g. 0.5); per trial worker "
                        "with --trial-workers")
    p.add_argument("--trial-workers", type=_positive_int, default=1,
                   help="run each trial data-parallel over N Ray Train workers (DDP), each "
                        "with --cpus-per-trial CPUs and --gpus-per-trial GPUs (default: 1)")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="do not start a new search from the hand baselines (one-shot and AGP "
                        "magnitude pruning at the full budget)")
    p.add_argument("--finalists", type=_non_negative_int, default=3,
                   help="retrain this many of the most accurate in-budget front points with "
                        "the full fine-tune at the end; best, report and export use them "
                        "(default 3; 0: none)")
    p.add_argument("--final-epochs", type=_positive_int, default=None,
                   help="fine-tune epochs of the finalists (default: as many as fit in their "
                        "share of the search's time before them, 3x to 25x the study's); a method "
                        "with a phase of its own (AGP, ADMM, L0) shares them with that phase "
                        "as its trial did")
    p.add_argument("--sampler", choices=["tpe", "nsga2", "random"], default="tpe")
    p.add_argument("--objective", choices=["accuracy", "front"], default="accuracy",
                   help="what the sampler optimises: accuracy (default), the most accurate "
                        "model within the budget; front: accuracy and the budgeted sizes, to "
                        "explore the whole trade-off (the front is recorded either way)")
    p.add_argument("--scheduler", choices=["asha", "none"], default="asha",
                   help="asha (default) stops weak trials early, comparing pruned models at "
                        "equal fine-tune epochs (told to Optuna as pruned); none runs every "
                        "trial to its end")
    p.add_argument("--ray-address", default=None,
                   help="join a running Ray cluster (ADDR or auto) instead of starting one")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///<out>/mlflow.db)")
    p.add_argument("--optuna-storage", default=None,
                   help="Optuna RDB URL (default: sqlite:///<out>/<study>/optuna.db)")
    p.add_argument("--tune-storage", default=None,
                   help="where Ray Tune keeps trial results and checkpoints: a path every node "
                        "mounts or s3://..., gs://... (default: <out>/<study>/tune)")
    p.add_argument("--max-failures", type=_non_negative_int, default=1,
                   help="times a trial whose worker died is retried from its checkpoint "
                        "(default: 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue the study's search in --out (after a crash, or to extend "
                        "it with a larger --trials)")
    p.add_argument("--dense-checkpoint", default=None,
                   help="start from this dense checkpoint instead of training one")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("report", help="print the Pareto front of the latest search from MLflow")
    p.add_argument("--out", default="autoprune-runs")
    p.add_argument("--study", default="digits-lenet")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--csv", action="store_true",
                   help="print every trial as CSV (method, hyperparameters, per-layer "
                        "sparsities, all metrics; `pareto` marks the front)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("ui", help="start the MLflow UI on the tracking store")
    p.add_argument("--out", default="autoprune-runs")
    p.add_argument("--study", default=None, help="open this study's runs directly")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the store to "
                        "everyone who can reach this machine)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--open", action="store_true",
                   help="open the printed URL in a browser (where this machine has one)")
    p.set_defaults(func=cmd_ui)


def _f(x, signed: bool = False, width: int = 7) -> str:
    """A number for the table, or '-' for a value the record does not have."""
    if not isinstance(x, (int, float)):
        return f"{'-':>{width}}"
    return format(x, f">{'+' if signed else ''}{width}.4f")


def print_front(summary: dict, stream=None) -> None:
    """The front as a table (stdout unless `stream`; looked up per call, tests swap it).

    The front is exact (every non-dominated feasible point, however inaccurate); the columns
    that make it readable: accuracy drop vs dense, FLOPs of the compacted model (what runs on
    dense hardware) and of the nonzero weights, params, weights, and whether it meets the budget.
    """
    stream = stream or sys.stdout
    d = summary["dense"]
    print(f"\nPareto front of {summary['study']} (budget {summary['budget']}; "
          f"{summary['trials_completed']} completed, {summary['trials_failed']} failed, "
          f"{summary['trials_pruned']} stopped early, {summary.get('trials_killed', 0)} "
          f"interrupted)", file=stream)
    dense_val = d.get("val_accuracy")
    print(f"dense: val {d['val_accuracy']:.4f} test {d['test_accuracy']:.4f}", file=stream)
    print(f"{'trial':>5} {'method':<12} {'val':>7} {'drop':>7} {'test':>7} {'flops':>7} "
          f"{'sparse':>7} {'params':>7} {'weights':>7} budget  hyperparameters", file=stream)
    for p in summary["pareto"]:
        hp = json.loads(p["hparams"]) if p.get("hparams") else {}
        hps = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in hp.items())
        val = p.get("val_accuracy")
        drop = dense_val - val if isinstance(val, (int, float)) and dense_val is not None \
            else None
        print(f"{p['trial']:>5} {p.get('method') or '-':<12} {_f(val)} {_f(drop, signed=True)} "
              f"{_f(p.get('test_accuracy'))} {_f(p.get('flops_frac'))} "
              f"{_f(p.get('sparse_flops_frac'))} {_f(p.get('params_frac'))} "
              f"{_f(p.get('weights_frac'))} {'met' if p.get('feasible', True) else 'over':>6}  "
              f"{hps}", file=stream)
    print("flops: MACs of the compacted model (dense hardware); sparse: MACs of the nonzero "
          "weights; drop: dense val - val", file=stream)
    finals = [f for f in summary.get("finalists") or [] if "val_accuracy" in f]
    if finals:
        print("finalists (retrained with a longer fine-tune; the table shows their accuracy):",
              file=stream)
        for f in finals:
            print(f"  trial {f['trial']:>3} {f.get('method') or '-':<12} val "
                  f"{_f(f.get('search_val_accuracy'))} -> {_f(f['val_accuracy'])}   test "
                  f"{_f(f.get('search_test_accuracy'))} -> {_f(f.get('test_accuracy'))}   "
                  f"{f.get('epochs')} epochs", file=stream)
    if summary.get("best"):
        b = summary["best"]
        print(f"best in budget: trial {b['trial']} ({b['method']}) val {b['val_accuracy']:.4f}",
              file=stream)
        if sp := b.get("cpu_speedup"):
            print(f"measured CPU speed-up of its compacted model: {sp['speedup']:.2f}x "
                  f"(batch {sp['batch']}, {sp['threads']} threads, median: dense "
                  f"{sp['dense_ms']:.3f} ms, compacted {sp['compacted_ms']:.3f} ms)",
                  file=stream)
        if b.get("rerun"):
            print(f"rerun it alone: {b['rerun']}", file=stream)
    else:
        print("no completed trial met the budget", file=stream)
