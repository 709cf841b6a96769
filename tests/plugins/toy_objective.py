"""Two toy objectives: image–report InfoNCE plus a label head (``toy_align``), and an
image-only one (``toy_image_only``: predict each image's mean intensity) for recipes
without a text encoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlp.data.batch import batch_images
from vlp.objectives.base import Objective, ObjectiveOutput
from vlp.registry import register


@dataclass
class ToyAlignConfig:
    image_key: str = "toy_global"
    temperature: float = 0.1


@register("objective", "toy_align", config=ToyAlignConfig)
class ToyAlign(Objective):
    def __init__(self, config: ToyAlignConfig, dims):
        super().__init__(config, dims)
        self.label_head = nn.Linear(dims.embed_dim, 14)

    @classmethod
    def features_needed(cls, config: ToyAlignConfig) -> frozenset[str]:
        return frozenset({config.image_key, "report"})

    @classmethod
    def fields_needed(cls, config: ToyAlignConfig) -> frozenset[str]:
        return frozenset({"labels"})

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        image = F.normalize(features[self.config.image_key], dim=-1)
        report = F.normalize(features["report"], dim=-1)
        logits = image @ report.T / self.config.temperature
        target = torch.arange(logits.shape[0])
        contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        labels = batch["labels"][:, 0]  # the current study's (t = 0)
        known = (labels == 0) | (labels == 1)
        scores = self.label_head(features[self.config.image_key])
        if bool(known.any()):
            labels_loss = F.binary_cross_entropy_with_logits(scores[known], labels[known])
        else:
            labels_loss = scores.sum() * 0.0
        return ObjectiveOutput({"contrastive": contrastive, "labels": labels_loss})


@dataclass
class ToyImageOnlyConfig:
    image_key: str = "image_global"


@register("objective", "toy_image_only", config=ToyImageOnlyConfig)
class ToyImageOnly(Objective):
    def __init__(self, config: ToyImageOnlyConfig, dims):
        super().__init__(config, dims)
        self.head = nn.Linear(dims.embed_dim, 1)

    @classmethod
    def features_needed(cls, config: ToyImageOnlyConfig) -> frozenset[str]:
        return frozenset({config.image_key})

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        target = batch_images(batch, "frontal", 0).float().mean(dim=(1, 2, 3)) / 255.0
        prediction = self.head(features[self.config.image_key]).squeeze(1)
        return ObjectiveOutput({"intensity": F.mse_loss(prediction, target)})
