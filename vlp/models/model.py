"""The vision–language model: towers, projection heads, logit scale and objectives.

``VLPModel.encode(batch)`` turns a batch (docs/architecture.md, "Batch") into the feature
dictionary ("Features") with one image-tower pass and one text-tower pass per text kind;
``VLPModel.forward(batch)`` runs every objective of the recipe on those shared features and
returns the weighted total loss and a flat dictionary of detached scalars for logging.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from vlp.models.heads import HeadConfig, LogitScale, ProjectionHead
from vlp.models.image import ImageTower, ImageTowerConfig, build_image_tower
from vlp.models.text import TextTower, TextTowerConfig, build_text_tower
from vlp.objectives.base import FeatureDims, Objective, ObjectiveSpec, build_objective

GLOBAL_FROM = ("pool", "mean_local")

__all__ = [
    "ModelConfig",
    "ObjectiveSpec",
    "VLPModel",
    "build_model",
    "model_param_groups",
]


@dataclass
class ModelConfig:
    """Towers, heads and the joint space of a :class:`VLPModel`."""

    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    #: width of ``image_global`` and ``report``.
    embed_dim: int = 128
    #: width of ``image_local``.
    local_dim: int = 128
    #: width of ``sentence``; None = embed_dim.
    sentence_dim: int | None = None
    #: head shape for global image, report and sentence features.
    projection: HeadConfig = field(default_factory=HeadConfig)
    #: head shape for local image features; None = ``projection``.
    local_projection: HeadConfig | None = None
    #: sentences go through the report head (same space, e.g. ConVIRT's random sentence).
    share_sentence_head: bool = False
    #: ``pool``: project the tower's pooled feature; ``mean_local``: mean of the projected
    #: local features (BioViL's global embedding; needs embed_dim == local_dim).
    global_from: str = "pool"
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    #: batch key of the image the towers encode.
    image_view: str = "frontal"


class VLPModel(nn.Module):
    """Image tower, text tower, heads, logit scale and the recipe's objectives."""

    def __init__(
        self,
        cfg: ModelConfig,
        image_tower: ImageTower,
        text_tower: TextTower,
        objectives: dict[str, Objective] | None = None,
        weights: dict[str, float] | None = None,
    ):
        super().__init__()
        if cfg.global_from not in GLOBAL_FROM:
            raise ValueError(
                f"model.global_from must be one of {GLOBAL_FROM}, got {cfg.global_from!r}"
            )
        self.cfg = cfg
        self.image_tower = image_tower
        self.text_tower = text_tower
        local_cfg = cfg.local_projection or cfg.projection
        sentence_dim = cfg.sentence_dim or cfg.embed_dim
        self.image_local_head = ProjectionHead(
            image_tower.local_dim, cfg.local_dim, local_cfg, "model.local_projection"
        )
        if cfg.global_from == "pool":
            self.image_global_head = ProjectionHead(
                image_tower.global_dim, cfg.embed_dim, cfg.projection, "model.projection"
            )
        else:
            self.image_global_head = None
        width = text_tower.hidden_size
        self.report_head = ProjectionHead(width, cfg.embed_dim, cfg.projection, "model.projection")
        if cfg.share_sentence_head:
            self.sentence_head = None
        else:
            self.sentence_head = ProjectionHead(
                width, sentence_dim, cfg.projection, "model.projection"
            )
        self.logit_scale = LogitScale(cfg.logit_scale_init, cfg.logit_scale_max)
        self.dims = FeatureDims(
            embed_dim=(
                self.image_global_head.out_dim
                if self.image_global_head is not None
                else self.image_local_head.out_dim
            ),
            local_dim=self.image_local_head.out_dim,
            sentence_dim=(self.sentence_head or self.report_head).out_dim,
        )
        if self.report_head.out_dim != self.dims.embed_dim:
            raise ValueError(
                f"image_global ({self.dims.embed_dim}) and report ({self.report_head.out_dim}) "
                "embeddings must have the same width; with identity heads the towers' widths "
                "must match, with global_from: mean_local set embed_dim == local_dim"
            )
        self.objectives = nn.ModuleDict(objectives or {})
        self.objective_weights = dict(weights or {name: 1.0 for name in self.objectives})

    # ------------------------------------------------------------------ encoding

    def _image_features(self, images: torch.Tensor) -> dict:
        out = self.image_tower(images)
        local = self.image_local_head(out.local_features)
        if self.image_global_head is not None:
            global_ = self.image_global_head(out.global_features)
        else:
            global_ = local.mean(dim=1)
        return {"image_global": global_, "image_local": local, "image_grid": out.grid}

    def _sentence_embeddings(self, input_ids, attention_mask) -> torch.Tensor:
        pooled = self.text_tower.encode_sentences(input_ids, attention_mask)
        return (self.sentence_head or self.report_head)(pooled)

    def encode(self, batch: dict, need: Iterable[str] | None = None) -> dict:
        """Feature dictionary of ``batch``; ``need`` limits which text features are computed
        (default: everything the batch allows). Image features always come together."""
        need = None if need is None else set(need)
        view = self.cfg.image_view
        if view not in batch:
            raise KeyError(
                f"batch has no {view!r} images (model.image_view); keys: {sorted(batch)}"
            )
        features = self._image_features(batch[view])
        features["logit_scale"] = self.logit_scale()
        if "study_id" in batch:
            features["study_id"] = batch["study_id"]
        if need is None or "report" in need:
            if "report_input_ids" in batch:
                pooled = self.text_tower.encode_reports(
                    batch["report_input_ids"], batch["report_attention_mask"]
                )
                features["report"] = self.report_head(pooled)
            elif need is not None:
                raise KeyError(
                    "an objective needs report features but the batch has no report_input_ids"
                )
        if need is None or "sentence" in need:
            if "sentence_input_ids" in batch:
                features["sentence"] = self._sentence_embeddings(
                    batch["sentence_input_ids"], batch["sentence_attention_mask"]
                )
                features["sentence_index"] = batch["sentence_index"]
            elif need is not None:
                raise KeyError(
                    "an objective needs sentence features but the batch has no "
                    "sentence_input_ids (enable sentences in the data config)"
                )
        return features

    def encode_image(self, images: torch.Tensor) -> dict:
        """uint8 ``B×1×H×W`` → ``image_global``, ``image_local``, ``image_grid`` (projected)."""
        return self._image_features(images)

    def encode_text(self, texts: list[str], kind: str = "report") -> torch.Tensor:
        """Raw strings → projected embeddings in the ``report`` (default) or ``sentence`` space."""
        tokens = self.text_tower.tokenize(texts)
        if kind == "report":
            pooled = self.text_tower.encode_reports(tokens["input_ids"], tokens["attention_mask"])
            return self.report_head(pooled)
        if kind == "sentence":
            return self._sentence_embeddings(tokens["input_ids"], tokens["attention_mask"])
        raise ValueError(f"encode_text kind must be 'report' or 'sentence', got {kind!r}")

    # ------------------------------------------------------------------ training

    def required_features(self) -> set[str]:
        return set().union(*(o.required_features for o in self.objectives.values()))

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of all objectives' losses, and detached scalars to log."""
        if not len(self.objectives):
            raise RuntimeError("VLPModel.forward needs at least one objective in the recipe")
        features = self.encode(batch, self.required_features())
        total = None
        logs: dict[str, torch.Tensor] = {}
        for name, objective in self.objectives.items():
            out = objective(features, batch)
            weight = self.objective_weights[name]
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


def build_model(model_cfg: ModelConfig, objectives: list[ObjectiveSpec]) -> VLPModel:
    """Build towers, heads and the recipe's objectives (params validated per objective)."""
    image_tower = build_image_tower(model_cfg.image)
    text_tower = build_text_tower(model_cfg.text)
    model = VLPModel(model_cfg, image_tower, text_tower)
    built, weights = {}, {}
    for position, spec in enumerate(objectives):
        if not isinstance(spec, ObjectiveSpec):
            spec = ObjectiveSpec(**spec)
        if spec.name in built:
            raise ValueError(f"objectives[{position}]: objective {spec.name!r} is listed twice")
        built[spec.name] = build_objective(spec, model.dims, f"objectives[{position}]")
        weights[spec.name] = float(spec.weight)
    model.objectives = nn.ModuleDict(built)
    model.objective_weights = weights
    return model


#: parameter-name prefixes of the groups returned by :func:`model_param_groups`.
GROUP_PREFIXES = (("image", "image_tower."), ("text", "text_tower."), ("objectives", "objectives."))


def model_param_groups(model: VLPModel) -> list[dict]:
    """Trainable parameters split by part and by weight decay.

    Returns a list of dicts ``{"group": image|text|heads|objectives, "no_decay": bool,
    "names": [...], "params": [...]}`` (empty groups omitted). No weight decay applies to
    biases, norm weights and scalars (any parameter with ndim <= 1, the logit scale among
    them) and to what a tower names in ``no_weight_decay()`` (ViT position embeddings,
    class tokens). The trainer adds ``lr``/``weight_decay`` per group.
    """
    exempt = {f"image_tower.{n}" for n in model.image_tower.no_weight_decay()}
    exempt |= {f"text_tower.{n}" for n in model.text_tower.no_weight_decay()}
    buckets: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = next((g for g, prefix in GROUP_PREFIXES if name.startswith(prefix)), "heads")
        no_decay = param.ndim <= 1 or name in exempt
        bucket = buckets.setdefault(
            (group, no_decay), {"group": group, "no_decay": no_decay, "names": [], "params": []}
        )
        bucket["names"].append(name)
        bucket["params"].append(param)
    order = ["image", "text", "heads", "objectives"]
    return [buckets[k] for k in sorted(buckets, key=lambda k: (order.index(k[0]), k[1]))]
