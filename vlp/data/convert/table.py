"""Adapter for a generic CSV table: one row per image.

Columns (header names are exact; order does not matter):

====================  ========  ===========================================================
column                required  meaning
====================  ========  ===========================================================
``subject_id``        yes       patient id; a patient never spans two splits
``study_id``          yes       study id; rows with the same (subject_id, study_id) form one
                                study (one sample)
``image_path``        yes       image file (JPEG or PNG, any bit depth), absolute or
                                relative to the table's folder (or to ``--image-root``)
``view``              yes       ``PA``, ``AP``, ``LATERAL``, ``LL``, or ``FRONTAL``
                                (projection known, PA/AP not); other values are skipped
``report_text``       one of    the report itself (MIMIC-style headers ``FINDINGS:`` /
``report_path``       the two   ``IMPRESSION:`` after a newline are sectioned; text without
                                headers is used whole as ``last_paragraph``) or a path to a
                                text file (relative like ``image_path``)
``study_datetime``    no        ISO 8601 (``2180-05-06T15:20:11`` or ``2180-05-06``);
                                orders priors; blank = unknown (no priors)
``split``             no        ``train``, ``validate`` or ``test``; when the column is
                                absent, subjects are split by a seeded hash with
                                ``--split-fractions``
``dicom_id``          no        image id (default: the image file name without extension)
CheXpert labels       no        columns named like :data:`vlp.data.schema.CHEXPERT_LABELS`
                                (``Atelectasis`` ... ``Support Devices``): 1, 0, -1 or blank
``edema_severity``    no        0-3 or blank
====================  ========  ===========================================================

The report, datetime, split and labels of a study are read from its first row.
A row with an invalid value (label, datetime, split) drops its study as a malformed row;
a study none of whose views is recognised is an ``unknown view`` error.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections import defaultdict

from vlp.data.convert.records import (
    MALFORMED_ROW,
    MISSING_REPORT,
    AdapterOutput,
    ConversionError,
    ImageRef,
    Skip,
    build_record,
    check_subject_splits,
    fingerprint_file,
    parse_chexpert_value,
    parse_edema,
    read_table,
    split_by_hash,
)
from vlp.data.reports import parse_sections
from vlp.data.schema import CHEXPERT_LABELS, sample_key

REQUIRED = ("subject_id", "study_id", "image_path", "view")
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)


def _resolve(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


def _study_fields(row: dict, columns: list[str]) -> dict:
    """Parse the per-study values of a row; ValueError names the offending column."""
    fields: dict = {}
    text = (row.get("study_datetime") or "").strip()
    try:
        fields["datetime"] = dt.datetime.fromisoformat(text) if text else None
    except ValueError:
        raise ValueError(f"study_datetime {text!r} is not ISO 8601") from None
    fields["chexpert"] = {}
    for label in CHEXPERT_LABELS:
        if label in columns:
            try:
                fields["chexpert"][label] = parse_chexpert_value(row[label])
            except ValueError as error:
                raise ValueError(f"column {label!r}: {error}") from None
        else:
            fields["chexpert"][label] = None
    fields["edema"] = (
        parse_edema(row.get("edema_severity", "")) if "edema_severity" in columns else None
    )
    return fields


def read_table_adapter(
    table: str,
    image_root: str | None = None,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
) -> AdapterOutput:
    """Read a CSV table (see the module docstring) into study records."""
    rows, skips, columns = read_table(table, REQUIRED, "image table")
    if "report_text" not in columns and "report_path" not in columns:
        raise ConversionError(
            f"image table {table} needs a 'report_text' or a 'report_path' column; "
            f"found: {', '.join(columns)}"
        )
    base = image_root or os.path.dirname(os.path.abspath(table))
    has_split = "split" in columns
    inputs = {"table": fingerprint_file(table)}

    studies: dict[tuple[str, str], list[tuple[int, dict]]] = defaultdict(list)
    for line, row in rows:
        subject, study = row["subject_id"].strip(), row["study_id"].strip()
        if not subject or not study:
            skips.append(
                Skip(f"{table}:{line}", MALFORMED_ROW, "empty subject_id or study_id", level="row")
            )
            continue
        studies[(subject, study)].append((line, row))
    if has_split:
        # Raises on a split value outside SPLITS or a subject in two splits.
        check_subject_splits(
            (subject, row["split"].strip(), f"{table}:{line}")
            for (subject, _), group in studies.items()
            for line, row in group
        )
    keys = sorted(studies, key=lambda k: sample_key(*k))
    if limit is not None:
        keys = keys[:limit]

    records = []
    for subject_id, study_id in keys:
        group = studies[(subject_id, study_id)]
        key = sample_key(subject_id, study_id)
        first_line, first = group[0]
        where = f"{table}:{first_line}"
        split = (
            first["split"].strip()
            if has_split
            else split_by_hash(subject_id, seed, split_fractions)
        )
        try:
            fields = _study_fields(first, columns)
        except ValueError as error:
            skips.append(Skip(where, MALFORMED_ROW, str(error), key, split))
            continue
        report_path = (first.get("report_path") or "").strip()
        report = (first.get("report_text") or "").strip()
        source = where
        if not report and report_path:
            source = _resolve(base, report_path)
            try:
                with open(source, encoding="utf-8") as handle:
                    report = handle.read()
            except OSError as error:
                skips.append(Skip(source, MISSING_REPORT, type(error).__name__, key, split))
                continue
        if not report:
            skips.append(
                Skip(where, MISSING_REPORT, "empty report_text and report_path", key, split)
            )
            continue
        # MIMIC headers are "\n NAME: "; tables usually write "NAME:" at a line start.
        sections = parse_sections("\n " + re.sub(r"\n(?! )", "\n ", report))
        images = []
        for _line, row in group:
            path = _resolve(base, row["image_path"].strip())
            dicom_id = (row.get("dicom_id") or "").strip() or os.path.splitext(
                os.path.basename(path)
            )[0]
            images.append(ImageRef(dicom_id, path, row["view"].strip().upper()))
        record, bad = build_record(
            subject_id,
            study_id,
            split,
            fields["datetime"],
            images,
            report,
            source,
            sections=sections,
            unknown_view_is_error=True,
        )
        skips += bad
        if record is None:
            continue
        record.chexpert = fields["chexpert"]
        record.edema_severity = fields["edema"]
        records.append(record)
    return AdapterOutput("csv", records, skips, len(keys), inputs)
