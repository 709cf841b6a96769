"""Acquisition of a phantom radiograph: positioning, exposure, detector noise, JPEG.

One job: map a canonical density map (``anatomy.py`` + ``findings.py``) to the 8-bit image
that a scanner would have written, and map canonical boxes to that image's pixels.

The map from canonical to output pixels is one affine transform (patient shift, small
rotation, magnification); the same matrix moves the pixels and the ground-truth boxes, so
boxes stay exact. Display follows the radiographic convention: dense (bone, fluid) is
bright, air is dark: ``I = 1 - exp(-k * density)``, then a gamma and a window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from vlp.data.phantom.anatomy import ASPECT


@dataclass
class Acquisition:
    """Per-image acquisition parameters."""

    view: str = "PA"  # PA, AP, LATERAL or LL
    shift_x: float = 0.0  # fraction of the width
    shift_y: float = 0.0  # fraction of the height
    rotation: float = 0.0  # degrees
    zoom: float = 1.0
    k: float = 0.8  # attenuation -> exposure
    gamma: float = 1.0
    black: float = 0.03  # window
    white: float = 0.97
    noise: float = 0.012
    collimation: tuple = (0.0, 0.0, 0.0, 0.0)  # left, top, right, bottom fractions
    noise_seed: int = 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["collimation"] = list(self.collimation)
        return out


def sample_acquisition(rng: np.random.Generator, view: str) -> Acquisition:
    """Positioning and exposure of one image; portable AP films vary more and are flatter."""
    u = rng.uniform
    portable = view == "AP"
    spread = 1.8 if portable else 1.0
    collim = tuple(float(v) for v in u(0.0, 0.035, size=4) * (u() < 0.4))
    return Acquisition(
        view=view,
        shift_x=u(-0.025, 0.025) * spread,
        shift_y=u(-0.02, 0.03) * spread,
        rotation=u(-2.5, 2.5) * spread,
        zoom=u(0.95, 1.05),
        k=u(0.7, 0.9) * (0.85 if portable else 1.0),
        gamma=u(0.85, 1.15),
        black=u(0.0, 0.06),
        white=u(0.92, 1.0),
        noise=u(0.006, 0.016) * (1.4 if portable else 1.0),
        collimation=collim,
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def output_shape(image_size: int) -> tuple[int, int]:
    """``(height, width)`` of the written image: portrait, long side ``image_size``."""
    return image_size, max(8, int(round(image_size * ASPECT)))


def forward_matrix(acq: Acquisition, src_hw, out_hw) -> np.ndarray:
    """3x3 matrix taking canonical pixel coords (continuous) to output pixel coords.

    Positioning (rotation about the centre, zoom, shift) acts in the canonical frame;
    the final scaling to the output size is the same resampling :func:`warp` does.
    """
    sh, sw = src_hw
    oh, ow = out_hw
    c = np.array([[1, 0, sw / 2], [0, 1, sh / 2], [0, 0, 1.0]])
    th = np.deg2rad(acq.rotation)
    z = acq.zoom
    rot = np.array(
        [[z * np.cos(th), -z * np.sin(th), 0], [z * np.sin(th), z * np.cos(th), 0], [0, 0, 1.0]]
    )
    shift = np.array([[1, 0, acq.shift_x * sw], [0, 1, acq.shift_y * sh], [0, 0, 1.0]])
    to_out = np.diag([ow / sw, oh / sh, 1.0])
    return to_out @ shift @ c @ rot @ np.linalg.inv(c)


def map_box(m: np.ndarray, box, out_hw) -> list[int] | None:
    """Canonical pixel box ``(x0, y0, x1, y1)`` -> integer output ``[x, y, w, h]``, clipped.

    ``None`` when the box leaves the image entirely.
    """
    x0, y0, x1, y1 = box
    pts = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], dtype=float).T
    q = m @ pts
    oh, ow = out_hw
    qx0, qx1 = np.clip([q[0].min(), q[0].max()], 0, ow)
    qy0, qy1 = np.clip([q[1].min(), q[1].max()], 0, oh)
    ix0, iy0 = int(np.floor(qx0)), int(np.floor(qy0))
    ix1, iy1 = int(np.ceil(qx1)), int(np.ceil(qy1))
    if ix1 - ix0 < 1 or iy1 - iy0 < 1:
        return None
    return [ix0, iy0, ix1 - ix0, iy1 - iy0]


def warp(arr: np.ndarray, m: np.ndarray, out_hw, fill: float = 0.0) -> np.ndarray:
    """Resample a canonical float map into the output frame (bilinear).

    The positioning is applied at the canonical resolution and the result resized, which
    is about twice as fast as one affine resampling at the output size.
    """
    sh, sw = arr.shape
    oh, ow = out_hw
    positioning = np.diag([sw / ow, sh / oh, 1.0]) @ m
    inv = np.linalg.inv(positioning)
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), "F")
    coeffs = tuple(float(v) for v in inv[:2].ravel())
    img = img.transform((sw, sh), Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=fill)
    if (sh, sw) != (oh, ow):
        img = img.resize((ow, oh), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


@lru_cache(maxsize=4)
def _noise_bank(h: int, w: int) -> np.ndarray:
    """A fixed field of detector noise, shared by all images of one size (deterministic)."""
    rng = np.random.default_rng(12345)
    return rng.standard_normal((h + 64, w + 64), dtype=np.float32)


def tone(density: np.ndarray, acq: Acquisition) -> np.ndarray:
    """Density -> exposure (0..~1). Pointwise, so it runs before the resampling to the
    output size, at the smaller canonical resolution."""
    e = np.multiply(np.maximum(density, 0.0), -acq.k, dtype=np.float32)
    np.exp(e, out=e)
    np.subtract(1.0, e, out=e)
    e *= 0.93 / (1.0 - np.exp(-acq.k * 1.3))
    if acq.gamma != 1.0:
        np.power(e, np.float32(acq.gamma), out=e)
    return e


def expose(exposure_out: np.ndarray, acq: Acquisition) -> np.ndarray:
    """Exposure in the output frame (from :func:`tone` and :func:`warp`) -> 8-bit image."""
    oh, ow = exposure_out.shape
    e = np.array(exposure_out, dtype=np.float32, copy=True)
    rng = np.random.default_rng(acq.noise_seed)
    oy, ox = (int(v) for v in rng.integers(0, 64, size=2))
    noise = _noise_bank(oh, ow)[oy : oy + oh, ox : ox + ow]
    # Quantum noise grows with the signal; then the display window.
    e *= 1.0 + (acq.noise * 0.6) * noise
    e += (acq.noise * 0.6) * noise
    e -= acq.black
    e *= 255.0 / (acq.white - acq.black)
    e += 0.5
    img = np.clip(e, 0, 255).astype(np.uint8)
    left, top, right, bottom = acq.collimation
    if any(acq.collimation):
        level = 10
        img[: int(top * oh)] = level
        img[oh - int(bottom * oh) :] = level
        img[:, : int(left * ow)] = level
        img[:, ow - int(right * ow) :] = level
    return img
