"""The `autoprune` command line: parse arguments, call the Python API, print, set the exit code.

Exit codes: 0 success, 1 the work ran but failed (e.g. every trial failed), 2 bad input
(a one-line message, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from ..errors import UserError

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own tables stay off (verbose=0)
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _quiet_libraries() -> None:
    """Our progress lines are the output; the libraries' info chatter is not."""
    import warnings

    for name in ("optuna", "mlflow", "alembic", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Tune's result analysis warns about trials stopped before their first report (a time
    # limit, Ctrl-C); our own summary says what happened to them.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*experimental feature.*")
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass


# -q / -v of this invocation: -1 quiet (warnings and errors only), 0 progress, 1 debug.
_verbosity = 0


def progress_log(quiet: bool) -> Callable[[str], None]:
    """Show the one logger of autoprune ("autoprune", INFO: progress lines) on stderr, unless
    `quiet` (--json: only the result is printed) or -q; -v adds debug lines. Returns `info`."""
    from .progress import ProgressHandler

    logger = logging.getLogger("autoprune")
    if not any(isinstance(h, ProgressHandler) for h in logger.handlers):
        logger.addHandler(ProgressHandler())
        logger.propagate = False
    if quiet or _verbosity < 0:
        logger.setLevel(logging.WARNING)
    else:
        logger.setLevel(logging.DEBUG if _verbosity > 0 else logging.INFO)
    return logger.info


def _verbosity_options(p: argparse.ArgumentParser, top: bool) -> None:
    """-q/-v before or after the command (`autoprune -q search` or `autoprune search -q`);
    on the sub-commands they default to SUPPRESS, so they never undo the top-level ones."""
    default = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on "
                   "stderr (no progress)", **({"default": False} if top else default))
    p.add_argument("-v", "--verbose", action="count", help="more detail on stderr (debug "
                   "lines, the libraries' info messages)", **({"default": 0} if top else default))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", default="digits-lenet",
                   help="built-in study name or path to a study YAML (default: digits-lenet)")
    p.add_argument("--out", default="autoprune-runs", help="output folder (default: %(default)s)")
    p.add_argument("--data-root", default=None,
                   help="dataset root (default: $AUTOPRUNE_DATA or ~/.cache/autoprune/data)")
    p.add_argument("--download", action="store_true",
                   help="download a missing torchvision dataset (needs network)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Bad arguments get one line and exit code 2, not argparse's usage block."""
    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]


def _cmd_studies(args: argparse.Namespace) -> int:
    from ..study import list_studies, study_text

    if args.show:
        print(study_text(args.show), end="")
        return 0
    studies = list_studies()
    if args.json:
        print(json.dumps([{"name": s.name, "model": s.model, "dataset": s.dataset,
                           "budget": s.budget, "trials": s.trials, "expects": s.expects,
                           "description": s.description} for s in studies], indent=2))
        return 0
    print(f"{'study':<18} {'model':<14} {'dataset':<14} {'budget':<12} {'trials':>6}  expects")
    for s in studies:
        print(f"{s.name:<18} {s.model:<14} {s.dataset:<14} {s.budget:<12} {s.trials:>6}  "
              f"{s.expects}")
    return 0


def _summary(cls: type) -> str:
    """First line of a method's class docstring, else of its module's."""
    doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
    return doc.strip().split("\n")[0]


def _cmd_methods(args: argparse.Namespace) -> int:
    import textwrap

    from ..pruning import load_all

    methods = {name: {"summary": _summary(cls),
                      "hyperparameters": cls.describe(), "differences": list(cls.differences)}
               for name, cls in sorted(load_all().items())}
    if args.json:
        print(json.dumps(methods, indent=2, default=str))
        return 0
    for name, m in methods.items():
        print(f"{name}: {m['summary']}")
        for h in m["hyperparameters"]:
            rng = f" [{h['low']}, {h['high']}]" if "low" in h else ""
            ch = f" {list(h['choices'])}" if "choices" in h else ""
            print(f"  {h['name']:<16} default {h['default']!s:<10}{rng}{ch}  {h.get('doc', '')}")
            if "search" in h:
                sp = h["search"]
                what = (f"{sp['choices']}" if "choices" in sp else
                        f"[{sp['low']}, {sp['high']}]{' log' if sp.get('log') else ''}")
                print(f"  {'':<16} searched {what}")
            if h.get("length"):
                print(f"  {'':<16} a phase length: finalists stretch it with their fine-tune")
        if m["differences"]:
            print("  differences from the paper:")
            for d in m["differences"]:
                print(textwrap.fill(d, width=96, initial_indent="    - ",
                                    subsequent_indent="      "))
    return 0


def _recipe_overrides(items: list[str]) -> dict:
    """`--finetune epochs=20 --finetune lr=1e-3` -> {'epochs': 20, 'lr': 0.001}."""
    from .. import yamlio
    from ..engine import Recipe

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in Recipe.__dataclass_fields__:
            raise UserError(f"--finetune '{item}': expected KEY=VALUE with KEY one of "
                            f"{', '.join(Recipe.__dataclass_fields__)}")
        out[key] = yamlio.loads(value, f"--finetune {key}")
    return out


def _cmd_prune(args: argparse.Namespace) -> int:
    from ..pruning import get_method

    params = get_method(args.method).parse_set(args.set or [])  # refuse bad input first
    from .. import api

    progress_log(args.json)
    m = api.prune(args.study, args.method, args.budget, params=params,
                  finetune=_recipe_overrides(args.finetune or []),
                  layer_sparsity=args.layer_sparsity, out=args.out, data_root=args.data_root,
                  seed=args.seed, checkpoint=args.dense_checkpoint, download=args.download)
    m.pop("history", None)
    if args.json:
        print(json.dumps(m, indent=2, default=float))
        return 0
    print(f"method            {m['method']} ({m['granularity']}) on {m['study']}")
    print(f"test accuracy     {m['test_accuracy']:.4f}  (dense {m['dense_test_accuracy']:.4f})")
    print(f"val accuracy      {m['val_accuracy']:.4f}  (dense {m['dense_val_accuracy']:.4f})")
    print(f"FLOPs kept        {m['flops_frac']:.4f}  (compacted {m['compact_flops_frac']:.4f})")
    print(f"params kept       {m['params_frac']:.4f}  (weight compression "
          f"{m['weight_compression']:.1f}x)")
    print(f"budget {m['budget']:<10} {'met' if m['within_budget'] else 'NOT met'}")
    print("layer sparsity    " + ", ".join(f"{k}={v:.3f}" for k, v in m["layer_sparsity"].items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="autoprune",
        description="AutoML search over neural-network pruning methods, per-layer sparsity and "
                    "hyperparameters (Ray Tune + Optuna), tracked in MLflow.")
    parser.add_argument("--version", action="version", version=f"autoprune {__version__}")
    _verbosity_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("studies", help="list the built-in studies")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--show", metavar="NAME",
                   help="print one study's YAML (to read it, or copy it and edit the copy)")
    p.set_defaults(func=_cmd_studies)

    p = sub.add_parser("methods", help="list the pruning methods and their hyperparameters")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser("prune", help="run one pruning method with fixed settings (no search)")
    _common(p)
    p.add_argument("--method", required=True, help="pruning method (see `autoprune methods`)")
    p.add_argument("--budget", default=None,
                   help="e.g. flops=0.4 or params=0.014 (default: the study's budget)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a hyperparameter of the method (repeatable)")
    p.add_argument("--finetune", action="append", metavar="KEY=VALUE",
                   help="override the study's fine-tune recipe, e.g. epochs=20 or lr=1e-3 "
                        "(repeatable)")
    p.add_argument("--layer-sparsity", default=None, metavar="L=S,...",
                   help="explicit per-layer sparsities instead of the budget projection")
    p.add_argument("--dense-checkpoint", default=None,
                   help="start from this dense checkpoint instead of training one")
    p.set_defaults(func=_cmd_prune)

    from . import export as export_cli
    from . import search as search_cli

    search_cli.add_commands(sub, _common)
    export_cli.add_command(sub)
    for p in sub.choices.values():
        _verbosity_options(p, top=False)
    for p in (parser, *sub.choices.values()):
        _one_line_errors(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    global _verbosity
    args = parser.parse_args(argv)
    _verbosity = -1 if args.quiet else min(int(args.verbose or 0), 1)
    if _verbosity <= 0:
        _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"autoprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
