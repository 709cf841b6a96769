"""A toy image encoder over three images of a sample: frontal, lateral and the first prior.

One small convolutional stem is shared by the three images; their local maps are
concatenated into one token sequence whose layout names each segment's view and time step,
and the pooled feature is the mean over the present images (a missing lateral or prior is
masked out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlp.data.batch import batch_images, batch_view_mask
from vlp.data.requirements import Requirements
from vlp.models.encoders import ImageEncoderBase, ImageEncoding, TokenSegment
from vlp.registry import register

INPUTS = (("frontal", 0), ("lateral", 0), ("frontal", 1))


@dataclass
class ToyEncoderConfig:
    channels: int = 8
    #: side of each image's local grid.
    grid: int = 2


@register("encoder", "toy", config=ToyEncoderConfig)
class ToyEncoder(ImageEncoderBase):
    def __init__(self, config: ToyEncoderConfig, *, image_size: int, path: str = "model"):
        super().__init__()
        self.config = config
        self.stem = nn.Sequential(
            nn.Conv2d(1, config.channels, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(config.grid),
        )
        self.global_dim = self.local_dim = config.channels

    @classmethod
    def requirements(cls, config: ToyEncoderConfig) -> Requirements:
        return Requirements(
            views=frozenset({"frontal", "lateral"}), priors=1, prior_views=frozenset({"frontal"})
        )

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div(255.0).sub(0.5)
        return self.stem(x).flatten(2).transpose(1, 2)  # B×g²×C

    def encode_images(self, images: torch.Tensor) -> ImageEncoding:
        tokens = self._tokens(images)
        grid = (self.config.grid, self.config.grid)
        return ImageEncoding(tokens.mean(1), tokens, (TokenSegment("frontal", 0, 0, grid),))

    def forward(self, batch: dict) -> ImageEncoding:
        grid = (self.config.grid, self.config.grid)
        tokens, layout, pooled, present = [], [], 0.0, 0.0
        for view, time in INPUTS:
            part = self._tokens(batch_images(batch, view, time))
            mask = batch_view_mask(batch, view, time).float()[:, None]
            layout.append(TokenSegment(view, time, sum(t.shape[1] for t in tokens), grid))
            tokens.append(part)
            pooled = pooled + part.mean(1) * mask
            present = present + mask
        return ImageEncoding(pooled / present.clamp_min(1.0), torch.cat(tokens, 1), tuple(layout))
