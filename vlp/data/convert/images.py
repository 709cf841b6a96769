"""Image path of the converter: decode (draft mode), resize the long side, encode as JPEG.

A MIMIC-CXR-JPG radiograph is about 2500×3000 pixels. Decoding it fully to store it at
512 pixels wastes most of the time, so JPEGs are opened in libjpeg's draft mode
(``Image.draft``): the decoder applies a power-of-two DCT scaling and produces an image
that is at least the target size, in grayscale, without ever materialising the full
resolution. The remaining factor (< 2) is a Lanczos resize. PNGs (Open-i, CSV tables)
have no draft mode and are decoded fully; 16-bit PNGs are scaled to 8 bits by their own
range, the way BioViL's loader remaps any input to uint8. DICOM files (MIMIC-CXR, the
``dicom`` adapter) are turned into their 8-bit display picture first
(:func:`vlp.data.convert.dicom.read_display_pixels`: modality and VOI LUTs, MONOCHROME1)
and resized like a PNG.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlp.data.convert.dicom import is_dicom_file, read_display_pixels

#: Resampling filter for the final resize (after draft-mode decoding).
RESAMPLE = Image.Resampling.LANCZOS


@dataclass(frozen=True)
class EncodedImage:
    """A stored view: JPEG bytes and its sizes as ``[height, width]``."""

    data: bytes
    orig_size: tuple[int, int]
    size: tuple[int, int]


def target_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """``(width, height)`` after resizing so that the long side equals ``long_side``."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width}×{height})")
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_grayscale(image: Image.Image) -> Image.Image:
    """8-bit grayscale; 16-bit and float images scaled by their own range (PIL's
    ``convert("L")`` would clip them). The converter, the loader's decoder and the
    zero-shot tool all read pixels through this one rule."""
    if image.mode == "L":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else array * 0.0
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    return image.convert("L")


def load_resized(path: str, long_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """Open ``path``, decode it as grayscale with its long side equal to ``long_side``.

    Returns the resized image and the original size ``(height, width)``. Raises
    ``OSError``/``ValueError`` (from PIL or pydicom) for unreadable files.
    """
    if is_dicom_file(path):
        gray = Image.fromarray(read_display_pixels(path))
        width, height = gray.size
        new_size = target_size(width, height, long_side)
        if gray.size != new_size:
            gray = gray.resize(new_size, RESAMPLE)
        return gray, (height, width)
    with Image.open(path) as image:
        width, height = image.size
        new_size = target_size(width, height, long_side)
        if image.format == "JPEG":
            # Draft mode: the decoder picks the largest DCT reduction that still yields
            # at least ``new_size``; a 2500×3000 JPEG decodes at 625×750 for 512 px.
            image.draft("L", new_size)
        image.load()
        gray = to_grayscale(image)
        if gray.size != new_size:
            gray = gray.resize(new_size, RESAMPLE)
        elif gray is image:
            gray = gray.copy()  # detach from the file before it is closed
    return gray, (height, width)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """Baseline grayscale JPEG bytes (no EXIF, no optimisation passes: deterministic)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def convert_image(path: str, long_side: int, quality: int) -> EncodedImage:
    """Decode, resize and encode one view."""
    image, orig_size = load_resized(path, long_side)
    return EncodedImage(
        data=encode_jpeg(image, quality),
        orig_size=orig_size,
        size=(image.size[1], image.size[0]),
    )
