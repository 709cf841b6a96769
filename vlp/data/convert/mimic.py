"""Adapter for MIMIC-CXR-JPG and MIMIC-CXR (DICOM) (Johnson et al., 2019) and their
PhysioNet companions.

Reads, under ``--root``:

* ``mimic-cxr-2.0.0-metadata.csv`` (required): ``dicom_id, subject_id, study_id,
  ViewPosition, StudyDate, StudyTime``;
* ``mimic-cxr-2.0.0-split.csv`` (required): ``dicom_id, study_id, subject_id, split``;
* ``mimic-cxr-2.0.0-chexpert.csv`` or, failing that, ``-negbio.csv`` (optional):
  ``subject_id, study_id`` + the 14 CheXpert labels (1, 0, -1, blank kept as null);
* images ``files/pXX/p{subject}/s{study}/{dicom}.jpg`` (MIMIC-CXR-JPG) or ``{dicom}.dcm``
  (MIMIC-CXR) under ``--images`` (default ``--root``);
* reports ``files/pXX/p{subject}/s{study}.txt`` under ``--reports`` (default ``--images``,
  else ``--root``: MIMIC-CXR keeps them beside its DICOM folders).

MIMIC-CXR (DICOM) ships neither the metadata nor the split table: they are MIMIC-CXR-JPG's
(the ``dicom_id`` is the same), so a DICOM conversion is ``--root`` the JPG release's
tables, ``--images`` and ``--reports`` the DICOM release. ``--image-format`` chooses the
file of each image: ``auto`` (default) takes ``{dicom}.jpg`` when it exists, else
``{dicom}.dcm`` when that exists (an image found as neither is reported missing under its
``.jpg`` name); ``jpg`` and ``dcm`` take only that kind. DICOM pixels go through the
display pipeline of :mod:`vlp.data.convert.dicom` (modality and VOI LUTs, MONOCHROME1).

Optional label tables are found at the root by their standard names, or given with flags
(which override): ``regex_report_edema_severity.csv`` (``subject_id, study_id,
edema_severity``, Liao et al. 2021 / Chauhan et al. 2020), MS-CXR
``MS_CXR_Local_Alignment_v1.0.0.csv`` (``dicom_id, category, label_text, x, y, w, h,
image_width, image_height``, Boecking et al. 2022) and MS-CXR-T
``MS_CXR_T_temporal_image_classification_v1.0.0.csv`` (``dicom_id, previous_dicom_id,
study_id, subject_id, {finding}_progression``, Bannur et al. 2023).

Views other than PA/AP/LATERAL/LL (``AP AXIAL``, blanks, ...) exist in the real metadata:
those images are skipped and reported, and a study left without a frontal view is
reported as ``no frontal view``; neither counts as an error.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

from tqdm import tqdm

from vlp.data.convert.records import (
    MALFORMED_ROW,
    MISSING_REPORT,
    AdapterOutput,
    BoxRef,
    ConversionError,
    ImageRef,
    Skip,
    build_record,
    check_subject_splits,
    fingerprint_file,
    parse_chexpert_value,
    parse_edema,
    parse_mimic_datetime,
    parse_progression,
    read_table,
)
from vlp.data.schema import (
    CHEXPERT_COLUMNS,
    CHEXPERT_LABELS,
    EDEMA_COLUMNS,
    MS_CXR_COLUMNS,
    SPLIT_COLUMNS,
    TABLE_FILES,
    sample_key,
)

METADATA = TABLE_FILES["metadata"]
SPLIT = TABLE_FILES["split"]
CHEXPERT = (TABLE_FILES["chexpert"], "mimic-cxr-2.0.0-negbio.csv")
EDEMA = TABLE_FILES["edema"]
BOXES = TABLE_FILES["ms_cxr"]
PROGRESSION = TABLE_FILES["ms_cxr_t"]


def study_dir(root: str, subject_id: str, study_id: str) -> str:
    """``root/files/pXX/p{subject}/s{study}`` (XX: the first two digits of the subject)."""
    return os.path.join(root, "files", f"p{subject_id[:2]}", f"p{subject_id}", f"s{study_id}")


IMAGE_FORMATS = ("auto", "jpg", "dcm")


def image_path(folder: str, dicom_id: str, image_format: str) -> str:
    """The file of one image in a study folder, by ``image_format`` (module docstring)."""
    jpg = os.path.join(folder, f"{dicom_id}.jpg")
    dcm = os.path.join(folder, f"{dicom_id}.dcm")
    if image_format == "auto":
        return dcm if not os.path.exists(jpg) and os.path.exists(dcm) else jpg
    return dcm if image_format == "dcm" else jpg


def _optional(root: str, explicit: str | None, names) -> str | None:
    if explicit:
        return explicit
    for name in (names,) if isinstance(names, str) else names:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def read_mimic(
    root: str,
    reports: str | None = None,
    chexpert: str | None = None,
    edema: str | None = None,
    boxes: str | None = None,
    progression: str | None = None,
    images: str | None = None,
    image_format: str = "auto",
    limit: int | None = None,
    progress: bool = True,
) -> AdapterOutput:
    """Read a MIMIC-CXR-JPG or MIMIC-CXR tree into study records (module docstring)."""
    if image_format not in IMAGE_FORMATS:
        raise ConversionError(
            f"image format {image_format!r} is not one of {', '.join(IMAGE_FORMATS)}"
        )
    images_root = images or root
    reports = reports or images_root
    kinds: Counter[str] = Counter()
    skips: list[Skip] = []
    inputs: dict[str, dict] = {}

    metadata_path = os.path.join(root, METADATA)
    meta_rows, bad, _ = read_table(
        metadata_path,
        ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"],
        "MIMIC-CXR-JPG metadata",
    )
    skips += bad
    inputs["metadata"] = fingerprint_file(metadata_path)

    split_path = os.path.join(root, SPLIT)
    split_rows, bad, _ = read_table(split_path, list(SPLIT_COLUMNS), "MIMIC-CXR-JPG split table")
    skips += bad
    inputs["split"] = fingerprint_file(split_path)
    check_subject_splits(
        (row["subject_id"].strip(), row["split"].strip(), f"{split_path}:{line}")
        for line, row in split_rows
    )
    split_of_dicom = {row["dicom_id"].strip(): row["split"].strip() for _, row in split_rows}

    # Group image rows into studies.
    studies: dict[tuple[str, str], list[tuple[int, dict]]] = defaultdict(list)
    for line, row in meta_rows:
        studies[(row["subject_id"].strip(), row["study_id"].strip())].append((line, row))
    keys = sorted(studies, key=lambda k: sample_key(*k))
    if limit is not None:
        keys = keys[:limit]

    labels = _read_chexpert(_optional(root, chexpert, CHEXPERT), skips, inputs)
    edema_of = _read_edema(_optional(root, edema, EDEMA), skips, inputs)
    boxes_of = _read_boxes(_optional(root, boxes, BOXES), skips, inputs)
    progression_of = _read_progression(_optional(root, progression, PROGRESSION), skips, inputs)

    records = []
    for subject_id, study_id in tqdm(keys, desc="read mimic", unit="study", disable=not progress):
        key = sample_key(subject_id, study_id)
        folder = study_dir(images_root, subject_id, study_id)
        study_images: list[ImageRef] = []
        dates = []
        split = ""
        for line, row in studies[(subject_id, study_id)]:
            dicom_id = row["dicom_id"].strip()
            try:
                when = parse_mimic_datetime(row["StudyDate"], row["StudyTime"])
            except ValueError as error:
                skips.append(
                    Skip(f"{metadata_path}:{line}", MALFORMED_ROW, str(error), key, level="row")
                )
                continue
            if dicom_id not in split_of_dicom:
                skips.append(
                    Skip(
                        f"{metadata_path}:{line}",
                        MALFORMED_ROW,
                        f"dicom {dicom_id} not in {SPLIT}",
                        key,
                        level="row",
                    )
                )
                continue
            split = split_of_dicom[dicom_id]
            dates.append(when)
            path = image_path(folder, dicom_id, image_format)
            kinds[os.path.splitext(path)[1][1:]] += 1
            study_images.append(ImageRef(dicom_id, path, row["ViewPosition"].strip()))
        if not study_images:
            continue  # every row was malformed: already counted
        report_path = study_dir(reports, subject_id, study_id) + ".txt"
        try:
            with open(report_path, encoding="utf-8") as handle:
                report = handle.read()
        except OSError as error:
            skips.append(Skip(report_path, MISSING_REPORT, type(error).__name__, key, split))
            continue
        progression_row = progression_of.get(study_id)
        study_boxes = [box for im in study_images for box in boxes_of.get(im.dicom_id, [])]
        preferred = sorted({box.dicom_id for box in study_boxes})
        if progression_row:
            preferred.insert(0, progression_row[0])
        record, bad = build_record(
            subject_id,
            study_id,
            split,
            min((d for d in dates if d is not None), default=None),
            study_images,
            report,
            report_path,
            preferred=preferred,
        )
        skips += bad
        if record is None:
            continue
        record.chexpert = labels.get((subject_id, study_id), record.chexpert)
        record.edema_severity = edema_of.get((subject_id, study_id))
        record.boxes = study_boxes
        if progression_row:
            _, previous, labels_ = progression_row
            record.progression = labels_
            record.previous_dicom_id = previous
        records.append(record)
    if kinds["dcm"]:
        # Part of the plan: a resumed conversion must not mix JPEG and DICOM decodes of
        # one tree. Only recorded when DICOM is read, so that a MIMIC-CXR-JPG conversion
        # keeps the plan it had before DICOM was supported (and its runs still resume).
        inputs["images"] = {"format": image_format, **dict(sorted(kinds.items()))}
    return AdapterOutput("mimic", records, skips, len(keys), inputs)


def _read_chexpert(path, skips, inputs) -> dict:
    if path is None:
        return {}
    rows, bad, _ = read_table(path, list(CHEXPERT_COLUMNS), "CheXpert label table")
    skips += bad
    inputs["chexpert"] = fingerprint_file(path)
    labels = {}
    for line, row in rows:
        try:
            values = {label: parse_chexpert_value(row[label]) for label in CHEXPERT_LABELS}
        except ValueError as error:
            skips.append(Skip(f"{path}:{line}", MALFORMED_ROW, str(error), level="row"))
            continue
        labels[(row["subject_id"].strip(), row["study_id"].strip())] = values
    return labels


def _read_edema(path, skips, inputs) -> dict:
    if path is None:
        return {}
    rows, bad, _ = read_table(path, list(EDEMA_COLUMNS), "edema severity table")
    skips += bad
    inputs["edema"] = fingerprint_file(path)
    severity = {}
    for line, row in rows:
        try:
            value = parse_edema(row["edema_severity"])
        except ValueError as error:
            skips.append(Skip(f"{path}:{line}", MALFORMED_ROW, str(error), level="row"))
            continue
        severity[(row["subject_id"].strip(), row["study_id"].strip())] = value
    return severity


def _read_boxes(path, skips, inputs) -> dict:
    """Boxes keyed by the dicom they are drawn on."""
    if path is None:
        return {}
    columns = list(MS_CXR_COLUMNS)
    rows, bad, _ = read_table(path, columns, "MS-CXR box table")
    skips += bad
    inputs["boxes"] = fingerprint_file(path)
    by_dicom: dict[str, list[BoxRef]] = defaultdict(list)
    for line, row in rows:
        try:
            box = BoxRef(
                dicom_id=row["dicom_id"].strip(),
                category=row["category"].strip(),
                phrase=row["label_text"].strip(),
                **{c: float(row[c]) for c in ("x", "y", "w", "h", "image_width", "image_height")},
            )
            if box.image_width <= 0 or box.image_height <= 0:
                raise ValueError("image_width/image_height must be positive")
        except ValueError as error:
            skips.append(Skip(f"{path}:{line}", MALFORMED_ROW, str(error), level="row"))
            continue
        by_dicom[box.dicom_id].append(box)
    return dict(by_dicom)


def _read_progression(path, skips, inputs) -> dict:
    if path is None:
        return {}
    rows, bad, _ = read_table(
        path,
        ["dicom_id", "previous_dicom_id", "study_id", "subject_id"],
        "MS-CXR-T progression table",
    )
    skips += bad
    inputs["progression"] = fingerprint_file(path)
    result = {}
    for line, row in rows:
        try:
            labels = parse_progression(row)
        except ValueError as error:
            skips.append(Skip(f"{path}:{line}", MALFORMED_ROW, str(error), level="row"))
            continue
        result[row["study_id"].strip()] = (
            row["dicom_id"].strip(),
            row["previous_dicom_id"].strip(),
            labels,
        )
    return result
