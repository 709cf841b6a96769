"""One raw sample → decoded tensors and fields of one study.

One job: check a raw sample's members (``json``, ``txt``, the JPEG views) against the
schema and decode only those the recipe asks for. Images are grayscale JPEGs decoded with
PIL draft mode (DCT-domain downscaling by 1/2, 1/4 or 1/8) when the stored image is at
least twice as large as needed (``draft_max_upscale`` relaxes this), cropped and resized
in one PIL call, as uint8 1×H×W tensors. A sample that cannot be used raises
:class:`SampleError`; the loader skips it and reports it (key, shard, reason).

**Generic image–text samples** (img2dataset, open_clip: ``KEY.jpg|jpeg|png|webp`` +
``KEY.txt``, optionally ``KEY.json`` with the tool's metadata) are read as single-frontal
studies: the image is the frontal view (JPEG, PNG or WebP whatever the extension says,
converted to grayscale; JPEG with draft decoding; 16-bit images scaled by their own range
as the converter does), the text is the report and its sentences are those of
:func:`vlp.data.reports.split_sentences`; no lateral, no priors, no labels (NaN, -1). The
study id is the first 15 hexadecimal digits of SHA-256 of the key as an integer
(:func:`generic_study_id`: below 2**60, the same on every run and machine, as the DICOM
adapter derives ids from UIDs). ``meta`` is ``{"shard_format": "generic", "study_id",
"image_member", "report", "sentences", "metadata"}``, ``metadata`` the parsed ``json`` (or
None). An empty text, a missing image or text, two images, an image that does not decode
or a json that does not parse is a :class:`SampleError`, like a bad sample of ours.

Which layout a sample has (``data.shard_format: auto``): ours when it has a
``frontal.jpg`` (or another view member the recipe reads) or its ``json`` is a record of
our schema (an object with ``schema_version``), generic otherwise, so shards of both kinds
can be mixed in one pattern. ``vlp`` or ``generic`` reads every sample as that layout (a
sample of the other is then skipped under ``image`` or ``record``). A recipe that reads
what generic samples lack (another view, priors, label fields) fails at load with
``shard_format: generic`` (:func:`vlp.data.requirements.unmet`) and at the first generic
sample with ``auto`` (:class:`LayoutMismatch`).
"""

from __future__ import annotations

import hashlib
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
from vlp.data.convert.images import to_grayscale
from vlp.data.reports import split_sentences
from vlp.data.requirements import Requirements, beyond_generic
from vlp.data.transforms import (
    AffineParams,
    AugmentConfig,
    affine_params,
    crop_box,
    min_decode_side,
    random_affine,
)

if TYPE_CHECKING:
    from vlp.data.loader import LoaderConfig


#: why a sample was skipped, as counted by the loader (``LoaderStats.skipped_by_reason``):
#: an image that does not decode or is missing, text missing or not UTF-8, a bad JSON
#: record, and samples lost in a damaged (truncated, corrupt) shard.
SKIP_REASONS = ("image", "text", "record", "damaged_shard")


class SampleError(ValueError):
    """One sample cannot be used; the loader skips it and counts it under ``reason`` (one
    of :data:`SKIP_REASONS`)."""

    def __init__(self, message: str, reason: str = "record"):
        super().__init__(message)
        self.reason = reason


class LayoutMismatch(ValueError):
    """The recipe reads what a sample's layout cannot give (a lateral, priors or labels of a
    generic image–text sample): not a bad sample but a recipe that cannot train on this
    data, so the loader stops with one line instead of skipping every sample."""


def generic_study_id(key: str) -> int:
    """The numeric study id of a generic sample: its key hashed (see the module docstring)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:15], 16)


def decode_radiograph(
    data: bytes,
    out_size: int,
    augment: AugmentConfig | None = None,
    rng: random.Random | None = None,
    max_upscale: float = 1.0,
    formats: tuple[str, ...] = ("JPEG",),
) -> tuple[torch.Tensor, int]:
    """Decode a JPEG (or another of PIL's ``formats``) to a uint8 1×S×S grayscale tensor;
    returns ``(image, draft_scale)``.

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
        with Image.open(io.BytesIO(data), formats=formats) as img:
            width = img.size[0]
            need = math.ceil(min_decode_side(out_size, augment) / max_upscale)
            img.draft("L", (need, need))  # JPEG only: a no-op for PNG and WebP
            draft_scale = max(1, round(width / img.size[0]))
            img.load()
            gray = to_grayscale(img)
            box = crop_box(gray.size[0], gray.size[1], augment, rng)
            resized = gray.resize((out_size, out_size), Image.Resampling.BILINEAR, box=box)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        kind = "/".join(formats)
        raise SampleError(f"cannot decode {kind}: {type(exc).__name__}: {exc}", "image") from exc
    image = torch.from_numpy(np.array(resized, dtype=np.uint8)).unsqueeze(0)
    if augment.affine:
        image = random_affine(image, augment, rng)
    return image, draft_scale


#: JPEG colour modes the device decoder turns into grey levels as PIL's draft("L") does (the
#: luma channel); other modes (CMYK) and formats are decoded in the loader worker.
DEVICE_JPEG_MODES = ("L", "RGB")


@dataclass
class EncodedImage:
    """A view left encoded for decoding on the training device (``data.decode_device:
    cuda``), with what the CPU path would have decided for it in the worker."""

    data: torch.Tensor  # the JPEG file, uint8 1-D
    #: the crop (left, top, right, bottom) in full-resolution pixels of the stored image.
    box: tuple[float, float, float, float]
    affine: AffineParams | None  # the random affine's draw, None without one


def plan_radiograph(
    data: bytes,
    out_size: int,
    augment: AugmentConfig | None = None,
    rng: random.Random | None = None,
    max_upscale: float = 1.0,
    formats: tuple[str, ...] = ("JPEG",),
) -> EncodedImage | None:
    """What :func:`decode_radiograph` would do to a JPEG, decided from its header alone.

    The crop box is drawn from ``rng`` on the image size PIL's draft mode would decode
    (read from the header; nothing is decoded), then scaled to the stored resolution, and
    the affine is drawn after it: the same draws in the same order as the CPU path, so a
    sample's augmentation does not depend on where it is decoded. None (and ``rng``
    untouched) for what the device decoder does not take: another of ``formats`` than
    JPEG, or a colour mode outside :data:`DEVICE_JPEG_MODES`; the caller decodes those with
    :func:`decode_radiograph`. A file PIL cannot open as one of ``formats`` is a
    :class:`SampleError`, as on the CPU path; one whose header opens but whose data is
    damaged is only found when it is decoded (:mod:`vlp.data.device_decode`).
    """
    augment = augment or AugmentConfig()
    rng = rng or random.Random(0)
    try:
        with Image.open(io.BytesIO(data), formats=formats) as img:
            if img.format != "JPEG" or img.mode not in DEVICE_JPEG_MODES:
                return None
            width, height = img.size
            img.draft("L", (math.ceil(min_decode_side(out_size, augment) / max_upscale),) * 2)
            drafted = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        kind = "/".join(formats)
        raise SampleError(f"cannot decode {kind}: {type(exc).__name__}: {exc}", "image") from exc
    left, top, right, bottom = crop_box(drafted[0], drafted[1], augment, rng)
    sx, sy = width / drafted[0], height / drafted[1]
    box = (left * sx, top * sy, right * sx, bottom * sy)
    params = affine_params(out_size, out_size, augment, rng) if augment.affine else None
    return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, params)


def _numeric_id(value) -> int | None:
    """The digits of an id (``"50000012"``, ``"s50000012"``, 50000012) as an int, or None."""
    digits = re.sub(r"\D", "", str(value)) if value is not None else ""
    return int(digits) if digits else None


def _study_id(record: dict, key: str) -> int:
    for candidate in (record.get("study_id"), key.rsplit("-s", 1)[-1] if "-s" in key else None):
        number = _numeric_id(candidate)
        if number is not None:
            return number
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
class _Step:
    """One time step of a decoded sample: the current study (t = 0) or its k-th prior."""

    #: the study exists (the current one always; a prior when the record lists it).
    present: bool
    study_id: int  # -1 when absent
    gap_days: float  # days before the current study (0 for it and for absent priors)
    #: the views this study has: decoded, or left encoded for the device (EncodedImage)
    images: dict[str, torch.Tensor | EncodedImage]
    report: str
    sentences: list[str]
    #: this step's text was decoded (the current one always; priors with data.prior_text).
    text: bool


@dataclass
class _Decoded:
    key: str
    steps: list[_Step]  # T = 1 + data.priors
    labels: list[float]
    edema_severity: int
    meta: dict
    images: int = 0  # JPEGs decoded
    reduced: int = 0  # of which with draft scaling


def _sentences(value, cfg, rng: random.Random, where: str) -> list[str]:
    """A record's ``sentences`` checked, blank ones dropped, capped at ``max_sentences``."""
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise SampleError(f"json {where}'sentences' must be a list of strings")
    sentences = [s for s in value if s.strip()]
    if len(sentences) > cfg.max_sentences:
        if cfg.sentence_sampling == "random":
            chosen = sorted(rng.sample(range(len(sentences)), cfg.max_sentences))
            sentences = [sentences[i] for i in chosen]
        else:
            sentences = sentences[: cfg.max_sentences]
    return sentences


def _json(raw: dict):
    """The parsed ``json`` member (any JSON value)."""
    try:
        return json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError(f"json member is not UTF-8 JSON: {exc}") from exc


def _text(raw: dict) -> str:
    """The ``txt`` member: the report."""
    if "txt" not in raw:
        raise SampleError("missing txt member", "text")
    try:
        return raw["txt"].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError(f"txt member is not UTF-8: {exc}", "text") from exc


class StudyDecoder:
    """Raw sample (member bytes) → decoded study and its priors; raises
    :class:`SampleError` on bad data."""

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self.views = tuple(v for v in schema.BATCH_VIEWS if v in cfg.views)
        self.prior_views = tuple(
            v for v in self.views if cfg.prior_views is None or v in cfg.prior_views
        )
        views = {f"{v}.jpg" for v in self.views}
        views.update(
            f"prior{k}.{v}.jpg" for k in range(1, cfg.priors + 1) for v in self.prior_views
        )
        #: our image members this recipe reads: their presence marks a sample as ours.
        self.view_members = frozenset(views)
        members = {"json", "txt"}
        if cfg.shard_format != "generic":
            members |= views
        if cfg.shard_format != "vlp":
            members.update(schema.GENERIC_IMAGE_MEMBERS)
        self.members = frozenset(members)
        # What the recipe reads beyond one frontal image and its text, from the (narrowed)
        # loader config: checked at each generic sample.
        self.beyond_generic = beyond_generic(
            Requirements(
                views=frozenset(cfg.views),
                priors=cfg.priors,
                fields=frozenset(cfg.label_fields),
            )
        )

    def _image(
        self,
        raw: dict,
        member: str,
        rng: random.Random,
        out: _Decoded,
        formats: tuple[str, ...] = ("JPEG",),
    ) -> torch.Tensor | EncodedImage:
        try:
            if self.cfg.decode_device == "cuda":
                planned = plan_radiograph(
                    raw[member],
                    self.cfg.image_size,
                    self.cfg.augment,
                    rng,
                    self.cfg.draft_max_upscale,
                    formats,
                )
                if planned is not None:
                    out.images += 1
                    return planned
            image, scale = decode_radiograph(
                raw[member],
                self.cfg.image_size,
                self.cfg.augment,
                rng,
                self.cfg.draft_max_upscale,
                formats,
            )
        except SampleError as exc:
            raise SampleError(f"{member}: {exc}", exc.reason) from exc
        out.images += 1
        out.reduced += scale > 1
        return image

    def layout(self, raw: dict) -> str:
        """``vlp`` or ``generic``: how ``raw`` is read (the rule of the module docstring)."""
        if self.cfg.shard_format != "auto":
            return self.cfg.shard_format
        if not self.view_members.isdisjoint(raw):
            return "vlp"
        if "json" not in raw:
            return "generic"
        try:
            record = _json(raw)
        except SampleError:
            return "generic"  # not recognisably ours; the generic path reports the json
        return "vlp" if isinstance(record, dict) and "schema_version" in record else "generic"

    def __call__(self, raw: dict, rng: random.Random) -> _Decoded:
        if self.layout(raw) == "generic":
            return self._generic(raw, rng)
        key = raw["__key__"]
        if "json" not in raw:
            raise SampleError("missing json member")
        record = _json(raw)
        if not isinstance(record, dict):
            raise SampleError(f"json member must be an object, got {type(record).__name__}")
        report = _text(raw)
        if "frontal.jpg" not in raw:
            raise SampleError("missing frontal.jpg member", "image")
        labels, severity = _labels(record)
        out = _Decoded(key=key, steps=[], labels=labels, edema_severity=severity, meta=record)
        current = _Step(
            present=True,
            study_id=_study_id(record, key),
            gap_days=0.0,
            images={},
            report=report,
            sentences=_sentences(record.get("sentences"), self.cfg, rng, ""),
            text=True,
        )
        for view in self.views:
            if f"{view}.jpg" in raw:
                current.images[view] = self._image(raw, f"{view}.jpg", rng, out)
        out.steps.append(current)
        prior_records = record.get("priors") or []
        if not isinstance(prior_records, list):
            raise SampleError(f"json 'priors' must be a list, got {type(prior_records).__name__}")
        for k in range(1, self.cfg.priors + 1):
            out.steps.append(self._prior(raw, k, prior_records, rng, out))
        return out

    def _generic(self, raw: dict, rng: random.Random) -> _Decoded:
        """A generic image–text sample → a single-frontal study (see the module docstring)."""
        if self.beyond_generic:
            raise LayoutMismatch(
                "a generic image-text sample (one image and its text, data.shard_format "
                f"{self.cfg.shard_format}), but the recipe reads {', '.join(self.beyond_generic)}; "
                "train on shards in vlp's schema (vlp shards), or set data.shard_format: vlp "
                "to skip generic samples"
            )
        key = raw["__key__"]
        report = _text(raw).strip()
        if not report:
            raise SampleError("txt member is empty (the report of a generic sample)", "text")
        images = [m for m in schema.GENERIC_IMAGE_MEMBERS if m in raw]
        if not images:
            expected = ", ".join(f"{key}.{m}" for m in schema.GENERIC_IMAGE_MEMBERS)
            raise SampleError(f"missing image member (expected one of {expected})", "image")
        if len(images) > 1:
            raise SampleError(f"{len(images)} image members {images}, expected one", "image")
        metadata = _json(raw) if "json" in raw else None
        study_id = generic_study_id(key)
        sentences = split_sentences(report)
        meta = {
            "shard_format": "generic",
            "study_id": str(study_id),
            "image_member": images[0],
            "report": report,
            "sentences": sentences,
            "metadata": metadata,
        }
        unknown = [math.nan] * len(schema.CHEXPERT_LABELS)
        out = _Decoded(key=key, steps=[], labels=unknown, edema_severity=-1, meta=meta)
        frontal = self._image(raw, images[0], rng, out, schema.GENERIC_IMAGE_FORMATS)
        current = _Step(
            present=True,
            study_id=study_id,
            gap_days=0.0,
            images={"frontal": frontal},
            report=report,
            sentences=_sentences(sentences, self.cfg, rng, ""),
            text=True,
        )
        out.steps = [current]  # no priors: a recipe that reads them stopped above
        return out

    def _prior(self, raw: dict, k: int, records: list, rng: random.Random, out) -> _Step:
        """Time step ``k``: the k-th prior's views and, with ``data.prior_text``, its
        sentences (a prior's report is its sentences joined: the record keeps no other
        text of it)."""
        record = records[k - 1] if k <= len(records) else None
        if not isinstance(record, dict):
            if record is not None:
                raise SampleError(f"json priors[{k - 1}] must be an object")
            return _Step(False, -1, 0.0, {}, "", [], False)
        gap = record.get("gap_days")
        number = _numeric_id(record.get("study_id"))
        step = _Step(
            present=True,
            study_id=-1 if number is None else number,
            gap_days=float(gap) if isinstance(gap, (int, float)) else 0.0,
            images={},
            report="",
            sentences=[],
            text=self.cfg.prior_text,
        )
        if step.text:
            step.sentences = _sentences(record.get("sentences"), self.cfg, rng, f"priors[{k - 1}] ")
            step.report = " ".join(step.sentences)
        for view in self.prior_views:
            member = f"prior{k}.{view}.jpg"
            if member in raw:
                step.images[view] = self._image(raw, member, rng, out)
        return step
