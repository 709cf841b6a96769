"""Decoders from a latent vector back to an image, for the generative objectives (M2,
MoPoE): what they reconstruct, and the target they compare it with."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ImageDecoder(nn.Module):
    """z → a ``1×size×size`` image (the mean of MoPoE's Laplace, of M2's Gaussian): linear
    to 4×4, transposed convolutions that double the side (group norm, ReLU), a 3×3
    convolution to one channel, no output activation. ``size`` is 4 times a power of 2."""

    def __init__(self, latent_dim: int, size: int, width: int):
        super().__init__()
        if size < 8 or size % 4 or (size // 4) & (size // 4 - 1):
            raise ValueError(
                f"decoder_size must be 4 times a power of 2 (8, 16, 32, ...), got {size}"
            )
        layers = int(round(math.log2(size // 4)))
        channels = [min(width * 2 ** (layers - i), 8 * width) for i in range(layers + 1)]
        self.start = channels[0]
        self.project = nn.Linear(latent_dim, channels[0] * 16)
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks += [
                nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1),
                nn.GroupNorm(min(8, c_out), c_out),
                nn.ReLU(inplace=True),
            ]
        blocks.append(nn.Conv2d(channels[-1], 1, kernel_size=3, padding=1))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.project(z)).view(z.shape[0], self.start, 4, 4)
        return self.blocks(x)


def image_target(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``B×1×H×W`` → float ``B×1×size×size`` in [0, 1] (area resampling), what an
    image decoder reconstructs."""
    images = images.float() / 255.0
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="area")
    return images
