"""The batch contract of ``docs/architecture.md`` ("Batch"): how to read and reshape it.

:mod:`vlp.data.collate` builds batches; this module is what components use to read one
without knowing its layout: the images of a view at a time step and their presence
(:func:`batch_images`, :func:`batch_view_mask`), the current studies' text rows
(:func:`current_text`), the batch seen from a prior time step (:func:`at_time`), moving it
to a device (:func:`batch_to`) and wrapping in-memory images into one
(:func:`batch_from_images`).

Per-study fields carry a time axis T (t = 0 the current study, t = k its k-th prior);
text rows are flat over ``b·T + t``.
"""

from __future__ import annotations

from typing import Any

import torch


def batch_images(batch: dict, view: str, time: int) -> torch.Tensor:
    """The uint8 ``B×1×H×W`` images of ``view`` at time step ``time`` (0 the current
    study, k its k-th prior); zeros where :func:`batch_view_mask` is false."""
    images = batch.get("images", {})
    if view not in images or time >= images[view].shape[1]:
        have = {v: x.shape[1] for v, x in images.items()}
        raise KeyError(
            f"batch has no {view!r} images at time step {time} (views with their time "
            f"steps: {have}); the recipe's data section must decode this view and prior"
        )
    return images[view][:, time]


def batch_view_mask(batch: dict, view: str, time: int) -> torch.Tensor:
    """bool ``B``: which samples have ``view`` at time step ``time``."""
    return batch["view_mask"][view][:, time]


def at_time(batch: dict, time: int) -> dict:
    """``batch`` seen from time step ``time``: step ``time`` becomes the current one (t = 0)
    and the steps after it its priors, so an encoder built for the current study encodes
    a prior one (the evaluators' prior features). Per-study fields are sliced along T;
    text rows are dropped (they are laid out over the full T)."""
    if time == 0:
        return batch
    text_keys = {k for k in batch if k.startswith(("report_", "sentence_"))}
    out = {k: v for k, v in batch.items() if k not in text_keys}
    for key in ("study_id", "study_mask", "gap_days", "text_mask", "labels", "edema_severity"):
        if key in batch:
            out[key] = batch[key][:, time:]
    if "gap_days" in out:  # days before the new current study
        out["gap_days"] = (out["gap_days"] - out["gap_days"][:, :1]).clamp_min(0) * out[
            "study_mask"
        ]
    out["images"] = {v: x[:, time:] for v, x in batch["images"].items()}
    out["view_mask"] = {v: m[:, time:] for v, m in batch["view_mask"].items()}
    return out


def current_text(batch: dict, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The current studies' (t = 0) token ids and attention mask of ``kind`` (``report``
    or ``sentence``), and for sentences their ``sentence_index`` as sample indices 0..B-1
    (-1 padding kept). A batch without ``study_mask`` (a bare token dict) has T = 1."""
    ids, mask = batch[f"{kind}_input_ids"], batch[f"{kind}_attention_mask"]
    steps = batch["study_mask"].shape[1] if "study_mask" in batch else 1
    index = batch.get("sentence_index") if kind == "sentence" else None
    if steps == 1:
        return ids, mask, index
    if kind == "report":
        ids, mask = ids[::steps], mask[::steps]
    else:
        keep = (index < 0) | (index % steps == 0)
        ids, mask, index = ids[keep], mask[keep], index[keep]
        index = torch.where(index < 0, index, index // steps)
    used = mask.any(0).nonzero()
    if len(used):  # drop trailing padding columns that only the priors' longer texts needed
        width = int(used[-1]) + 1
        ids, mask = ids[:, :width], mask[:, :width]
    return ids, mask, index


def batch_to(batch: dict, device, non_blocking: bool = False) -> dict:
    """``batch`` with its tensors (those in the ``images``/``view_mask`` dicts included)
    on ``device``; lists (keys, meta) unchanged. A batch of a ``data.decode_device: cuda``
    loader has its ``encoded_images`` decoded into ``images`` on ``device`` here
    (:func:`vlp.data.device_decode.decode_on_device`), so every consumer sees the same
    contract."""
    if "encoded_images" in batch:
        from vlp.data.device_decode import decode_on_device  # torchvision.io only when used

        rest = batch_to(
            {k: v for k, v in batch.items() if k != "encoded_images"}, device, non_blocking
        )
        return decode_on_device(dict(rest, encoded_images=batch["encoded_images"]), device)

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=non_blocking)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    return {k: move(v) for k, v in batch.items()}


def batch_from_images(images: dict[str, torch.Tensor], **fields) -> dict[str, Any]:
    """A batch dict around in-memory images (tests, benchmarks, notebooks).

    ``images`` maps views to uint8 ``B×1×H×W`` (T = 1) or ``B×T×1×H×W`` tensors; every
    image counts as present unless ``view_mask`` is given. ``fields`` (``study_id`` B or
    B×T, token ids, labels, ...) are added as given; ``study_id`` defaults to 0..B-1."""
    images = {v: x[:, None] if x.dim() == 4 else x for v, x in images.items()}
    first = next(iter(images.values()))
    size, steps = first.shape[:2]
    batch: dict[str, Any] = {
        "images": images,
        "view_mask": {v: torch.ones(size, steps, dtype=torch.bool) for v in images},
        "study_mask": torch.ones(size, steps, dtype=torch.bool),
        "gap_days": torch.zeros(size, steps),
        "study_id": torch.arange(size)[:, None].repeat(1, steps),
    }
    if "study_id" in fields and fields["study_id"].dim() == 1:
        fields["study_id"] = fields["study_id"][:, None].repeat(1, steps)
    batch.update(fields)
    return batch
