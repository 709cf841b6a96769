"""Study records: the dataset-independent form every adapter produces.

An adapter (``mimic``, ``iu``, ``table``) reads its tables and returns
:class:`AdapterOutput`: one :class:`StudyRecord` per usable study plus a :class:`Skip`
for every input it had to drop, with the path and the reason. This module also holds
the rules that do not depend on the dataset: view preference, label parsing, patient
level split hygiene and the choice of prior studies.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from vlp.data.schema import (
    CHEXPERT_LABELS,
    FRONTAL_VIEWS,
    LATERAL_VIEWS,
    PROGRESSION_CLASSES,
    PROGRESSION_FINDINGS,
    SPLITS,
    sample_key,
)

# Reasons a study or image is dropped. Those in ERROR_REASONS are bad input and count
# towards ``--max-error-rate``; the others are the data being what it is (a study with
# only a lateral view cannot be a sample) and are only reported.
UNREADABLE_IMAGE = "unreadable image"
MISSING_IMAGE = "missing image file"
MISSING_REPORT = "missing report"
MALFORMED_ROW = "malformed row"
UNKNOWN_VIEW = "unknown view"
NO_FRONTAL = "no frontal view"
NO_REPORT_TEXT = "no findings/impression text"
ERROR_REASONS = frozenset(
    {UNREADABLE_IMAGE, MISSING_IMAGE, MISSING_REPORT, MALFORMED_ROW, UNKNOWN_VIEW}
)


class ConversionError(RuntimeError):
    """A conversion that cannot proceed: the message names the file, column or input."""


@dataclass(frozen=True)
class Skip:
    """One dropped input. ``study`` is the sample key when known, ``split`` likewise."""

    path: str
    reason: str
    detail: str = ""
    study: str = ""
    split: str = ""
    # "study": the study is not written; "row": one table row is ignored (its study may
    # still be written, e.g. without labels); "image": one image is not used.
    level: str = "study"

    @property
    def is_error(self) -> bool:
        return self.level in ("study", "row") and self.reason in ERROR_REASONS

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "reason": self.reason,
            "detail": self.detail,
            "study": self.study,
            "split": self.split,
            "level": self.level,
        }


@dataclass(frozen=True)
class ImageRef:
    dicom_id: str
    path: str
    view: str


@dataclass(frozen=True)
class BoxRef:
    """A box in the pixel coordinates of the original image (MS-CXR convention)."""

    dicom_id: str
    category: str
    phrase: str
    x: float
    y: float
    w: float
    h: float
    image_width: float
    image_height: float


@dataclass
class StudyRecord:
    subject_id: str
    study_id: str
    split: str
    study_datetime: dt.datetime | None
    frontal: list[ImageRef]  # candidates, most preferred first
    lateral: list[ImageRef]
    report: str
    sections: dict[str, str]
    sentences: list[str]
    chexpert: dict[str, int | None] = field(
        default_factory=lambda: {label: None for label in CHEXPERT_LABELS}
    )
    edema_severity: int | None = None
    progression: dict[str, str] | None = None
    previous_dicom_id: str | None = None  # MS-CXR-T: the prior image the labels refer to
    boxes: list[BoxRef] = field(default_factory=list)
    source: str = ""  # a path that identifies the study in messages
    priors: list[tuple[StudyRecord, float]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return sample_key(self.subject_id, self.study_id)


@dataclass
class AdapterOutput:
    """What an adapter hands to the writer."""

    adapter: str
    records: list[StudyRecord]
    skips: list[Skip]
    studies_seen: int
    inputs: dict[str, dict]  # input name -> fingerprint (see :func:`fingerprint_file`)


# ----------------------------------------------------------------------------- helpers


def read_table(
    path: str, required: Iterable[str], what: str
) -> tuple[list[tuple[int, dict[str, str]]], list[Skip], list[str]]:
    """Read a CSV table. Returns ``(rows, skips, columns)``; rows carry their line number.

    Missing file or missing required columns fail at once with a message naming them;
    a row with the wrong number of fields is skipped as a malformed row.
    """
    import csv

    if not os.path.isfile(path):
        raise ConversionError(f"{what} not found: {path}")
    rows: list[tuple[int, dict[str, str]]] = []
    skips: list[Skip] = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        missing = [column for column in required if column not in columns]
        if missing:
            raise ConversionError(
                f"{what} {path} lacks required column(s) {', '.join(missing)}; "
                f"found: {', '.join(columns) or '(no header)'}"
            )
        for row in reader:
            line = reader.line_num
            if None in row or any(value is None for value in row.values()):
                skips.append(
                    Skip(
                        f"{path}:{line}",
                        MALFORMED_ROW,
                        f"expected {len(columns)} fields",
                        level="row",
                    )
                )
                continue
            rows.append((line, row))
    return rows, skips, columns


def fingerprint_file(path: str) -> dict:
    """Size and SHA-256 of a table (tables are small next to images, hashing is cheap)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {
        "path": os.path.basename(path),
        "bytes": os.path.getsize(path),
        "sha256": digest.hexdigest(),
    }


#: Generic view names for sources that only know the projection (Open-i, CSV tables).
GENERIC_FRONTAL = "FRONTAL"
GENERIC_LATERAL = "LATERAL"


def classify_view(view: str) -> str | None:
    """``"frontal"``, ``"lateral"`` or None for a DICOM ViewPosition-like string.

    Besides the DICOM values of :mod:`vlp.data.schema`, ``FRONTAL`` is accepted for
    sources that know the projection but not PA versus AP.
    """
    view = (view or "").strip().upper()
    if view in FRONTAL_VIEWS or view == GENERIC_FRONTAL:
        return "frontal"
    if view in LATERAL_VIEWS:
        return "lateral"
    return None


def order_views(images: Iterable[ImageRef], preferred: Iterable[str] = ()) -> tuple[list, list]:
    """Split a study's images into frontal and lateral candidate lists.

    Frontal: images in ``preferred`` (e.g. the dicom an MS-CXR box is drawn on) first,
    then PA before AP (PA is the standard erect view, AP the bedside one), then by
    dicom id. Lateral: LATERAL before LL, then by dicom id.
    """
    preferred = set(preferred)
    frontal = [im for im in images if classify_view(im.view) == "frontal"]
    lateral = [im for im in images if classify_view(im.view) == "lateral"]
    frontal.sort(
        key=lambda im: (im.dicom_id not in preferred, im.view.upper() != "PA", im.dicom_id)
    )
    lateral.sort(key=lambda im: (im.view.upper() != "LATERAL", im.dicom_id))
    return frontal, lateral


def parse_chexpert_value(value: str) -> int | None:
    """CheXpert cell → 1, 0, -1 or None (blank). Raises ValueError for anything else."""
    text = (value or "").strip()
    if text == "" or text.lower() == "nan":
        return None
    number = float(text)
    if number not in (1.0, 0.0, -1.0):
        raise ValueError(f"CheXpert value {value!r} is not 1, 0, -1 or blank")
    return int(number)


def parse_edema(value: str) -> int | None:
    text = (value or "").strip()
    if text == "":
        return None
    number = float(text)
    if number not in (0.0, 1.0, 2.0, 3.0):
        raise ValueError(f"edema severity {value!r} is not 0, 1, 2 or 3")
    return int(number)


def parse_progression(row: dict[str, str]) -> dict[str, str]:
    """``{finding: class}`` from the ``{finding}_progression`` columns of MS-CXR-T."""
    labels = {}
    for finding in PROGRESSION_FINDINGS:
        value = (row.get(f"{finding}_progression") or "").strip().lower()
        if not value:
            continue
        if value not in PROGRESSION_CLASSES:
            raise ValueError(
                f"{finding}_progression {value!r} is not one of {', '.join(PROGRESSION_CLASSES)}"
            )
        labels[finding] = value
    return labels


def parse_mimic_datetime(date: str, time: str) -> dt.datetime | None:
    """MIMIC StudyDate ``YYYYMMDD`` and StudyTime ``HHMMSS(.f)`` (leading zeros may be lost)."""
    date = (date or "").strip()
    if not date:
        return None
    day = dt.datetime.strptime(str(int(float(date))), "%Y%m%d")
    time = (time or "").strip()
    if not time:
        return day
    seconds_of_day = float(time)
    whole = int(seconds_of_day)
    hhmmss = f"{whole:06d}"
    micro = round((seconds_of_day - whole) * 1e6)
    return day.replace(
        hour=int(hhmmss[:2]), minute=int(hhmmss[2:4]), second=int(hhmmss[4:6])
    ) + dt.timedelta(microseconds=micro)


def split_by_hash(subject_id: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """Deterministic patient-level split for datasets without an official one."""
    digest = hashlib.sha256(f"{seed}:{subject_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    total = sum(fractions)
    edge = 0.0
    for split, fraction in zip(SPLITS, fractions):
        edge += fraction / total
        if u < edge:
            return split
    return SPLITS[-1]


def check_subject_splits(rows: Iterable[tuple[str, str, str]]) -> None:
    """Raise when a subject is assigned to two splits. ``rows``: (subject, split, source)."""
    seen: dict[str, tuple[str, str]] = {}
    for subject, split, source in rows:
        if split not in SPLITS:
            raise ConversionError(f"{source}: split {split!r} is not one of {', '.join(SPLITS)}")
        first = seen.setdefault(subject, (split, source))
        if first[0] != split:
            raise ConversionError(
                f"subject {subject} appears in two splits: {first[0]!r} ({first[1]}) and "
                f"{split!r} ({source}); a patient must stay in one split"
            )


def assign_priors(records: list[StudyRecord], k: int) -> None:
    """Attach up to ``k`` earlier studies of the same subject and split to every record.

    Studies are ordered by (datetime, study id); a prior must be strictly earlier and have
    a frontal view. The most recent prior comes first, except that the study holding
    the MS-CXR-T ``previous_dicom_id`` (when given) is moved to the front, so that the
    progression labels refer to ``prior1``. Studies without a datetime get no priors and
    are nobody's prior. ``gap_days`` is the fractional number of days between them.
    """
    by_subject: dict[tuple[str, str], list[StudyRecord]] = {}
    for record in records:
        record.priors = []
        if record.study_datetime is not None:
            by_subject.setdefault((record.subject_id, record.split), []).append(record)
    if k <= 0:
        return
    for studies in by_subject.values():
        studies.sort(key=lambda r: (r.study_datetime, r.study_id))
        for index, record in enumerate(studies):
            earlier = [
                p
                for p in reversed(studies[:index])
                if p.study_datetime < record.study_datetime and p.frontal
            ]
            if record.previous_dicom_id:
                holder = [
                    p
                    for p in earlier
                    if any(im.dicom_id == record.previous_dicom_id for im in p.frontal)
                ]
                earlier = holder + [p for p in earlier if p not in holder]
            record.priors = [
                (p, (record.study_datetime - p.study_datetime).total_seconds() / 86400.0)
                for p in earlier[:k]
            ]


def build_record(
    subject_id: str,
    study_id: str,
    split: str,
    study_datetime: dt.datetime | None,
    images: list[ImageRef],
    report: str,
    source: str,
    sections: dict[str, str] | None = None,
    preferred: Iterable[str] = (),
    unknown_view_is_error: bool = False,
) -> tuple[StudyRecord | None, list[Skip]]:
    """A record for one study, or None and the skips that explain why not.

    Images with a view that is neither frontal nor lateral are skipped (image level).
    A study without a frontal view is dropped: as ``unknown view`` (an error) when
    ``unknown_view_is_error`` and none of its views was recognised (the source names
    the views itself, e.g. a CSV table), else as ``no frontal view``. A study whose
    report has no findings/impression/last-paragraph sentence is dropped too.
    """
    from vlp.data.reports import parse_sections, training_sentences

    key = sample_key(subject_id, study_id)
    skips = [
        Skip(im.path, UNKNOWN_VIEW, f"view {im.view!r}", key, split, level="image")
        for im in images
        if classify_view(im.view) is None
    ]
    frontal, lateral = order_views(images, preferred)
    if not frontal:
        views = ", ".join(sorted({repr(im.view) for im in images})) or "none"
        reason = UNKNOWN_VIEW if unknown_view_is_error and not lateral else NO_FRONTAL
        skips.append(Skip(source, reason, f"views: {views}", key, split))
        return None, skips
    if sections is None:
        sections = parse_sections(report)
    sentences = training_sentences(sections)
    if not sentences:
        skips.append(Skip(source, NO_REPORT_TEXT, "", key, split))
        return None, skips
    record = StudyRecord(
        subject_id=subject_id,
        study_id=study_id,
        split=split,
        study_datetime=study_datetime,
        frontal=frontal,
        lateral=lateral,
        report=report,
        sections=sections,
        sentences=sentences,
        source=source,
    )
    return record, skips
