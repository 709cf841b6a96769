"""One raw sample → decoded tensors and fields of one study.

One job: check a raw sample's members (``json``, ``txt``, the JPEG views) against the
schema and decode only those the recipe asks for. Images are grayscale JPEGs decoded with
PIL draft mode (DCT-domain downscaling by 1/2, 1/4 or 1/8) when the stored image is at
least twice as large as needed (``draft_max_upscale`` relaxes this), cropped and resized
in one PIL call, as uint8 1×H×W tensors. A sample that cannot be used raises
:class:`SampleError`; the loader skips it and reports it (key, shard, reason).
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from vlp.data import schema
from vlp.data.transforms import AugmentConfig, crop_box, min_decode_side, random_affine

if TYPE_CHECKING:
    from vlp.data.loader import LoaderConfig


class SampleError(ValueError):
    """One sample cannot be used; the loader skips it and counts it."""


def decode_radiograph(
    data: bytes,
    out_size: int,
    augment: AugmentConfig | None = None,
    rng: random.Random | None = None,
    max_upscale: float = 1.0,
) -> tuple[torch.Tensor, int]:
    """Decode a JPEG to a uint8 1×S×S grayscale tensor; returns ``(image, draft_scale)``.

    ``draft_scale`` is the JPEG DCT reduction PIL applied (1, 2, 4 or 8): the decoder is
    asked for the smallest image whose short side still covers the crop at full detail
    (:func:`~vlp.data.transforms.min_decode_side`), which makes decoding a large stored
    image cheaper (the entropy decoding still reads every coefficient, so about 1.3-2x).
    ``max_upscale`` > 1 lets the draft go that much below the needed size (the resize then
    upsamples slightly): a speed/detail trade-off, off by default. The crop box (centred square, or a random resized crop
    when augmenting) and the resize are one PIL call; the affine runs on the tensor.
    """
    augment = augment or AugmentConfig()
    rng = rng or random.Random(0)
    if max_upscale < 1.0:
        raise ValueError(f"max_upscale must be >= 1, got {max_upscale}")
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
            width = img.size[0]
            need = math.ceil(min_decode_side(out_size, augment) / max_upscale)
            img.draft("L", (need, need))
            draft_scale = max(1, round(width / img.size[0]))
            img.load()
            gray = img if img.mode == "L" else img.convert("L")
            box = crop_box(gray.size[0], gray.size[1], augment, rng)
            resized = gray.resize((out_size, out_size), Image.Resampling.BILINEAR, box=box)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SampleError(f"cannot decode JPEG: {type(exc).__name__}: {exc}") from exc
    image = torch.from_numpy(np.array(resized, dtype=np.uint8)).unsqueeze(0)
    if augment.affine:
        image = random_affine(image, augment, rng)
    return image, draft_scale


def _study_id(record: dict, key: str) -> int:
    for candidate in (record.get("study_id"), key.rsplit("-s", 1)[-1] if "-s" in key else None):
        digits = re.sub(r"\D", "", str(candidate)) if candidate is not None else ""
        if digits:
            return int(digits)
    raise SampleError(f"no numeric study id in json study_id={record.get('study_id')!r} or key")


def _labels(record: dict) -> tuple[list[float], int]:
    labels = record.get("labels") or {}
    if not isinstance(labels, dict):
        raise SampleError(f"json 'labels' must be an object, got {type(labels).__name__}")
    chexpert = labels.get("chexpert") or {}
    values = []
    for name in schema.CHEXPERT_LABELS:
        value = chexpert.get(name)
        if value is None:
            values.append(math.nan)
        elif value in (1, 0, -1):
            values.append(float(value))
        else:
            raise SampleError(f"chexpert label {name!r} = {value!r}, expected 1, 0, -1 or null")
    severity = labels.get("edema_severity")
    if severity is None:
        severity = -1
    elif severity not in (0, 1, 2, 3):
        raise SampleError(f"edema_severity = {severity!r}, expected 0-3 or null")
    return values, int(severity)


@dataclass
class _Decoded:
    key: str
    study_id: int
    frontal: torch.Tensor
    lateral: torch.Tensor | None
    priors: list[torch.Tensor | None]
    prior_gap_days: list[float]
    report: str
    sentences: list[str]
    labels: list[float]
    edema_severity: int
    meta: dict
    images: int = 0  # JPEGs decoded
    reduced: int = 0  # of which with draft scaling


class StudyDecoder:
    """Raw sample (member bytes) → decoded study; raises :class:`SampleError` on bad data."""

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self.lateral = "lateral" in cfg.views
        members = {"json", "txt", "frontal.jpg"}
        if self.lateral:
            members.add("lateral.jpg")
        members.update(f"prior{k}.frontal.jpg" for k in range(1, cfg.priors + 1))
        self.members = frozenset(members)

    def _image(self, raw: dict, member: str, rng: random.Random, out: _Decoded) -> torch.Tensor:
        try:
            image, scale = decode_radiograph(
                raw[member], self.cfg.image_size, self.cfg.augment, rng, self.cfg.draft_max_upscale
            )
        except SampleError as exc:
            raise SampleError(f"{member}: {exc}") from exc
        out.images += 1
        out.reduced += scale > 1
        return image

    def __call__(self, raw: dict, rng: random.Random) -> _Decoded:
        key = raw["__key__"]
        if "json" not in raw:
            raise SampleError("missing json member")
        try:
            record = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SampleError(f"json member is not UTF-8 JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise SampleError(f"json member must be an object, got {type(record).__name__}")
        if "txt" not in raw:
            raise SampleError("missing txt member")
        try:
            report = raw["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SampleError(f"txt member is not UTF-8: {exc}") from exc
        if "frontal.jpg" not in raw:
            raise SampleError("missing frontal.jpg member")
        sentences = record.get("sentences") or []
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise SampleError("json 'sentences' must be a list of strings")
        sentences = [s for s in sentences if s.strip()]
        if len(sentences) > self.cfg.max_sentences:
            if self.cfg.sentence_sampling == "random":
                chosen = sorted(rng.sample(range(len(sentences)), self.cfg.max_sentences))
                sentences = [sentences[i] for i in chosen]
            else:
                sentences = sentences[: self.cfg.max_sentences]
        labels, severity = _labels(record)
        out = _Decoded(
            key=key,
            study_id=_study_id(record, key),
            frontal=torch.empty(0),
            lateral=None,
            priors=[],
            prior_gap_days=[],
            report=report,
            sentences=sentences,
            labels=labels,
            edema_severity=severity,
            meta=record,
        )
        out.frontal = self._image(raw, "frontal.jpg", rng, out)
        if self.lateral and "lateral.jpg" in raw:
            out.lateral = self._image(raw, "lateral.jpg", rng, out)
        prior_records = record.get("priors") or []
        for k in range(1, self.cfg.priors + 1):
            member = f"prior{k}.frontal.jpg"
            out.priors.append(self._image(raw, member, rng, out) if member in raw else None)
            gap = None
            if member in raw and k <= len(prior_records) and isinstance(prior_records[k - 1], dict):
                gap = prior_records[k - 1].get("gap_days")
            out.prior_gap_days.append(float(gap) if isinstance(gap, (int, float)) else 0.0)
        return out
