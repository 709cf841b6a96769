"""Writing a phantom dataset: patients -> studies -> JPEGs, reports, tables, ground truth.

One job: drive the generator and lay the result out exactly like MIMIC-CXR-JPG::

    OUT/files/p1X/p{subject_id}/s{study_id}/{dicom_id}.jpg
    OUT/files/p1X/p{subject_id}/s{study_id}.txt
    OUT/mimic-cxr-2.0.0-{metadata,split,chexpert}.csv, ... (see ``tables.py``)
    OUT/phantom_truth.jsonl      one JSON per study: findings, boxes, sentences, labels

Determinism: every patient draws from its own generator seeded with ``(seed, index)``
and ids come from generators seeded with ``seed`` alone, so the same seed writes the same
bytes whatever ``workers`` is.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing as mp
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlp.data.phantom.acquisition import Acquisition, sample_acquisition
from vlp.data.phantom.anatomy import Anatomy, sample_anatomy
from vlp.data.phantom.findings import DEFAULT_PREVALENCE, FINDING_TYPES, sample_course
from vlp.data.phantom.render import PatientRenderer
from vlp.data.phantom.reports import exam_name, status_of, write_report
from vlp.data.phantom.tables import write_tables
from vlp.data.schema import PROGRESSION_FINDINGS

TRUTH_FILE = "phantom_truth.jsonl"


@dataclass
class PhantomConfig:
    """Size and difficulty of a phantom dataset."""

    patients: int = 200
    seed: int = 0
    image_size: int = 512  # long (vertical) side of the written JPEGs
    jpeg_quality: int = 95
    #: ``jpg`` (MIMIC-CXR-JPG) or ``dcm``: 12-bit MONOCHROME2 DICOM files with a window
    #: that shows the picture the JPEG would hold (the MIMIC-CXR DICOM layout).
    image_format: str = "jpg"
    prevalence: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PREVALENCE))
    subtlety: float = 1.0  # contrast multiplier of findings; lower is harder
    lateral_fraction: float = 0.85
    min_studies: int = 1
    max_studies: int = 6
    workers: int = 1

    @classmethod
    def full_size(cls, **overrides) -> PhantomConfig:
        """MIMIC-sized images (3000 x 2500 portrait) for conversion benchmarks."""
        return cls(**{"image_size": 3000, **overrides})

    def validate(self) -> None:
        if self.patients < 1:
            raise ValueError(f"PhantomConfig.patients must be >= 1, got {self.patients}")
        if self.image_format not in ("jpg", "dcm"):
            raise ValueError(
                f"PhantomConfig.image_format must be 'jpg' or 'dcm', got {self.image_format!r}"
            )
        if self.image_size < 32:
            raise ValueError(f"PhantomConfig.image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.min_studies <= self.max_studies:
            raise ValueError(
                "PhantomConfig needs 1 <= min_studies <= max_studies, got "
                f"{self.min_studies}, {self.max_studies}"
            )
        unknown = set(self.prevalence) - set(FINDING_TYPES)
        if unknown:
            raise ValueError(
                f"PhantomConfig.prevalence has unknown findings {sorted(unknown)}; "
                f"expected some of {list(FINDING_TYPES)}"
            )
        if not 0.0 <= self.lateral_fraction <= 1.0:
            raise ValueError("PhantomConfig.lateral_fraction must be in [0, 1]")
        if self.subtlety < 0:
            raise ValueError("PhantomConfig.subtlety must be >= 0")


def dicom_id(seed: int, subject_id: int, study_id: int, view: str) -> str:
    """A MIMIC-looking dicom id (5 groups of 8 hex digits), a hash of its study and view."""
    h = hashlib.sha1(f"phantom:{seed}:{subject_id}:{study_id}:{view}".encode()).hexdigest()
    return "-".join(h[i : i + 8] for i in range(0, 40, 8))


def study_dir(out_dir: Path, subject_id: int, study_id: int) -> Path:
    return Path(out_dir) / "files" / f"p{subject_id}"[:3] / f"p{subject_id}" / f"s{study_id}"


def _ids(config: PhantomConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique subject ids (8 digits from 1...), study id blocks (8 digits from 5...), splits."""
    rng = np.random.default_rng([config.seed, 1])
    subjects = 10_000_000 + rng.choice(9_999_999, size=config.patients, replace=False)
    studies = 50_000_000 + rng.choice(
        9_999_999, size=config.patients * config.max_studies, replace=False
    )
    order = np.random.default_rng([config.seed, 2]).permutation(config.patients)
    split = np.empty(config.patients, dtype=object)
    n_train = int(round(0.8 * config.patients))
    n_val = int(round(0.1 * config.patients))
    split[order[:n_train]] = "train"
    split[order[n_train : n_train + n_val]] = "validate"
    split[order[n_train + n_val :]] = "test"
    return subjects, studies.reshape(config.patients, config.max_studies), split


def _progression_finding(findings: dict, name: str) -> dict | None:
    """The finding behind an MS-CXR-T progression label (``None`` when absent): pneumonia is
    an infectious consolidation."""
    if name == "pneumonia":
        f = findings.get("consolidation")
        return f if f is not None and f["params"].get("infectious") else None
    return findings.get(name)


#: MS-CXR-T label of each report status (``reports.status_of``): a new finding is worse, a
#: resolved one better, and an absent one is not labelled.
_LABEL_OF_STATUS = {
    "new": "worsening",
    "worsening": "worsening",
    "stable": "stable",
    "improving": "improving",
    "resolved": "improving",
    "absent": None,
}


def progression(now: dict, before: dict) -> dict[str, str | None]:
    """MS-CXR-T labels of a study against its prior, from the status its report states
    (``reports.status_of``: the change of the finding's continuous level, so a change within
    one grade counts), so that label and report cannot disagree."""
    return {
        name: _LABEL_OF_STATUS[
            status_of(_progression_finding(now, name), _progression_finding(before, name), True)
        ]
        for name in PROGRESSION_FINDINGS
    }


def _study_views(rng, findings: dict, lateral_fraction: float) -> tuple[str, ...]:
    sick = sum(k in findings for k in ("edema", "consolidation", "pneumothorax"))
    p_ap = 0.8 if "support_devices" in findings else min(0.7, 0.2 + 0.15 * sick)
    frontal = "AP" if rng.uniform() < p_ap else "PA"
    if rng.uniform() < lateral_fraction:
        return frontal, ("LL" if rng.uniform() < 0.15 else "LATERAL")
    return (frontal,)


def _patient(job: tuple) -> list[dict]:
    """Generate and write one patient's studies; returns their truth records."""
    config, index, subject_id, study_ids, split, out_dir = job
    rng = np.random.default_rng([config.seed, index])
    n = int(rng.integers(config.min_studies, config.max_studies + 1))
    anatomy = sample_anatomy(rng)
    course = sample_course(rng, n, config.prevalence)
    renderer = PatientRenderer(anatomy, config.image_size)
    when = dt.datetime(int(rng.integers(2110, 2190)), 1, 1) + dt.timedelta(
        days=int(rng.integers(0, 365)), seconds=int(rng.integers(6 * 3600, 22 * 3600))
    )
    records: list[dict] = []
    prev: dict | None = None
    for t in range(n):
        if t > 0:
            when += dt.timedelta(
                days=int(rng.integers(1, 400)), seconds=int(rng.integers(-3 * 3600, 3 * 3600))
            )
        findings = course[t]
        study_id = int(study_ids[t])
        views = _study_views(rng, findings, config.lateral_fraction)
        report = write_report(rng, findings, prev["findings_raw"] if prev else None, t > 0, views)
        sdir = study_dir(out_dir, subject_id, study_id)
        sdir.mkdir(parents=True, exist_ok=True)
        sdir.with_suffix(".txt").write_text(report["text"], encoding="utf-8")
        view_rec: dict[str, dict | None] = {"frontal": None, "lateral": None}
        boxes_by_view: dict[str, dict] = {}
        for key, vp in zip(("frontal", "lateral"), views):
            acq = sample_acquisition(rng, vp)
            img, boxes = renderer.render(key, findings, acq, config.subtlety)
            did = dicom_id(config.seed, subject_id, study_id, f"{t}:{key}")
            if config.image_format == "dcm":
                write_dicom(sdir / f"{did}.dcm", img, subject_id, study_id, did, vp, when)
            else:
                Image.fromarray(img, "L").save(
                    sdir / f"{did}.jpg", "JPEG", quality=config.jpeg_quality
                )
            orientation = "Recumbent" if vp == "AP" and rng.uniform() < 0.4 else "Erect"
            view_rec[key] = {
                "dicom_id": did,
                "view_position": vp,
                "rows": int(img.shape[0]),
                "columns": int(img.shape[1]),
                "orientation": orientation,
                "acquisition": acq.to_dict(),
            }
            boxes_by_view[key] = boxes
        before = prev["findings_raw"] if prev else {}
        finding_recs = {}
        for kind, f in findings.items():
            finding_recs[kind] = {
                **f,
                "status": status_of(f, before.get(kind), t > 0),
                "hedged": bool(report["hedged"].get(kind, False)),
                "boxes": {k: b.get(kind, []) for k, b in boxes_by_view.items()},
            }
        chex = report["chexpert"]
        edema_sev = None
        if chex["Edema"] == 1:
            edema_sev = findings["edema"]["severity"]
        elif chex["Edema"] == 0:
            edema_sev = 0
        rec = {
            "subject_id": subject_id,
            "study_id": study_id,
            "split": split,
            "study_index": t,
            "study_date": when.strftime("%Y%m%d"),
            "study_time": when.strftime("%H%M%S") + f".{int(rng.integers(0, 1000)):03d}",
            "exam": exam_name(views),
            "prior_study_id": prev["study_id"] if prev else None,
            "prior_frontal_dicom_id": prev["views"]["frontal"]["dicom_id"] if prev else None,
            "gap_days": (when - prev["_when"]).total_seconds() / 86400 if prev else None,
            "views": view_rec,
            "findings": finding_recs,
            "resolved": [k for k in before if k not in findings],
            "sentences": report["sentences"],
            "chexpert": chex,
            "edema_severity": edema_sev,
            "progression": progression(findings, before) if prev else None,
            "report_path": str(sdir.with_suffix(".txt").relative_to(out_dir)),
            "anatomy": anatomy.to_dict(),
            "image_size": config.image_size,
            "subtlety": config.subtlety,
        }
        records.append(rec)
        prev = {**rec, "findings_raw": findings, "_when": when}
    return records


def generate(out_dir, config: PhantomConfig, progress: bool = True) -> dict:
    """Write a phantom dataset under ``out_dir``; returns summary counts.

    The summary holds ``patients``, ``studies``, ``images``, ``lateral_fraction``,
    ``prevalence`` (fraction of studies with each finding present), ``splits`` and the
    row count of every table.
    """
    config.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subjects, studies, splits = _ids(config)
    jobs = [
        (config, i, int(subjects[i]), studies[i], str(splits[i]), out_dir)
        for i in range(config.patients)
    ]
    bar = tqdm(total=config.patients, desc="phantom patients", disable=not progress)
    records: list[dict] = []
    if config.workers > 1:
        with mp.get_context("fork").Pool(config.workers) as pool:
            for recs in pool.imap(_patient, jobs, chunksize=4):
                records.extend(recs)
                bar.update(1)
    else:
        for job in jobs:
            records.extend(_patient(job))
            bar.update(1)
    bar.close()
    with open(out_dir / TRUTH_FILE, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
    rows = write_tables(out_dir, records)
    n = len(records)
    return {
        "patients": config.patients,
        "studies": n,
        "images": sum(1 + (r["views"]["lateral"] is not None) for r in records),
        "lateral_fraction": sum(r["views"]["lateral"] is not None for r in records) / n,
        "prevalence": {k: sum(k in r["findings"] for r in records) / n for k in FINDING_TYPES},
        "splits": {s: sum(r["split"] == s for r in records) for s in ("train", "validate", "test")},
        "tables": rows,
        "config": asdict(config),
    }


def read_truth(data_dir) -> list[dict]:
    """The ground-truth records of a written dataset (``phantom_truth.jsonl``)."""
    path = Path(data_dir) / TRUTH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a phantom dataset (no {TRUTH_FILE})")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _raw_findings(rec: dict) -> dict:
    keep = ("type", "severity", "side", "lobe", "params")
    return {k: {x: f[x] for x in keep} for k, f in rec["findings"].items()}


def render_view(rec: dict, view: str = "frontal", image_size: int | None = None):
    """Re-render one view of a truth record: ``(uint8 image, {finding type: bool mask})``.

    Uses the record's anatomy, findings and acquisition, so the image matches the written
    JPEG up to compression; the masks rasterise exactly where each finding was drawn
    (for grounding evaluators and tests).
    """
    v = rec["views"].get(view)
    if v is None:
        raise ValueError(f"study {rec['study_id']} has no {view} view")
    size = image_size or rec["image_size"]
    acq_d = dict(v["acquisition"])
    acq_d["collimation"] = tuple(acq_d["collimation"])
    acq = Acquisition(**acq_d)
    r = PatientRenderer(Anatomy(**rec["anatomy"]), size)
    findings = _raw_findings(rec)
    img, _ = r.render(view, findings, acq, rec["subtlety"])
    return img, r.masks(view, findings, acq, rec["subtlety"])


#: the phantom's DICOM UID root (a made-up organisation root under the "2.25" UUID arc).
_UID_ROOT = "2.25.1712"


def write_dicom(path, img, subject_id: int, study_id: int, did: str, view: str, when) -> None:
    """One phantom radiograph as a DX DICOM file: 12 bits stored (the 8-bit picture × 16)
    with a window (centre 2040, width 4096) under which a viewer shows the 8-bit picture
    again (DICOM PS3.3 C.11.2.1.2), the view in ViewPosition, patient and study tags."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    dx_storage = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage, for presentation
    instance = f"{_UID_ROOT}.3.{study_id}.{int(did[:8], 16)}"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = dx_storage
    ds.file_meta.MediaStorageSOPInstanceUID = instance
    ds.SOPClassUID, ds.SOPInstanceUID = dx_storage, instance
    ds.StudyInstanceUID = f"{_UID_ROOT}.1.{study_id}"
    ds.SeriesInstanceUID = f"{_UID_ROOT}.2.{study_id}"
    ds.PatientID = str(subject_id)
    ds.Modality = "DX"
    ds.StudyDate, ds.StudyTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.ViewPosition = view
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2040, 4096
    ds.PixelData = (np.asarray(img, dtype=np.uint16) * 16).tobytes()
    ds.save_as(path, enforce_file_format=True)
