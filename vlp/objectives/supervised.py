"""Supervised classification of a categorical label field from embeddings (``classification``).

One linear head per input embedding (an image encoder's ``<name>_global``, the ``report``),
each trained with cross-entropy on the studies whose label is known; the losses are summed.
This is the supervised phase of Chauhan et al., "Joint Modeling of Chest Radiographs and
Radiology Reports for Pulmonary Edema Assessment", MICCAI 2020 (``CE_img + CE_txt`` beside
the ranking loss; their code's ``multiclass`` mode, 4 severity classes), and, alone on the
image, the labeled-only twin of the semi-supervised M2 model
(``recipes/edema_supervised.yaml``).

Studies without a label (unknown severity, or hidden by ``data.label_fraction``) add
nothing; a batch without any gives a zero loss still connected to every head, so ranks stay
in step. The head on the first image input is the objective's :meth:`predictor`, what
``vlp eval edema --classifier objective`` scores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlp.objectives.base import (
    FeatureDims,
    LabelPredictor,
    Objective,
    ObjectiveOutput,
    labelled_classes,
    zero_loss,
)
from vlp.registry import register


@dataclass
class ClassificationConfig:
    #: the categorical label field (``edema_severity``: 0 none .. 3 alveolar). (The
    #: name shadows ``dataclasses.field`` in this class body, hence the module prefix.)
    field: str = "edema_severity"
    classes: int = 4
    #: embeddings classified, each by its own linear head: ``<encoder>_global``, ``report``.
    inputs: list[str] = dataclasses.field(default_factory=lambda: ["image_global"])


def _check_inputs(inputs: list[str], where: str) -> None:
    if not inputs:
        raise ValueError(f"{where}.inputs: expected at least one embedding key")
    for key in inputs:
        if key != "report" and not key.endswith("_global"):
            raise ValueError(
                f"{where}.inputs: {key!r} is not an embedding (expected <encoder>_global or report)"
            )


@register("objective", "classification", config=ClassificationConfig)
class ClassificationObjective(Objective):
    """Cross-entropy of a categorical label from each input embedding (module docstring)."""

    def __init__(self, config: ClassificationConfig, dims: FeatureDims):
        super().__init__(config, dims)
        _check_inputs(config.inputs, "classification")
        # nn.ModuleDict keys cannot hold dots; feature keys have none.
        self.heads = nn.ModuleDict(
            {key: nn.Linear(dims.embed_dim, config.classes) for key in config.inputs}
        )

    @classmethod
    def features_needed(cls, config: ClassificationConfig) -> frozenset[str]:
        return frozenset(config.inputs)

    @classmethod
    def fields_needed(cls, config: ClassificationConfig) -> frozenset[str]:
        return frozenset({config.field})

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        y, known = labelled_classes(batch, self.config.field, self.config.classes)
        losses, metrics = {}, {"labelled_fraction": known.float().mean()}
        for key, head in self.heads.items():
            logits = head(features[key].float())
            if bool(known.any()):
                losses[f"ce_{key}"] = F.cross_entropy(logits[known], y[known])
                with torch.no_grad():
                    hits = (logits[known].argmax(-1) == y[known]).float().mean()
                metrics[f"accuracy_{key}"] = hits
            else:
                losses[f"ce_{key}"] = zero_loss(logits)
        return ObjectiveOutput(losses, metrics)

    def predictor(self) -> LabelPredictor | None:
        images = [k for k in self.config.inputs if k != "report"]
        if not images:
            return None
        head = self.heads[images[0]]

        def probabilities(image_features: dict) -> torch.Tensor:
            return head(image_features[images[0]].float()).softmax(-1)

        return LabelPredictor(self.config.field, self.config.classes, (images[0],), probabilities)
