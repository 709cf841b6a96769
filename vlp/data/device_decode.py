"""Encoded views of a batch → its ``images``, decoded on the training device.

One job: with ``data.decode_device: cuda`` the loader workers leave the JPEG views encoded
and only decide, per image, what needs the sample's random stream or its header (the
crop box and the affine draw, :func:`vlp.data.decode.plan_radiograph`); the batch carries
them as ``encoded_images`` (docs/architecture.md, "Batch"). :func:`decode_on_device` turns
those into the usual uint8 ``images[view]`` B×T×1×H×W tensors on a device: one batched
``torchvision.io.decode_jpeg`` call per view (nvJPEG on a GPU, libjpeg on the CPU), the
crop and an antialiased bilinear resize per image, then the same affine as the CPU path
(:func:`vlp.data.transforms.apply_affine`), zeros where a view is absent.

The result is close to, not identical with, the CPU path's: PIL decodes a reduced image in
the DCT domain (draft mode, 1/2 to 1/8) and resizes it from its float crop box, while here
the full image is decoded, the box is rounded to whole pixels of it, and torch's
antialiased bilinear resize does the whole reduction (a few grey levels on average).

An image whose header opened in the worker but whose data does not decode is left out:
zeros, its ``view_mask`` cleared, one warning (the CPU path would have skipped the sample
in the worker; here the batch is already made).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from vlp.data.transforms import apply_affine

log = logging.getLogger(__name__)


def _decode_all(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 1×H×W grey images of ``files`` on ``device``, None for one that does not
    decode. One batched call; if it fails (one bad file fails the batch), one call per
    file, so that only the bad ones are lost."""
    if not files:
        return []
    try:
        return list(decode_jpeg(files, device=device, mode=ImageReadMode.GRAY))
    except RuntimeError:
        pass
    images: list[torch.Tensor | None] = []
    for data in files:
        try:
            images.append(decode_jpeg(data, device=device, mode=ImageReadMode.GRAY))
        except RuntimeError as exc:
            log.warning("a JPEG view does not decode on %s, left out: %s", device, exc)
            images.append(None)
    return images


def crop_resize(image: torch.Tensor, box: list[float], size: int) -> torch.Tensor:
    """The ``box`` (left, top, right, bottom, in pixels) of a uint8 1×H×W image, resized
    to uint8 1×``size``×``size`` with antialiased bilinear interpolation (PIL's
    BILINEAR filter, widened when reducing). The box is rounded to whole pixels (under
    half a stored pixel, a small fraction of an output pixel when reducing)."""
    height, width = image.shape[-2:]
    left = min(max(round(box[0]), 0), width - 1)
    top = min(max(round(box[1]), 0), height - 1)
    right = max(min(round(box[2]), width), left + 1)
    bottom = max(min(round(box[3]), height), top + 1)
    crop = image[None, :, top:bottom, left:right].float()
    resized = F.interpolate(
        crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


def _decode_view(entry: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """One view's ``encoded_images`` entry → uint8 B×T×1×S×S on ``device`` and the flat
    rows ``b·T + t`` whose file did not decode."""
    size = int(entry["size"])
    batch_size, steps = entry["box"].shape[:2]
    offsets = entry["offsets"].tolist()
    boxes = entry["box"].reshape(-1, 4).tolist()
    affine = entry["affine"].reshape(-1, 4).tolist() if "affine" in entry else None
    rows = [r for r in range(batch_size * steps) if offsets[r + 1] > offsets[r]]
    data = entry["data"]
    files = [data[offsets[r] : offsets[r + 1]] for r in rows]
    out = torch.zeros(batch_size * steps, 1, size, size, dtype=torch.uint8, device=device)
    failed = []
    for row, image in zip(rows, _decode_all(files, device)):
        if image is None:
            failed.append(row)
            continue
        image = crop_resize(image, boxes[row], size)
        if affine is not None:
            angle, shift_x, shift_y, zoom = affine[row]
            image = apply_affine(image, (angle, int(shift_x), int(shift_y), zoom))
        out[row] = image
    if len(entry["decoded_rows"]):  # decoded in the worker (not a JPEG nvJPEG takes)
        out[entry["decoded_rows"].to(device)] = entry["decoded"].to(device)
    return out.reshape(batch_size, steps, 1, size, size), failed


def decode_on_device(batch: dict, device) -> dict:
    """``batch`` with its ``encoded_images`` replaced by ``images`` decoded on ``device``
    (a CUDA device or the CPU); a batch without them is returned as it is. A view whose
    file did not decode is cleared in ``view_mask`` (see the module docstring)."""
    if "encoded_images" not in batch:
        return batch
    device = torch.device(device)
    out = {k: v for k, v in batch.items() if k != "encoded_images"}
    out["images"], masks = {}, dict(batch["view_mask"])
    for view, entry in batch["encoded_images"].items():
        out["images"][view], failed = _decode_view(entry, device)
        if failed:
            mask = masks[view].clone()
            mask.view(-1)[torch.tensor(failed, device=mask.device)] = False
            masks[view] = mask
    out["view_mask"] = masks
    return out
