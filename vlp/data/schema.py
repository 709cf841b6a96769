"""The shard sample schema: the contract between converters, the phantom and the loader.

One WebDataset sample is one *study*. Its members are:

``__key__``
    ``p{subject_id}-s{study_id}``.
``frontal.jpg`` / ``lateral.jpg``
    Grayscale JPEGs, long side resized to the converter's ``--image-size``.
    ``lateral.jpg`` is absent when the study has no lateral view.
``prior{k}.frontal.jpg`` / ``prior{k}.lateral.jpg`` (k = 1..K)
    Earlier studies of the same subject, ``prior1`` the most recent.
``json``
    The study record described by :data:`JSON_FIELDS` (UTF-8 JSON, no pickle).
``txt``
    The training text (impression + findings), so that generic WebDataset
    tools (open_clip's trainer among them) can read the shards.

Boxes are stored in the pixel coordinates of the *stored* (resized) image.

The loader also reads *generic* image–text samples (img2dataset / open_clip shards):
``KEY.jpg`` (or ``.jpeg``, ``.png``, ``.webp``) + ``KEY.txt``, optionally ``KEY.json``
(the tool's own metadata, not :data:`JSON_FIELDS`). They are single-frontal studies
without labels; :mod:`vlp.data.decode` says how they are read and told apart from ours.
"""

from __future__ import annotations

SCHEMA_VERSION = 1

#: CheXpert's 14 observations, in the column order of mimic-cxr-2.0.0-chexpert.csv.
CHEXPERT_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

#: Findings with MS-CXR-T style progression labels.
PROGRESSION_FINDINGS: tuple[str, ...] = (
    "consolidation",
    "edema",
    "pleural_effusion",
    "pneumonia",
    "pneumothorax",
)
PROGRESSION_CLASSES: tuple[str, ...] = ("improving", "stable", "worsening")

#: the batch's views (``images[view]``), in the order every module lists them.
BATCH_VIEWS: tuple[str, ...] = ("frontal", "lateral")
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LATERAL", "LL"})
SPLITS: tuple[str, ...] = ("train", "validate", "test")


def check_view(view: str, key: str = "view") -> None:
    """Raise ``ValueError`` unless ``view`` is one of :data:`BATCH_VIEWS`."""
    if view not in BATCH_VIEWS:
        raise ValueError(f"{key} must be one of {list(BATCH_VIEWS)}, got {view!r}")


#: Image members of a sample; prior members are ``prior{k}.`` + one of these.
VIEW_MEMBERS = ("frontal.jpg", "lateral.jpg")

#: The image member of a generic image–text sample (one of them), and the formats PIL may
#: decode it as (web tools do not always keep the extension and the encoding in step).
GENERIC_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
GENERIC_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")

#: ``data.shard_format``: ``auto`` tells the layouts apart per sample, ``vlp`` and
#: ``generic`` read every sample as that layout.
SHARD_FORMATS = ("auto", "vlp", "generic")

#: Members a shard may contain. Anything else (notably ``.pyd``/``.pickle``) is rejected.
ALLOWED_SUFFIXES = ("jpg", "jpeg", "png", "webp", "json", "txt")

#: Fields of the ``json`` member (documentation; the converter writes exactly these).
JSON_FIELDS = {
    "schema_version": "int, SCHEMA_VERSION",
    "subject_id": "str",
    "study_id": "str",
    "split": "one of SPLITS",
    "study_datetime": "ISO 8601 string or null",
    "frontal": "{dicom_id, view, orig_size: [h, w], size: [h, w]}",
    "lateral": "same as frontal, or null when absent",
    "report": "raw report text",
    "sections": "{section name: text} (findings, impression, comparison, ...)",
    "sentences": "list[str], the sentences used for training",
    "labels": (
        "{chexpert: {label: 1|0|-1|null}, edema_severity: 0-3|null, "
        "progression: {finding: improving|stable|worsening}|null, "
        "boxes: [{category, phrase, x, y, w, h, view}]}"
    ),
    "priors": (
        "list of {study_id, study_datetime, gap_days, sentences, frontal, lateral}, "
        "most recent first, matching the prior{k}.*.jpg members"
    ),
}


# ----------------------------------------------------------------- input tables
# MIMIC-CXR-JPG and companion tables (edema severity, MS-CXR, MS-CXR-T): written by the
# phantom, read by the converter's ``mimic`` adapter.

METADATA_COLUMNS = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
CHEXPERT_COLUMNS = ("subject_id", "study_id", *CHEXPERT_LABELS)
EDEMA_COLUMNS = ("subject_id", "study_id", "edema_severity")
MS_CXR_COLUMNS = (
    "dicom_id",
    "category",
    "label_text",
    "x",
    "y",
    "w",
    "h",
    "image_width",
    "image_height",
)
MS_CXR_T_COLUMNS = (
    "dicom_id",
    "previous_dicom_id",
    "study_id",
    "subject_id",
    *(f"{f}_progression" for f in PROGRESSION_FINDINGS),
)

TABLE_FILES = {
    "metadata": "mimic-cxr-2.0.0-metadata.csv",
    "split": "mimic-cxr-2.0.0-split.csv",
    "chexpert": "mimic-cxr-2.0.0-chexpert.csv",
    "edema": "regex_report_edema_severity.csv",
    "ms_cxr": "MS_CXR_Local_Alignment_v1.0.0.csv",
    "ms_cxr_t": "MS_CXR_T_temporal_image_classification_v1.0.0.csv",
}


def sample_key(subject_id: str | int, study_id: str | int) -> str:
    """The ``__key__`` of a study."""
    return f"p{subject_id}-s{study_id}"
