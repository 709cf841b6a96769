"""The CSV tables of a phantom dataset, with MIMIC-CXR-JPG / MS-CXR / MS-CXR-T columns.

One job: turn the per-study ground-truth records (``phantom_truth.jsonl``) into the tables
a MIMIC-CXR-JPG converter and the benchmark evaluators read, with exactly the public
files' names and columns:

* ``mimic-cxr-2.0.0-metadata.csv``, ``-split.csv``, ``-chexpert.csv`` (MIMIC-CXR-JPG 2.0.0)
* ``regex_report_edema_severity.csv`` (PhysioNet pulmonary edema severity grades)
* ``MS_CXR_Local_Alignment_v1.0.0.csv`` (MS-CXR phrase grounding boxes)
* ``MS_CXR_T_temporal_image_classification_v1.0.0.csv`` (MS-CXR-T progression)
"""

from __future__ import annotations

import csv
from pathlib import Path

from vlp.data.schema import (
    CHEXPERT_COLUMNS,
    CHEXPERT_LABELS,
    EDEMA_COLUMNS,
    METADATA_COLUMNS,
    MS_CXR_COLUMNS,
    MS_CXR_T_COLUMNS,
    PROGRESSION_FINDINGS,
    SPLIT_COLUMNS,
    TABLE_FILES,
)

#: Grounding category of each finding type (MS-CXR names where MS-CXR has the class).
CATEGORY = {
    "pleural_effusion": "Pleural Effusion",
    "cardiomegaly": "Cardiomegaly",
    "edema": "Edema",
    "consolidation": "Consolidation",
    "atelectasis": "Atelectasis",
    "pneumothorax": "Pneumothorax",
    "nodule": "Lung Lesion",
    "support_devices": "Support Devices",
    "fracture": "Fracture",
}
_VIEW_MEANING = {
    "PA": "postero-anterior",
    "AP": "antero-posterior",
    "LATERAL": "lateral",
    "LL": "left lateral",
}


def _label_cell(v) -> str:
    return "" if v is None else f"{float(v):.1f}"


def _images(rec: dict):
    for key in ("frontal", "lateral"):
        v = rec["views"].get(key)
        if v is not None:
            yield key, v


def category_of(rec: dict, kind: str) -> str:
    f = rec["findings"].get(kind)
    if kind == "consolidation" and f is not None and f["params"].get("infectious"):
        return "Pneumonia"
    return CATEGORY[kind]


def grounding_rows(rec: dict) -> list[dict]:
    """MS-CXR rows of one study: one per (describing sentence, view, box)."""
    rows = []
    for s in rec["sentences"]:
        kind = s["finding"]
        if kind is None or s["polarity"] == 0:
            continue
        f = rec["findings"][kind]
        for view_key, v in _images(rec):
            boxes = f["boxes"].get(view_key, [])
            if s["box_index"] is not None:
                boxes = boxes[s["box_index"] : s["box_index"] + 1]
            for b in boxes:
                if b is None:
                    continue
                rows.append(
                    {
                        "dicom_id": v["dicom_id"],
                        "category": category_of(rec, kind),
                        "label_text": s["text"],
                        "x": b[0],
                        "y": b[1],
                        "w": b[2],
                        "h": b[3],
                        "image_width": v["columns"],
                        "image_height": v["rows"],
                    }
                )
    return rows


def write_tables(out_dir: Path, records: list[dict]) -> dict[str, int]:
    """Write all tables; returns the number of rows of each."""
    out_dir = Path(out_dir)
    rows: dict[str, list[dict]] = {k: [] for k in TABLE_FILES}
    for rec in records:
        sub, stu = rec["subject_id"], rec["study_id"]
        for _, v in _images(rec):
            rows["metadata"].append(
                {
                    "dicom_id": v["dicom_id"],
                    "subject_id": sub,
                    "study_id": stu,
                    "PerformedProcedureStepDescription": rec["exam"],
                    "ViewPosition": v["view_position"],
                    "Rows": v["rows"],
                    "Columns": v["columns"],
                    "StudyDate": rec["study_date"],
                    "StudyTime": rec["study_time"],
                    "ProcedureCodeSequence_CodeMeaning": rec["exam"],
                    "ViewCodeSequence_CodeMeaning": _VIEW_MEANING[v["view_position"]],
                    "PatientOrientationCodeSequence_CodeMeaning": v["orientation"],
                }
            )
            rows["split"].append(
                {
                    "dicom_id": v["dicom_id"],
                    "study_id": stu,
                    "subject_id": sub,
                    "split": rec["split"],
                }
            )
        chex = {"subject_id": sub, "study_id": stu}
        chex.update({n: _label_cell(rec["chexpert"][n]) for n in CHEXPERT_LABELS})
        rows["chexpert"].append(chex)
        if rec["edema_severity"] is not None:
            rows["edema"].append(
                {"subject_id": sub, "study_id": stu, "edema_severity": rec["edema_severity"]}
            )
        rows["ms_cxr"].extend(grounding_rows(rec))
        prog = rec["progression"]
        if prog is not None and any(v is not None for v in prog.values()):
            row = {
                "dicom_id": rec["views"]["frontal"]["dicom_id"],
                "previous_dicom_id": rec["prior_frontal_dicom_id"],
                "study_id": stu,
                "subject_id": sub,
            }
            row.update({f"{f}_progression": prog[f] or "" for f in PROGRESSION_FINDINGS})
            rows["ms_cxr_t"].append(row)
    columns = {
        "metadata": METADATA_COLUMNS,
        "split": SPLIT_COLUMNS,
        "chexpert": CHEXPERT_COLUMNS,
        "edema": EDEMA_COLUMNS,
        "ms_cxr": MS_CXR_COLUMNS,
        "ms_cxr_t": MS_CXR_T_COLUMNS,
    }
    for key, name in TABLE_FILES.items():
        with open(out_dir / name, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns[key], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows[key])
    return {key: len(v) for key, v in rows.items()}
