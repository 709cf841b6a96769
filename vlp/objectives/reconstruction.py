"""Masked image modelling: MAE's reconstruction loss on the hidden patches.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, §3: the mean
squared error between predicted and true pixels, per patch averaged over its pixels, then
averaged **over the hidden patches only** (visible patches add nothing). With
``norm_pix_loss`` (MAE's better setting) each patch's target is normalised by its own mean
and variance, ``(x − μ) / sqrt(σ² + 1e-6)``. The encoder ``mae`` (``vlp/models/mae.py``)
gives the prediction, the patchified input and the mask; this objective only compares them.

At every checkpoint the trainer asks for a figure (:meth:`MAEObjective.write_figures`): for
the first samples of the last batch, the input, what the encoder saw (hidden patches
grey) and the reconstruction with the visible patches pasted back, as MAE's demo shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlp.models.mae import unpatchify
from vlp.objectives.base import Objective, ObjectiveOutput
from vlp.objectives.figures import image_rows
from vlp.registry import register


@dataclass
class MAELossConfig:
    #: the ``mae`` image encoder whose reconstruction is scored.
    encoder: str = "image"
    #: normalise each target patch by its mean and variance (MAE's ``--norm_pix_loss``).
    norm_pix_loss: bool = True
    #: samples of the last batch drawn in the checkpoint figure (0 = no figure).
    figure_samples: int = 4


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True, unbiased=True)
    return (target - mean) / (var + eps).sqrt()


@register("objective", "mae", config=MAELossConfig)
class MAEObjective(Objective):
    """Mean squared error on the hidden patches (module docstring)."""

    def __init__(self, config: MAELossConfig, dims):
        super().__init__(config, dims)
        self._last: dict[str, torch.Tensor] | None = None  # for the figure; not state

    @classmethod
    def features_needed(cls, config: MAELossConfig) -> frozenset[str]:
        return frozenset(f"{config.encoder}_mae_{k}" for k in ("prediction", "target", "mask"))

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        name = self.config.encoder
        try:
            prediction = features[f"{name}_mae_prediction"]
        except KeyError:
            raise KeyError(
                f"objective mae: encoder {name!r} gave no reconstruction; it masks only in "
                "training and with mask_ratio > 0"
            ) from None
        target = features[f"{name}_mae_target"].float()
        mask = features[f"{name}_mae_mask"].float()
        goal = normalize_patches(target) if self.config.norm_pix_loss else target
        per_patch = (prediction.float() - goal).pow(2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
        if self.config.figure_samples and self.record_figures:
            n = self.config.figure_samples
            self._last = {
                "prediction": prediction[:n].detach().float().cpu(),
                "target": target[:n].detach().cpu(),
                "mask": mask[:n].detach().cpu(),
            }
        with torch.no_grad():
            visible = (per_patch * (1 - mask)).sum() / (1 - mask).sum().clamp_min(1.0)
        return ObjectiveOutput({"reconstruction": loss}, {"visible_patch_error": visible})

    def reconstruction_images(self) -> dict[str, torch.Tensor] | None:
        """``input``, ``masked`` and ``reconstruction`` (B×N×p² patches, pixel space) of the
        last batch's first samples; hidden patches of ``masked`` are NaN."""
        if self._last is None:
            return None
        target, prediction, mask = (
            self._last["target"],
            self._last["prediction"],
            self._last["mask"],
        )
        if self.config.norm_pix_loss:  # back to pixels with each patch's own statistics
            mean = target.mean(-1, keepdim=True)
            std = (target.var(-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
            prediction = prediction * std + mean
        hidden = mask[..., None].bool()
        return {
            "input": target,
            "masked": target.masked_fill(hidden, float("nan")),
            "reconstruction": torch.where(hidden, prediction, target),
        }

    def write_figures(self, folder, step: int) -> list:
        images = self.reconstruction_images()
        if images is None:
            return []
        patches = images["input"].shape[1]
        side = int(round(patches**0.5))
        if side * side != patches:
            return []  # a non-square grid: no figure rather than a wrong one
        patch = int(round(images["input"].shape[2] ** 0.5))
        rows = {
            name: unpatchify(value, patch, (side, side))[:, 0].numpy()
            for name, value in images.items()
        }
        path = Path(folder) / f"mae_reconstruction_step-{step}.png"
        return [image_rows(rows, path, f"MAE at step {step}: hidden patches grey")]
