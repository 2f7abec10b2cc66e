"""The model card as Markdown (`model_card.md`): the JSON card's facts, for a human reader."""

from __future__ import annotations

from typing import Any

CARD_MD = "model_card.md"
FRACTION_NAMES = {"flops": "FLOPs, compacted (dense hardware)", "sparse_flops":
                  "FLOPs of nonzero weights (sparse kernels)", "params": "nonzero params",
                  "weights": "nonzero conv/linear weights"}


def _acc(x: Any) -> str:
    return f"{float(x):.4f}" if isinstance(x, (int, float)) else "-"


def markdown(card: dict[str, Any]) -> str:
    """Method, hyperparameters, per-layer sparsities, the four fractions, accuracies dense vs
    pruned (re-measured from the exported file), latency, and how to reproduce it."""
    d, pr, ex = card["dense"], card["pruned"], card["exported"]
    lines = [f"# {card['study']}: {card['model']} pruned by {card.get('method') or '-'}", "",
             f"- dataset: {card['dataset']}, input {card['input_shape']}, "
             f"{card['num_classes']} classes",
             f"- method: {card.get('method')} ({card.get('granularity') or '-'} granularity)",
             "- hyperparameters: " + (", ".join(f"{k}={v}" for k, v in
                                                (card.get("hyperparameters") or {}).items())
                                      or "defaults"), "",
             "## Accuracy (pruned: re-measured from the exported file)", "",
             "| split | dense | pruned | drop |", "|---|---|---|---|"]
    for split in ("val", "test"):
        dv, pv = d.get(f"{split}_accuracy"), ex.get(f"{split}_accuracy")
        drop = (f"{float(dv) - float(pv):+.4f}" if isinstance(dv, (int, float))
                and isinstance(pv, (int, float)) else "-")
        lines.append(f"| {split} | {_acc(dv)} | {_acc(pv)} | {drop} |")
    lines += ["", "## Kept fractions of the dense model", "", "| budget kind | kept |",
              "|---|---|"]
    for k, v in (card.get("fractions") or {}).items():
        lines.append(f"| {FRACTION_NAMES.get(k, k)} | {float(v):.4f} |")
    lines += ["", "## Per-layer sparsity", "", "| layer | sparsity |", "|---|---|"]
    lines += [f"| {k} | {float(v):.3f} |" for k, v in (pr.get("layer_sparsity") or {}).items()]
    lat = card.get("latency_cpu") or {}
    if lat:
        lines += ["", f"## CPU latency ({lat['threads']} threads, median, this machine)", "",
                  "| batch | dense ms | exported ms | speed-up |", "|---|---|---|---|"]
        for b in (1, 32):
            lines.append(f"| {b} | {lat[f'dense_batch{b}_ms']:.3f} | "
                         f"{lat[f'exported_batch{b}_ms']:.3f} | {lat[f'speedup_batch{b}']:.2f}x |")
    lines += ["", "## Reproduce", ""]
    for what, cmd in (card.get("reproduce") or {}).items():
        lines += [f"{what}:", "", f"    {cmd}", ""]
    lines += ["## Load", "", f"    {card['load']}", ""]
    return "\n".join(lines)
