"""The training module: the model, the recipe's objectives and their weights, in one module.

This is what DeepSpeed wraps, checkpoints and shards, and what ``vlp export`` writes. The
model (``vlp.models``: encoders and heads) knows nothing of objectives; objectives own
their parameters (critics, temperatures, logit scales). ``forward(batch)`` encodes the
batch once, with only the features some objective needs, runs every objective on them and
returns the weighted total loss and a flat dictionary of detached scalars for logging.
"""

from __future__ import annotations

import torch
from torch import nn

from vlp.models.model import ModelConfig, VLPModel, build_model
from vlp.objectives.base import Objective, ObjectiveSpec, build_objective

__all__ = ["PretrainingModule", "build_pretraining_module", "param_groups_of"]


class PretrainingModule(nn.Module):
    """``model`` (encoders + heads) and ``objectives`` (name → objective) with weights."""

    def __init__(
        self,
        model: VLPModel,
        objectives: dict[str, Objective],
        weights: dict,
        start_steps: dict | None = None,
    ):
        super().__init__()
        self.model = model
        self.objectives = nn.ModuleDict(objectives)
        self.objective_weights = {name: float(weights[name]) for name in objectives}
        self.start_steps = {name: int((start_steps or {}).get(name, 0)) for name in objectives}
        #: the optimizer step being computed (0-based); the trainer sets it before each
        #: forward, so objectives with a ``start_step`` join at the right step, resume too.
        self.step = 0
        #: whether this step ends at a checkpoint, whose figures the objectives then keep
        #: (``Objective.record_figures``); the trainer sets it, true outside training.
        self.record_figures = True
        # A function of the objectives' configs: computed once, not every step.
        self.needed_features = frozenset().union(
            *(o.required_features for o in self.objectives.values())
        )

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of all objectives' losses, and detached scalars to log."""
        if not len(self.objectives):
            raise RuntimeError("the training module needs at least one objective")
        features = self.model.encode(batch, self.needed_features)
        total = None
        logs: dict[str, torch.Tensor] = {}
        for name, objective in self.objectives.items():
            objective.record_figures = self.record_figures
            out = objective(features, batch)
            weight = self.objective_weights[name]
            if self.step < self.start_steps[name]:
                weight = 0.0  # computed and logged, not yet counted (ObjectiveSpec)
            for key, value in out.losses.items():
                if value.ndim != 0:
                    raise ValueError(f"objective {name!r} loss {key!r} is not a scalar")
                total = weight * value if total is None else total + weight * value
                logs[f"loss/{name}/{key}"] = value.detach()
            for key, value in out.metrics.items():
                logs[f"metric/{name}/{key}"] = torch.as_tensor(value).detach()
        if total is None:
            raise RuntimeError("the recipe's objectives returned no losses")
        logs["loss/total"] = total.detach()
        return total, logs


def build_pretraining_module(
    model_cfg: ModelConfig, objectives: list[ObjectiveSpec], image_size: int
) -> PretrainingModule:
    """The model (for ``image_size`` images, a recipe's ``data.image_size``), then the
    objectives in recipe order (parameters validated per objective)."""
    model = build_model(model_cfg, image_size)
    built, weights, starts = {}, {}, {}
    for position, spec in enumerate(objectives):
        if not isinstance(spec, ObjectiveSpec):
            spec = ObjectiveSpec(**spec)
        if spec.name in built:
            raise ValueError(f"objectives[{position}]: objective {spec.name!r} is listed twice")
        built[spec.name] = build_objective(spec, model.dims, f"objectives[{position}]")
        weights[spec.name] = float(spec.weight)
        starts[spec.name] = int(spec.start_step)
    return PretrainingModule(model, built, weights, starts)


def param_groups_of(module: PretrainingModule) -> list[dict]:
    """Trainable parameters split by part and by weight decay.

    Parts: each encoder's own parameters form a group named after the encoder (``image``,
    ``text``, ...), the projection heads ``heads``, the objectives ``objectives``. Returns
    dicts ``{"group", "no_decay", "names", "params"}`` (empty groups omitted). No weight
    decay applies to biases, norm weights and scalars (ndim <= 1, logit scales among them)
    and to what an encoder names in ``no_weight_decay()`` (ViT position embeddings, class
    tokens). ``vlp.training.optim.param_groups`` adds ``lr``/``weight_decay`` per group.
    """
    exempt = {f"model.{name}" for name in module.model.no_weight_decay()}
    encoders = list(module.model.encoders)
    buckets: dict[tuple[str, bool], dict] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")
        if parts[:2] == ["model", "encoders"]:
            group = parts[2]
        elif parts[0] == "objectives":
            group = "objectives"
        else:
            group = "heads"
        no_decay = param.ndim <= 1 or name in exempt
        bucket = buckets.setdefault(
            (group, no_decay), {"group": group, "no_decay": no_decay, "names": [], "params": []}
        )
        bucket["names"].append(name)
        bucket["params"].append(param)
    order = [*encoders, "heads", "objectives"]
    return [buckets[k] for k in sorted(buckets, key=lambda k: (order.index(k[0]), k[1]))]
