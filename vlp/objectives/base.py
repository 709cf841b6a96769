"""The objective interface: one loss (or several named ones) computed from shared features.

A recipe lists objectives with weights (:class:`ObjectiveSpec`). The model computes the
feature dictionary once per step (docs/architecture.md, "Features") and hands it, with the
batch, to every objective; each returns an :class:`ObjectiveOutput`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vlp.data.requirements import TEXT_KINDS, Requirements
from vlp.models.model import TEXT_FEATURES, FeatureDims
from vlp.registry import build


@dataclass
class ObjectiveSpec:
    """One objective of a recipe: registered name, weight in the total, parameters.

    ``start_step`` delays the objective: before that optimizer step its losses are computed
    and logged but count with weight 0 (so a recipe can run in phases, e.g. Chauhan et
    al.'s semi-supervised ranking phase before the supervised one, with the same
    parameters in the graph at every step)."""

    name: str
    weight: float = 1.0
    params: dict = field(default_factory=dict)
    start_step: int = 0


@dataclass
class ObjectiveOutput:
    #: scalar losses; each is multiplied by the recipe weight and added to the total.
    losses: dict[str, torch.Tensor]
    #: detached scalars for logging.
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LabelPredictor:
    """How an objective predicts a categorical label field from image features: what an
    evaluator calls to score the objective's own classifier (``vlp eval edema
    --classifier objective``) instead of fitting a probe on frozen features."""

    #: the batch label field predicted, e.g. ``edema_severity``.
    field: str
    classes: int
    #: image feature keys ``probabilities`` reads (``image_global``: cached features do).
    image_keys: tuple[str, ...]
    #: image features → N×classes probabilities.
    probabilities: Callable[[dict], torch.Tensor]


class Objective(nn.Module):
    """Base class. Subclasses register with ``@register("objective", name, config=...)``.

    An objective declares what it needs as functions of its config, so the recipe loader
    checks them before anything is built: :meth:`features_needed` (feature keys the model
    must produce; the model computes only those) and :meth:`fields_needed` (batch label
    fields, ``vlp.data.requirements.LABEL_FIELDS``); :meth:`requirements` derives what it
    reads from the batch from these, and an objective that reads more of the time axis
    itself (priors, their text) overrides it. Its own parameters (critics, temperatures,
    logit scales) live in the objective.
    """

    #: keep what :meth:`write_figures` draws from this forward. The training module sets
    #: it from the trainer, true only on the steps that end at a checkpoint, so work done
    #: for a figure (MoPoE decodes samples) is not repeated every step; a forward outside
    #: the trainer keeps it.
    record_figures: bool = True

    def __init__(self, config, dims: FeatureDims):
        super().__init__()
        self.config = config
        self.dims = dims

    @classmethod
    def features_needed(cls, config) -> frozenset[str]:
        return frozenset()

    @classmethod
    def fields_needed(cls, config) -> frozenset[str]:
        return frozenset()

    @classmethod
    def requirements(cls, config) -> Requirements:
        """What this objective reads from the batch: the text kinds its features come from
        and its label fields (checked against the data section at load time)."""
        features = cls.features_needed(config)
        return Requirements(
            text=frozenset(k for k in TEXT_KINDS if features & set(TEXT_FEATURES[k])),
            fields=frozenset(cls.fields_needed(config)),
        )

    @property
    def required_features(self) -> frozenset[str]:
        return type(self).features_needed(self.config)

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        raise NotImplementedError

    def scorer(self):
        """How this objective scores an image against a text (a
        :class:`vlp.objectives.scoring.Scorer`), or None when it defines no such score."""
        return None

    def predictor(self) -> LabelPredictor | None:
        """The objective's own classifier of a label field (a :class:`LabelPredictor`), or
        None when it trains none."""
        return None

    def write_figures(self, folder, step: int) -> list:
        """PNGs of what the objective saw last (the trainer calls this on rank 0 at every
        checkpoint, into ``RUN_DIR/figures``); returns the paths written. Default: none."""
        return []


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


def labelled_classes(batch: dict, field: str, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The current study's class of a categorical label field (``edema_severity``): the
    B class indices (-1 unknown, including hidden by ``data.label_fraction``) and the B
    mask of known ones; a value beyond ``classes`` is an error naming the field."""
    if field != "edema_severity":
        raise ValueError(
            f"label field {field!r}: only the categorical field 'edema_severity' is supported"
        )
    y = batch[field][:, 0]
    known = y >= 0
    if bool((y[known] >= classes).any()):
        raise ValueError(f"batch {field!r} has a class >= {classes}: {sorted(set(y.tolist()))}")
    return y, known


def valid_sentences(features: dict) -> torch.Tensor:
    """Boolean S mask: sentences that belong to a sample (``sentence_index >= 0``).

    The batch contract has every index in 0..B-1; a negative index marks a padding
    sentence (fixed-size sentence batches) and is ignored by every objective.
    """
    return features["sentence_index"] >= 0


def build_objective(spec: ObjectiveSpec, dims: FeatureDims, where: str = "objectives") -> Objective:
    """Instantiate a registered objective, validating ``spec.params`` against its Config."""
    # Typed and strict like the recipe itself (nested dataclasses such as a critic too).
    return build("objective", spec.name, dict(spec.params), dims, path=where)
