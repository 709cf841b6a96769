"""The objective interface: one loss (or several named ones) computed from shared features.

A recipe lists objectives with weights (:class:`ObjectiveSpec`). The model computes the
feature dictionary once per step (docs/architecture.md, "Features") and hands it, with the
batch, to every objective; each returns an :class:`ObjectiveOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from vlp.config.loader import from_dict
from vlp.registry import get


@dataclass
class ObjectiveSpec:
    """One objective of a recipe: registered name, weight in the total, parameters."""

    name: str
    weight: float = 1.0
    params: dict = field(default_factory=dict)


@dataclass
class ObjectiveOutput:
    #: scalar losses; each is multiplied by the recipe weight and added to the total.
    losses: dict[str, torch.Tensor]
    #: detached scalars for logging.
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureDims:
    """Widths of the projected features, so objectives can size their own modules."""

    embed_dim: int  # image_global and report
    local_dim: int  # image_local
    sentence_dim: int  # sentence


class Objective(nn.Module):
    """Base class. Subclasses set ``Config`` and register with ``@register("objective", ...)``."""

    Config: ClassVar[type]
    #: feature keys the objective reads; the model computes only what some objective needs.
    required_features: frozenset[str] = frozenset()

    def __init__(self, config, dims: FeatureDims):
        super().__init__()
        self.config = config
        self.dims = dims

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        raise NotImplementedError

    def scorer(self):
        """How this objective scores an image against a text (a
        :class:`vlp.objectives.scoring.Scorer`), or None when it defines no such score."""
        return None


def zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero connected to ``tensors`` so every parameter still receives a (zero) gradient.

    Keeps DDP/DeepSpeed gradient reduction in step when a rank has nothing to score.
    """
    total = None
    for tensor in tensors:
        term = tensor.sum() * 0.0
        total = term if total is None else total + term
    if total is None:
        raise ValueError("zero_loss needs at least one tensor")
    return total


def valid_sentences(features: dict) -> torch.Tensor:
    """Boolean S mask: sentences that belong to a sample (``sentence_index >= 0``).

    The batch contract has every index in 0..B-1; a negative index marks a padding
    sentence (fixed-size sentence batches) and is ignored by every objective.
    """
    return features["sentence_index"] >= 0


def build_objective(spec: ObjectiveSpec, dims: FeatureDims, where: str = "objectives") -> Objective:
    """Instantiate a registered objective, validating ``spec.params`` against its Config."""
    entry = get("objective", spec.name)
    if entry.config is None:
        raise TypeError(f"objective {spec.name!r} was registered without a config dataclass")
    # Typed and strict like the recipe itself (nested dataclasses such as a critic too).
    config = from_dict(entry.config, dict(spec.params), path=where)
    return entry.builder(config, dims)
