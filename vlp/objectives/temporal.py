"""Med-ST's temporal bidirectional cycle consistency over a patient's series of studies.

Yang et al., "Unlocking the Power of Spatial and Temporal Information in Medical
Multimodal Pre-training" (Med-ST), ICML 2024, §3.3, after Dwibedi et al.'s temporal cycle
consistency (TCC, CVPR 2019). A sample's series is its current study and its priors (the
batch's time axis); e1 and e2 are the image and report embeddings of its steps. Two terms,
each run image→text and text→image:

* **forward-mapping classification**: ``logits_ij = −‖e1_i − e2_j‖² / τ`` over the series'
  steps j, cross-entropy to j = i (each image finds its own report in the series);
* **reverse-mapping regression**: the soft nearest neighbour ``ẽ_i = Σ_j softmax_j(logits_ij)
  e2_j`` is mapped back, ``β_ik = softmax_k(−‖ẽ_i − e1_k‖² / τ)``, giving a predicted
  position ``μ_i = Σ_k β_ik t_k`` and variance ``σ²_i = Σ_k β_ik (t_k − μ_i)²``; the loss is
  ``(t_i − μ_i)² / σ²_i + λ log σ²_i`` while ``|t_i − μ_i| < δ``, and ``δ(|t_i − μ_i| − δ/2)``
  (Huber-linear) beyond.

Positions are ``t_k = k / n`` for the n steps of a series (Med-ST: {0, ¼, ½, ¾} for its
fixed length 4). Ours run newest first; the loss is unchanged by reversing time (t → c − t
maps μ to c − μ and keeps σ²).

Where paper and code differ or are silent, and what we follow:

* MedST's code reshapes the batch into series of exactly 4 and drops the rest to the other
  losses; here a series is any length 2..``series_length`` (the studies a patient has:
  ``study_mask`` and ``text_mask``), shorter ones are masked, and samples with fewer than
  two steps add nothing (they still train the recipe's other objectives).
* MedST's embeddings are batch-normalised (no affine) 128-d vectors, which fixes their
  scale; our heads do not normalise, so the embeddings are L2-normalised first
  (``normalize``), which plays that role. τ = 0.1, λ = 0.001 and δ = 2.0 are MedST's.
* The two directions are summed, each as classification + regression, as MedST's
  ``temporal_alignment.py`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlp.data.requirements import Requirements
from vlp.models.model import REPORT_SERIES
from vlp.objectives.base import Objective, ObjectiveOutput, zero_loss
from vlp.registry import register


@dataclass
class TemporalCycleConfig:
    #: image feature over time (an image encoder's ``<name>_global_series``).
    image_key: str = "image_global_series"
    #: longest series, T = current + priors (Med-ST: 4).
    series_length: int = 4
    temperature: float = 0.1
    #: λ: weight of log σ² in the regression.
    variance_weight: float = 0.001
    #: δ: where the regression turns from Gaussian to Huber-linear.
    huber_delta: float = 2.0
    #: floor of σ² in the regression (ours: MedST and TCC have none, and a confident wrong
    #: mapping, β one-hot on another step, then divides by σ² ≈ 0).
    min_variance: float = 1e-4
    normalize: bool = True

    def validate(self) -> None:
        if self.series_length < 2:
            raise ValueError(f"series_length must be >= 2, got {self.series_length}")
        if not self.image_key.endswith("_global_series"):
            raise ValueError(f"image_key must be an image series feature, got {self.image_key!r}")
        if self.temperature <= 0 or self.huber_delta <= 0 or self.min_variance <= 0:
            raise ValueError("temperature, huber_delta and min_variance must be positive")
        if self.variance_weight < 0:
            raise ValueError(f"variance_weight must be >= 0, got {self.variance_weight}")


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances ``B×T×T`` between the steps of two ``B×T×D`` series."""
    return (a[:, :, None] - b[:, None, :]).pow(2).sum(-1)


def cycle_terms(
    e1: torch.Tensor,
    e2: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    variance_weight: float,
    huber_delta: float,
    min_variance: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step classification and regression losses ``B×T`` of mapping e1 → e2 → e1
    (module docstring); zero where ``valid`` (B×T) is false or the series is shorter than 2."""
    steps = e1.shape[1]
    keys = valid[:, None, :]  # which steps a step may map to
    logits = (-_distances(e1, e2) / temperature).masked_fill(~keys, float("-inf"))
    target = torch.arange(steps, device=e1.device).expand(e1.shape[0], steps)
    safe = logits.masked_fill(~valid[:, :, None], 0.0)  # rows of invalid steps: finite
    classification = F.cross_entropy(safe.transpose(1, 2), target, reduction="none")
    nearest = torch.softmax(safe.masked_fill(~keys, float("-inf")), -1) @ e2  # ẽ_i
    back = (-_distances(nearest, e1) / temperature).masked_fill(~keys, float("-inf"))
    beta = torch.softmax(back.masked_fill(~valid[:, :, None], 0.0), -1)
    length = valid.sum(1, keepdim=True).clamp_min(1)
    position = target / length  # t_k = k / n
    mu = (beta * position[:, None, :]).sum(-1)
    variance = (
        (beta * (position[:, None, :] - mu[..., None]).pow(2)).sum(-1).clamp_min(min_variance)
    )
    error = position - mu
    gaussian = error.pow(2) / variance + variance_weight * variance.log()
    linear = huber_delta * (error.abs() - huber_delta / 2)
    regression = torch.where(error.abs() < huber_delta, gaussian, linear)
    used = valid & (length >= 2)
    zero = torch.zeros_like(classification)
    return torch.where(used, classification, zero), torch.where(used, regression, zero)


@register("objective", "temporal_cycle", config=TemporalCycleConfig)
class TemporalCycleObjective(Objective):
    """Med-ST's bidirectional temporal cycle consistency (module docstring)."""

    @classmethod
    def features_needed(cls, config: TemporalCycleConfig) -> frozenset[str]:
        return frozenset({config.image_key, REPORT_SERIES})

    @classmethod
    def requirements(cls, config: TemporalCycleConfig) -> Requirements:
        report = frozenset({"report"})
        return Requirements(priors=config.series_length - 1, text=report, prior_text=report)

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        images, reports = features[self.config.image_key], features[REPORT_SERIES]
        steps = min(images.shape[1], self.config.series_length)
        images, reports = images[:, :steps], reports[:, :steps]
        valid = (batch["study_mask"] & batch["text_mask"])[:, :steps]
        used = valid & (valid.sum(1, keepdim=True) >= 2)
        if not bool(used.any()):
            return ObjectiveOutput({"cycle": zero_loss(images, reports)})
        if self.config.normalize:
            images, reports = F.normalize(images, dim=-1), F.normalize(reports, dim=-1)
        c = self.config
        args = (c.temperature, c.variance_weight, c.huber_delta, c.min_variance)
        total, metrics = 0.0, {}
        for name, (a, b) in {"i2t": (images, reports), "t2i": (reports, images)}.items():
            classification, regression = cycle_terms(a, b, valid, *args)
            count = used.sum()
            total = total + classification.sum() / count + regression.sum() / count
            metrics[f"{name}_classification"] = (classification.sum() / count).detach()
        metrics["series_steps"] = used.sum(1).float()[used.any(1)].mean()
        return ObjectiveOutput({"cycle": total}, metrics)
