"""A toy evaluator: image-to-report top-1 retrieval with the model's scorer, against
chance, over the views and priors the model's encoders read."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlp.evaluation.features import (
    eval_loader,
    image_features,
    model_device,
    model_of,
    scorer_of,
)
from vlp.registry import register


@dataclass
class ToyEvalOptions:
    """toy image-to-report top-1 retrieval"""

    limit: int = field(default=64, metadata={"help": "studies to score"})


@register("evaluator", "toy-eval", config=ToyEvalOptions)
@torch.no_grad()
def toy_eval(options: ToyEvalOptions, model, data, out, **common) -> dict:
    scorer = scorer_of(model)
    device = model_device(model)
    images, reports = [], []
    for batch in eval_loader(model, data, batch_size=common.get("batch_size", 8)):
        images.append(image_features(model, batch, device)["image_global"])
        tokens = {k: batch[k].to(device) for k in ("report_input_ids", "report_attention_mask")}
        reports.append(model_of(model).encode(tokens, {"report"})["report"])
        if sum(len(i) for i in images) >= options.limit:
            break
    image = torch.cat(images)[: options.limit]
    report = torch.cat(reports)[: options.limit]
    scores = scorer.scores({"image_global": image}, report)
    hits = (scores.argmax(1) == torch.arange(len(image))).float().mean()
    results = {"studies": len(image), "top1": float(hits), "chance": 1.0 / len(image)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results))
    (out / "results.md").write_text(
        f"top-1 {results['top1']:.3f} (chance {results['chance']:.3f})\n"
    )
    return results
