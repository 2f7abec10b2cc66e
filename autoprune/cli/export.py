"""`autoprune export`: the command line of autoprune.export."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..errors import UserError
from ..export.registry import PICKS, export_best
from . import progress_log


def add_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `export` to the `autoprune` sub-commands."""
    p = sub.add_parser("export", help="export the best pruned model of a search: compact "
                       "checkpoint, ONNX, model card, MLflow registry (models:/STUDY@best)")
    p.add_argument("--out", default="autoprune-runs", help="output folder of the search "
                   "(default: %(default)s)")
    p.add_argument("--study", default="digits-lenet", help="study name or YAML path, or "
                   "SCRIPT.py:NAME for a Study.custom made in Python (NAME: a Study, or a "
                   "function returning one) (default: %(default)s)")
    p.add_argument("--budget", default=None, help="only points within this budget, "
                   "e.g. flops=0.3")
    p.add_argument("--pick", choices=PICKS, default="max-accuracy",
                   help="highest validation accuracy (finalists first: the search's best), "
                   "or fewest FLOPs (default: %(default)s)")
    p.add_argument("--to", required=True, help="folder to write the export into")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db)")
    p.add_argument("--data-root", default=None, help="dataset root (default: $AUTOPRUNE_DATA "
                   "or ~/.cache/autoprune/data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (default: 0)")
    p.add_argument("--json", action="store_true", help="print the model card as JSON")
    p.set_defaults(func=cmd_export)
    return p


def study_from_script(text: str):
    """`SCRIPT.py:NAME` -> the `Study` that NAME is (or returns when called); else `text`.

    A search over `Study.custom` names a model only Python code can build: the user's own
    script, which is run here as they would run it.
    """
    import importlib.util
    from pathlib import Path

    from ..study import Study

    path, sep, name = text.rpartition(":")
    if not sep or not path.endswith(".py"):
        return text
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--study {text}: no such script {file}")
    spec = importlib.util.spec_from_file_location(f"_autoprune_study_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # classes defined there must be findable by name
    spec.loader.exec_module(module)
    obj = getattr(module, name, None)
    if obj is not None and not isinstance(obj, Study) and callable(obj):
        obj = obj()
    if not isinstance(obj, Study):
        raise UserError(f"--study {text}: {name} in {file} is not a Study (make one with "
                        f"autoprune.Study.custom)")
    return obj


def cmd_export(args: argparse.Namespace) -> int:
    progress_log(args.json)
    card = export_best(args.out, study_from_script(args.study), args.to, budget=args.budget,
                       pick=args.pick, tracking_uri=args.tracking_uri, data_root=args.data_root,
                       seed=args.seed)
    if args.json:
        print(json.dumps(card, indent=2, default=float))
        return 0
    d, pr, ex, lat = card["dense"], card["pruned"], card["exported"], card["latency_cpu"]
    print(f"exported          trial {card['source']['trial']} ({card['method']}) of "
          f"{card['study']} -> {args.to}")
    print(f"test accuracy     {ex['test_accuracy']:.4f}  (dense {d['test_accuracy']:.4f})")
    print(f"FLOPs (MACs)      {ex['flops']:,} compacted, {pr['flops']:,.0f} mask-aware, "
          f"{d['flops']:,} dense")
    print(f"params            {ex['params']:,} compacted ({ex['nonzero_params']:,} nonzero), "
          f"{d['params']:,} dense")
    if lat:
        print(f"CPU latency       batch 1: {lat['exported_batch1_ms']:.3f} ms "
              f"(dense {lat['dense_batch1_ms']:.3f}), batch 32: "
              f"{lat['exported_batch32_ms']:.3f} ms (dense {lat['dense_batch32_ms']:.3f})")
    print("files             " + ", ".join(f"{k} {v:,} B" for k, v in card["files"].items())
          + f" (a dense checkpoint: {card['dense_checkpoint_bytes']:,} B)")
    print(f"registered        {card['model_uri']} (version {card['version']})")
    return 0


def main_for_tests(argv: Sequence[str]) -> int:
    """Run `export` as the CLI would (exit code 2 and a one-line message on UserError)."""
    parser = argparse.ArgumentParser(prog="autoprune")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *argv])
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"autoprune: error: {exc}", file=sys.stderr)
        return 2
