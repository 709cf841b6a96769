"""Build one WebDataset sample (the members of one study) from a :class:`SampleTask`.

This is the work a converter process does: decode and resize the views of the study and
of its priors, encode them, and write the JSON record of :data:`vlp.data.schema.JSON_FIELDS`.
A task is plain data (picklable) so that it can travel to a worker process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from vlp.data.convert.images import EncodedImage, convert_image
from vlp.data.convert.records import (
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    BoxRef,
    ImageRef,
    Skip,
    StudyRecord,
)
from vlp.data.reports import training_text
from vlp.data.schema import CHEXPERT_LABELS, SCHEMA_VERSION


@dataclass
class PriorTask:
    study_id: str
    study_datetime: str | None
    gap_days: float
    sentences: list[str]
    frontal: list[ImageRef]
    lateral: list[ImageRef]


@dataclass
class SampleTask:
    key: str
    subject_id: str
    study_id: str
    split: str
    study_datetime: str | None
    frontal: list[ImageRef]
    lateral: list[ImageRef]
    report: str
    sections: dict[str, str]
    sentences: list[str]
    chexpert: dict[str, int | None]
    edema_severity: int | None
    progression: dict[str, str] | None
    boxes: list[BoxRef]
    priors: list[PriorTask]
    image_size: int
    quality: int
    source: str = ""


@dataclass
class SampleResult:
    """Members in tar order, or ``members is None`` when the study could not be built."""

    key: str
    members: list[tuple[str, bytes]] | None
    skips: list[Skip] = field(default_factory=list)


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def task_from_record(record: StudyRecord, image_size: int, quality: int) -> SampleTask:
    priors = []
    for index, (prior, gap) in enumerate(record.priors):
        frontal = list(prior.frontal)
        if index == 0 and record.previous_dicom_id:
            # MS-CXR-T labels compare with this exact image: try it first.
            frontal.sort(key=lambda im: im.dicom_id != record.previous_dicom_id)
        priors.append(
            PriorTask(
                study_id=prior.study_id,
                study_datetime=_iso(prior.study_datetime),
                gap_days=gap,
                sentences=list(prior.sentences),
                frontal=frontal,
                lateral=list(prior.lateral),
            )
        )
    return SampleTask(
        key=record.key,
        subject_id=record.subject_id,
        study_id=record.study_id,
        split=record.split,
        study_datetime=_iso(record.study_datetime),
        frontal=list(record.frontal),
        lateral=list(record.lateral),
        report=record.report,
        sections=dict(record.sections),
        sentences=list(record.sentences),
        chexpert=dict(record.chexpert),
        edema_severity=record.edema_severity,
        progression=record.progression,
        boxes=list(record.boxes),
        priors=priors,
        image_size=image_size,
        quality=quality,
        source=record.source,
    )


def _first_readable(
    candidates: list[ImageRef], task: SampleTask, skips: list[Skip], what: str
) -> tuple[ImageRef | None, EncodedImage | None]:
    """Encode the first candidate that decodes; log every failure as an image skip."""
    for ref in candidates:
        try:
            return ref, convert_image(ref.path, task.image_size, task.quality)
        except FileNotFoundError:
            reason, detail = MISSING_IMAGE, f"{what}: file not found"
        except Exception as error:  # noqa: BLE001 - any decoder failure means "unreadable"
            reason, detail = UNREADABLE_IMAGE, f"{what}: {type(error).__name__}: {error}"
        skips.append(Skip(ref.path, reason, detail, task.key, task.split, level="image"))
    return None, None


def _view_json(ref: ImageRef, image: EncodedImage) -> dict:
    return {
        "dicom_id": ref.dicom_id,
        "view": ref.view,
        "orig_size": list(image.orig_size),
        "size": list(image.size),
    }


def _scaled_boxes(task: SampleTask, stored: dict[str, tuple[str, EncodedImage]]) -> list[dict]:
    boxes = []
    for box in task.boxes:
        if box.dicom_id not in stored:
            continue
        view, image = stored[box.dicom_id]
        height, width = image.size
        sx, sy = width / box.image_width, height / box.image_height
        boxes.append(
            {
                "category": box.category,
                "phrase": box.phrase,
                "x": box.x * sx,
                "y": box.y * sy,
                "w": box.w * sx,
                "h": box.h * sy,
                "view": view,
            }
        )
    return boxes


def build_sample(task: SampleTask) -> SampleResult:
    """Decode every view of a study and its priors; return the sample's members."""
    skips: list[Skip] = []
    frontal_ref, frontal = _first_readable(task.frontal, task, skips, "frontal")
    if frontal is None:
        # The study's own frontal failed: the study is dropped and named by its image
        # (every candidate is listed as an image skip already).
        tried = ", ".join(os.path.basename(s.path) for s in skips)
        last = skips[-1] if skips else Skip(task.source, UNREADABLE_IMAGE, "no frontal candidate")
        skips.append(
            Skip(
                last.path,
                last.reason,
                f"no readable frontal image (tried {tried})",
                task.key,
                task.split,
                level="study",
            )
        )
        return SampleResult(task.key, None, skips)
    members: list[tuple[str, bytes]] = [("frontal.jpg", frontal.data)]
    stored = {frontal_ref.dicom_id: ("frontal", frontal)}
    lateral_ref, lateral = _first_readable(task.lateral, task, skips, "lateral")
    if lateral is not None:
        members.append(("lateral.jpg", lateral.data))
        stored[lateral_ref.dicom_id] = ("lateral", lateral)

    priors_json = []
    for prior in task.priors:
        p_ref, p_frontal = _first_readable(prior.frontal, task, skips, f"prior {prior.study_id}")
        if p_frontal is None:
            continue  # the prior is left out; its images are logged above
        number = len(priors_json) + 1
        members.append((f"prior{number}.frontal.jpg", p_frontal.data))
        pl_ref, p_lateral = _first_readable(prior.lateral, task, skips, f"prior {prior.study_id}")
        if p_lateral is not None:
            members.append((f"prior{number}.lateral.jpg", p_lateral.data))
        priors_json.append(
            {
                "study_id": prior.study_id,
                "study_datetime": prior.study_datetime,
                "gap_days": prior.gap_days,
                "sentences": prior.sentences,
                "frontal": _view_json(p_ref, p_frontal),
                "lateral": _view_json(pl_ref, p_lateral) if p_lateral is not None else None,
            }
        )

    record = {
        "schema_version": SCHEMA_VERSION,
        "subject_id": task.subject_id,
        "study_id": task.study_id,
        "split": task.split,
        "study_datetime": task.study_datetime,
        "frontal": _view_json(frontal_ref, frontal),
        "lateral": _view_json(lateral_ref, lateral) if lateral is not None else None,
        "report": task.report,
        "sections": task.sections,
        "sentences": task.sentences,
        "labels": {
            "chexpert": {label: task.chexpert.get(label) for label in CHEXPERT_LABELS},
            "edema_severity": task.edema_severity,
            "progression": task.progression,
            "boxes": _scaled_boxes(task, stored),
        },
        "priors": priors_json,
    }
    members.append(
        ("json", json.dumps(record, ensure_ascii=False, sort_keys=False).encode("utf-8"))
    )
    members.append(("txt", training_text(task.sections).encode("utf-8")))
    return SampleResult(task.key, members, skips)


def describe(skip: Skip) -> str:
    """One log line for a skip."""
    where = f" [{skip.study}]" if skip.study else ""
    detail = f" ({skip.detail})" if skip.detail else ""
    return f"{os.fspath(skip.path)}{where}: {skip.reason}{detail}"
