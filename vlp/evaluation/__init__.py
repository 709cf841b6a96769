"""Evaluators of pretrained models: zero-shot, linear probe, edema, retrieval, grounding, temporal.

Each evaluator module has ``evaluate(model, data, out, ...) -> dict`` (the Python API) and
writes ``results.json`` and ``results.md`` (and PNG figures when asked) into ``out``.
:func:`run_evaluator` is the ``vlp eval TASK`` entry point: it loads the exported
checkpoint and calls the evaluator with the command line's options.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

TASKS = {
    "zero-shot": "zero_shot",
    "linear-probe": "linear_probe",
    "retrieval": "retrieval",
    "edema": "edema",
    "grounding": "grounding",
    "temporal": "temporal",
}


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_evaluator(task: str, args: argparse.Namespace) -> dict:
    """Load ``args.checkpoint`` and run evaluator ``task``; prints where results went."""
    if task not in TASKS:
        raise ValueError(f"unknown evaluation task {task!r}; expected one of {list(TASKS)}")
    from vlp.training.export import load_model

    module = importlib.import_module(f"vlp.evaluation.{TASKS[task]}")
    model, _ = load_model(args.checkpoint, device=pick_device())
    common = dict(
        figures=bool(getattr(args, "figures", False)),
        seed=int(getattr(args, "seed", 0)),
        bootstrap=int(getattr(args, "bootstrap", 1000)),
        batch_size=int(getattr(args, "batch_size", 32)),
    )
    extra: dict = {}
    train_data = getattr(args, "train_data", None)
    if task in ("zero-shot", "retrieval", "grounding"):
        extra["objective"] = getattr(args, "scorer", None)
    if task == "zero-shot":
        extra["prompts"] = getattr(args, "prompts", None)
    elif task in ("linear-probe", "edema"):
        extra["train_data"] = train_data or "auto"
        if task == "linear-probe":
            extra["finetune"] = bool(getattr(args, "finetune", False))
    results = module.evaluate(model, args.data, args.out, **common, **extra)
    out = Path(args.out)
    print(f"vlp eval {task}: wrote {out / 'results.json'} and {out / 'results.md'}")
    headline = {k: v for k, v in results.items() if k.startswith("mean_") or k == "status"}
    if headline:
        print(json.dumps(headline, default=str))
    return results


__all__ = ["TASKS", "run_evaluator"]
