"""Geometric augmentation of radiographs: crop boxes for decode-time resizing, affine on uint8.

The loader decodes each view once, straight to the model's input size: the crop is not a
separate step but the ``box`` argument of one PIL resize (so a random resized crop costs
nothing beyond the resize). This module decides that box (:func:`crop_box`) and how large
the decoded image must be for the box to keep full detail (:func:`min_decode_side`), and
applies the random affine of Liao et al. on the resulting ``uint8`` 1×H×W tensor
(:func:`random_affine`). Intensities are never touched: normalisation belongs to the model.

All randomness comes from a :class:`random.Random` the caller seeds, so that a sample's
augmentation is a deterministic function of the loader's seeds (exact resumption).

Presets (:data:`AUGMENT_PRESETS`) follow the papers:

* Liao et al. 2021, "Multimodal representation learning via maximization of local mutual
  information" (MICCAI): ``RandomAffine(degrees=20, translate=(0.1, 0.1))``.
* Zhang et al. 2022, "Contrastive learning of medical visual representations from paired
  images and text" (ConVIRT, MLHC): random crop of area ratio [0.6, 1.0], affine with
  ±20°, translation 0.1 and scale [0.95, 1.05]. Its horizontal flip, colour jitter and
  Gaussian blur are not implemented (flips also swap the heart's side on a radiograph).
* Huang et al. 2021, "GLoRIA" (ICCV): resize to 256 then a random 224 crop, expressed
  here as a square crop of (224/256)² of the area at a random position.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

Box = tuple[float, float, float, float]


@dataclass
class AugmentConfig:
    """Training-time geometric augmentation; ``enabled=False`` (the default) is the eval path.

    ``crop_scale`` is the area fraction of a random resized crop; ``(1.0, 1.0)`` means no
    random crop (the centred square is used, as for evaluation).
    """

    enabled: bool = False
    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    degrees: float = 0.0
    translate: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(
                f"augment.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}"
            )
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(
                f"augment.crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}"
            )
        if self.degrees < 0 or not 0.0 <= self.translate < 1.0:
            raise ValueError(
                f"augment.degrees must be >= 0 and augment.translate in [0, 1), "
                f"got {self.degrees}, {self.translate}"
            )
        if not 0.0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"augment.scale must satisfy 0 < low <= high, got {self.scale}")

    @property
    def random_crop(self) -> bool:
        return self.enabled and self.crop_scale != (1.0, 1.0)

    @property
    def affine(self) -> bool:
        return self.enabled and (self.degrees > 0 or self.translate > 0 or self.scale != (1.0, 1.0))


AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    "liao": AugmentConfig(enabled=True, degrees=20.0, translate=0.1),
    "convirt": AugmentConfig(
        enabled=True, crop_scale=(0.6, 1.0), degrees=20.0, translate=0.1, scale=(0.95, 1.05)
    ),
    "gloria": AugmentConfig(enabled=True, crop_scale=(0.765625, 0.765625), crop_ratio=(1.0, 1.0)),
}


def center_square_box(width: int, height: int) -> Box:
    """The largest centred square: resizing it to S×S equals 'resize short side, centre crop'."""
    side = min(width, height)
    left = (width - side) / 2.0
    top = (height - side) / 2.0
    return (left, top, left + side, top + side)


def random_resized_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> Box:
    """A box of area fraction in ``scale`` and aspect (w/h) in ``ratio`` (log-uniform).

    Ten draws are tried; if none fits inside the image the centred square is used.
    """
    area = float(width * height)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        box_w = math.sqrt(target * aspect)
        box_h = math.sqrt(target / aspect)
        if box_w <= width and box_h <= height:
            left = rng.uniform(0.0, width - box_w)
            top = rng.uniform(0.0, height - box_h)
            return (left, top, left + box_w, top + box_h)
    return center_square_box(width, height)


def crop_box(width: int, height: int, cfg: AugmentConfig, rng: random.Random) -> Box:
    """The region of a ``width``×``height`` image that is resized to the model input."""
    if cfg.random_crop:
        return random_resized_box(width, height, cfg.crop_scale, cfg.crop_ratio, rng)
    return center_square_box(width, height)


def min_decode_side(out_size: int, cfg: AugmentConfig) -> int:
    """Smallest short side the decoded image needs so the crop is not upsampled.

    A crop of area fraction ``a`` spans about ``sqrt(a)`` of the side, so the decoded side
    must be ``out_size / sqrt(a_min)`` for the smallest crop to keep full detail.
    """
    if cfg.random_crop:
        return int(math.ceil(out_size / math.sqrt(cfg.crop_scale[0])))
    return out_size


#: one draw of :func:`random_affine`: angle (degrees), shift (dx, dy in pixels), zoom.
AffineParams = tuple[float, int, int, float]


def affine_params(height: int, width: int, cfg: AugmentConfig, rng: random.Random) -> AffineParams:
    """Draw the parameters of :func:`random_affine` for an ``height``×``width`` image.

    Drawn like torchvision's ``RandomAffine``: angle uniform in ±degrees, translation
    uniform in ±translate·size (rounded to pixels), scale uniform in range. Separate from
    the warp so that the loader workers can draw them for an image that is decoded later on
    the GPU (``data.decode_device: cuda``) from the same random stream.
    """
    angle = rng.uniform(-cfg.degrees, cfg.degrees)
    max_dx, max_dy = cfg.translate * width, cfg.translate * height
    shift_x, shift_y = round(rng.uniform(-max_dx, max_dx)), round(rng.uniform(-max_dy, max_dy))
    zoom = rng.uniform(cfg.scale[0], cfg.scale[1])
    return angle, shift_x, shift_y, zoom


def apply_affine(image: torch.Tensor, params: AffineParams) -> torch.Tensor:
    """Warp a uint8 C×H×W image (on any device) by ``params``: zero fill, bilinear."""
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(
            f"random_affine expects a uint8 C×H×W tensor, got {image.dtype} {tuple(image.shape)}"
        )
    angle, shift_x, shift_y, zoom = params
    return TF.affine(
        image,
        angle=float(angle),
        translate=[int(shift_x), int(shift_y)],
        scale=float(zoom),
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.BILINEAR,
        fill=0,
    )


def random_affine(image: torch.Tensor, cfg: AugmentConfig, rng: random.Random) -> torch.Tensor:
    """Random rotation/translation/scale of a uint8 1×H×W image, zero fill, bilinear
    (:func:`affine_params` drawn from ``rng``, then :func:`apply_affine`)."""
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(
            f"random_affine expects a uint8 C×H×W tensor, got {image.dtype} {tuple(image.shape)}"
        )
    height, width = image.shape[-2:]
    return apply_affine(image, affine_params(height, width, cfg, rng))
