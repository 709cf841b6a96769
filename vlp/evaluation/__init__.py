"""Evaluators of pretrained models: zero-shot, linear probe, edema, retrieval, grounding, temporal.

Each evaluator module has ``evaluate(model, data, out, ...) -> dict`` (the Python API) and
writes ``results.json`` and ``results.md`` (and PNG figures when asked) into ``out``.
Evaluators are registered in :mod:`vlp.evaluation.evaluators` (kind ``evaluator``), with
the dataclass of their options; :func:`run_evaluator` is the ``vlp eval TASK`` entry
point: it loads the exported checkpoint and runs the registered evaluator.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

#: options every evaluator takes, with their defaults.
COMMON_OPTIONS = {"figures": False, "seed": 0, "bootstrap": 1000, "batch_size": 32}


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluator_options(task: str, values: dict):
    """The registered options dataclass of ``task`` filled from ``values`` (extra keys, such
    as the common options, are ignored)."""
    from vlp import registry

    entry = registry.get("evaluator", task)
    names = {f.name for f in dataclasses.fields(entry.config)}
    return registry.config_of(
        "evaluator", task, {k: v for k, v in values.items() if k in names}, f"vlp eval {task}"
    )


def run_evaluator(task: str, checkpoint, data, out, **values) -> dict:
    """Load ``checkpoint`` (an export folder or run directory) and run evaluator ``task`` on
    ``data``, writing into ``out``; ``values`` holds its options and the common ones."""
    from vlp import registry
    from vlp.training.export import load_model

    entry = registry.get("evaluator", task)
    options = evaluator_options(task, values)
    common = {k: type(d)(values.get(k, d)) for k, d in COMMON_OPTIONS.items()}
    model, _ = load_model(checkpoint, device=pick_device())
    results = entry.builder(options, model, data, out, **common)
    out = Path(out)
    print(f"vlp eval {task}: wrote {out / 'results.json'} and {out / 'results.md'}")
    headline = {k: v for k, v in results.items() if k.startswith("mean_") or k == "status"}
    if headline:
        print(json.dumps(headline, default=str))
    return results


__all__ = ["COMMON_OPTIONS", "evaluator_options", "run_evaluator"]
