"""DICOM input: a folder tree of chest-radiograph DICOM files as study records, and one
DICOM image as the 8-bit picture a radiologist is first shown.

**Which files.** Every file under ``--root`` named ``*.dcm``/``*.dicom`` (any case), or
carrying the DICOM File Format prefix (``DICM`` after a 128-byte preamble, PS3.10 §7.1),
so UID-named files without a suffix are found too. Files that PIL reads by their suffix
(``.jpg``, ``.png``, ...) are never opened to check. A file without Rows (0028,0010) whose
SOP Class is not an image storage class is not an image (DICOMDIR, structured reports,
presentation states): it is skipped and reported as ``not an image``, not an error; one
that names no SOP Class, or an image class, is damaged: an ``unreadable image`` error.

**Studies.** Files are read up to their pixels (``stop_before_pixels``) and grouped by
StudyInstanceUID (0020,000D); the patient is PatientID (0010,0020). Either tag missing,
or a file that cannot be parsed, is an ``unreadable image`` error naming the file; a file
whose PatientID disagrees with the rest of its study is one too (its study is written
without it). The study time is the earliest StudyDate (0008,0020) + StudyTime
(0008,0030) of its files (DA/TM of PS3.5 §6.2; blank or malformed: unknown, so the study
has no priors and is nobody's prior; a malformed value is logged).

**Ids.** The schema's study ids are numeric (the loader's ``study_id`` is int64), so a
study's id is derived from its UID: the first 15 hexadecimal digits of SHA-256 of the
StudyInstanceUID, written as a decimal integer (:func:`study_number`; below 2**60, the
same on every run and machine). A collision between two studies fails the conversion
naming both UIDs. PatientID is the ``subject_id`` when it consists of letters, digits,
``_`` and ``-`` only; any other PatientID (the sample key allows no ``.`` or ``/``) becomes
``x`` + 16 hexadecimal digits of its SHA-256 (:func:`subject_of`). The image id
(``dicom_id`` in the record) is the SOPInstanceUID (0008,0018), the file name without its
suffix when that tag is absent. The JSON record of the schema has no field for DICOM
identifiers, so the conversion writes ``OUT/dicom_studies.csv``: one row per study handed
to the shard writer with ``key, subject_id, study_id, split, PatientID,
StudyInstanceUID, AccessionNumber``.

**Views.** ViewPosition (0018,5101; DX Positioning Module, PS3.3 §C.8.11.5: ``PA``, ``AP``,
``LL``, ``RL``, and MIMIC-CXR's ``LATERAL``) first; when it is blank or none of these, the
View Code Sequence (0054,0220) item, by its code (CID 4010 "DX View" of PS3.16: SCT/SRT
codes of postero-anterior, antero-posterior, lateral, left and right lateral) or, failing
that, its Code Meaning. PA and AP are frontal; LATERAL, LL and RL lateral (RL is stored as
``LATERAL``: the schema names laterals ``LATERAL`` and ``LL``). Any other view (decubitus,
oblique, none) is skipped and reported with the file named; a study none of whose views
is recognised is an ``unknown view`` error, one with only laterals ``no frontal view``.

**Reports** (``--reports``, default ``--root``): a CSV with a ``report_text`` column and a
column naming the study, ``StudyInstanceUID`` or else ``AccessionNumber`` (0008,0050);
or a folder searched recursively for ``{StudyInstanceUID}.txt`` or
``{AccessionNumber}.txt``. Reports are sectioned like the CSV adapter's
(:mod:`vlp.data.convert.table`): MIMIC headers (``FINDINGS:``, ``IMPRESSION:``), text
without headers used whole. A study without a report is a ``missing report`` error.

**Splits.** A subject-level hash with ``--split-fractions`` (as
:mod:`vlp.data.convert.table`), unless ``--split-table`` names a CSV with a ``split``
column and a ``PatientID``, ``StudyInstanceUID`` or ``AccessionNumber`` column (the first
of these present is the key); a patient in two splits fails the conversion.

**Pixels** (:func:`display_pixels`, called by :func:`vlp.data.convert.images.load_resized`
for every DICOM file): pydicom decodes the pixel data with the plugins it has
(uncompressed and RLE natively, JPEG baseline and JPEG 2000 through Pillow; JPEG-LS and
lossless JPEG need ``pylibjpeg`` or ``python-gdcm``), then the grayscale pipeline of
PS3.4 §N.2.1.1 runs: the Modality LUT or Rescale Slope/Intercept (PS3.3 §C.11.1), then
the VOI LUT (§C.11.2.1.1) or else the window (Window Center/Width with its VOI LUT
Function, §C.11.2.1.2-3), both through pydicom's functions. The VOI output is scaled to
0-255 over the range the VOI stage maps onto: a LUT's ``2**bits - 1`` from its LUT
Descriptor, a window's lowest and highest output; without a VOI transformation the
image's own minimum and maximum are used. MONOCHROME1 (minimum shown white, §C.7.6.3.1.2)
is then inverted (the DX Image Module, §C.8.11.3, pairs Presentation LUT Shape INVERSE
with MONOCHROME1, so that tag is not read separately). RGB and YBR images (secondary
captures) are taken as pydicom's RGB and converted to luminance. A file that cannot be
decoded (truncated pixel data, an unsupported transfer syntax, a multi-frame image) is an
``unreadable image`` with the path and the reason, counted like a corrupt JPEG.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlp.data.convert.records import (
    MALFORMED_ROW,
    MISSING_REPORT,
    UNREADABLE_IMAGE,
    AdapterOutput,
    ConversionError,
    ImageRef,
    Skip,
    build_record,
    check_subject_splits,
    fingerprint_file,
    read_table,
    split_by_hash,
)
from vlp.data.schema import sample_key

log = logging.getLogger("vlp.data.convert")

DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)
DICOM_SUFFIXES = (".dcm", ".dicom")
#: Skip reason of a DICOM file that holds no image; the data being what it is, not an error.
NOT_AN_IMAGE = "not an image"
#: Name of the side table of DICOM identifiers that :func:`write_study_table` writes.
STUDY_TABLE = "dicom_studies.csv"
STUDY_TABLE_COLUMNS = (
    "key",
    "subject_id",
    "study_id",
    "split",
    "PatientID",
    "StudyInstanceUID",
    "AccessionNumber",
)

# Study-naming columns of the report and split tables, in the order they are preferred.
REPORT_KEYS = ("StudyInstanceUID", "AccessionNumber")
SPLIT_KEYS = ("PatientID", "StudyInstanceUID", "AccessionNumber")
REPORT_TEXT = "report_text"

# Header tags the adapter reads (the pixels are read by the workers, not here).
_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "PatientID",
    "StudyInstanceUID",
    "ViewPosition",
    "Rows",
    "Columns",
    "ViewCodeSequence",
]

# ViewPosition (0018,5101) defined terms, plus MIMIC-CXR's LATERAL → the schema's names.
_VIEW_POSITIONS = {"PA": "PA", "AP": "AP", "LATERAL": "LATERAL", "LL": "LL", "RL": "LATERAL"}
# CID 4010 "DX View" codes (PS3.16): SNOMED CT and the retired SNOMED RT (SRT) values.
# Code values of the two schemes never coincide, so the value alone identifies the view.
_VIEW_CODES = {
    "399066004": "PA",  # SCT postero-anterior (retired for 272479007)
    "272479007": "PA",  # SCT postero-anterior
    "R-10214": "PA",
    "399348003": "AP",  # SCT antero-posterior
    "R-10206": "AP",
    "399067008": "LATERAL",  # SCT lateral
    "R-102CD": "LATERAL",
    "399173006": "LL",  # SCT left lateral
    "R-10236": "LL",
    "399198007": "LATERAL",  # SCT right lateral
    "R-10232": "LATERAL",
}
_VIEW_MEANINGS = {
    "postero-anterior": "PA",
    "posteroanterior": "PA",
    "antero-posterior": "AP",
    "anteroposterior": "AP",
    "lateral": "LATERAL",
    "left lateral": "LL",
    "right lateral": "LATERAL",
}

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]+")


# ------------------------------------------------------------------------ files and ids


def is_dicom_file(path: str) -> bool:
    """Whether ``path`` is to be read as DICOM: a DICOM suffix, or the PS3.10 §7.1 prefix.

    A suffix PIL reads (``.jpg``, ``.png``, ...) answers no without opening the file, so
    the JPEG path pays nothing for this check.
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in _pil_suffixes():
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


_PIL_SUFFIXES: frozenset[str] | None = None


def _pil_suffixes() -> frozenset[str]:
    global _PIL_SUFFIXES
    if _PIL_SUFFIXES is None:
        _PIL_SUFFIXES = frozenset(Image.registered_extensions())
    return _PIL_SUFFIXES


def study_number(study_uid: str) -> str:
    """The numeric study id of a StudyInstanceUID (see the module docstring)."""
    digest = hashlib.sha256(study_uid.encode("utf-8")).hexdigest()
    return str(int(digest[:15], 16))


def subject_of(patient_id: str) -> str:
    """The ``subject_id`` of a PatientID: itself when key-safe, else a hash of it."""
    if _SAFE_ID.fullmatch(patient_id):
        return patient_id
    return "x" + hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class DicomHeader:
    """What the adapter needs of one DICOM file."""

    path: str
    patient_id: str
    study_uid: str
    instance_uid: str
    accession: str
    study_date: str
    study_time: str
    view: str  # PA, AP, LATERAL, LL, or a description of the view tags found


class NotAnImage(ValueError):
    """A DICOM file without an image (no Rows): skipped, not an error."""


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _claims_dicom(path: str) -> bool:
    # A file named *.dcm may lack the Part 10 preamble (a bare data set): read it with
    # force. A file found only by its prefix has the preamble and needs no force.
    return os.path.splitext(path)[1].lower() in DICOM_SUFFIXES


def read_header(path: str) -> DicomHeader:
    """The header of one file. Raises ``NotAnImage``, or ``ValueError``/``OSError``/
    pydicom's errors with a message naming the missing tag."""
    import pydicom

    ds = pydicom.dcmread(
        path, stop_before_pixels=True, force=_claims_dicom(path), specific_tags=_HEADER_TAGS
    )
    if "Rows" not in ds:
        _check_not_an_image(ds)
    for keyword, tag in (("StudyInstanceUID", "(0020,000D)"), ("PatientID", "(0010,0020)")):
        if not _text(ds, keyword):
            raise ValueError(f"{keyword} {tag} is missing or empty; expected a value to group by")
    return DicomHeader(
        path=path,
        patient_id=_text(ds, "PatientID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        instance_uid=_text(ds, "SOPInstanceUID") or os.path.splitext(os.path.basename(path))[0],
        accession=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        view=classify_dicom_view(ds),
    )


def _check_not_an_image(ds) -> None:
    """Raise ``NotAnImage`` for a data set without Rows that is no image by its SOP Class
    (DICOMDIR, SR, presentation state); ``ValueError`` for one that should have been an
    image or names no SOP Class at all (a damaged file, or not DICOM though named so)."""
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    sop_class = _text(ds, "SOPClassUID") or (_text(meta, "MediaStorageSOPClassUID") if meta else "")
    if not sop_class:
        raise ValueError(
            "no SOP Class UID (0008,0016) and no Rows (0028,0010): not a readable DICOM data set"
        )
    name = UID(sop_class).name
    if "Image Storage" in name:
        raise ValueError(f"{name} without Rows (0028,0010): the header is damaged or truncated")
    raise NotAnImage(f"{name}: no Rows (0028,0010), the file holds no image")


def classify_dicom_view(ds) -> str:
    """PA, AP, LATERAL or LL from ViewPosition, else from the View Code Sequence; for any
    other view, a description of what the tags hold (which no view name matches)."""
    position = _text(ds, "ViewPosition").upper()
    if position in _VIEW_POSITIONS:
        return _VIEW_POSITIONS[position]
    items = ds.get("ViewCodeSequence") or []
    meaning = ""
    if items:
        item = items[0]
        code = _text(item, "CodeValue")
        if code in _VIEW_CODES:
            return _VIEW_CODES[code]
        meaning = _text(item, "CodeMeaning")
        normalised = re.sub(r"\s+projection$", "", meaning.lower())
        if normalised in _VIEW_MEANINGS:
            return _VIEW_MEANINGS[normalised]
    found = []
    if position:
        found.append(f"ViewPosition (0018,5101) {position!r}")
    if items:
        found.append(f"ViewCodeSequence (0054,0220) {meaning or code!r}")
    return "; ".join(found) or "no ViewPosition (0018,5101) or ViewCodeSequence (0054,0220)"


def study_datetime(date: str, time: str, source: str) -> dt.datetime | None:
    """StudyDate + StudyTime (DA and TM, PS3.5 §6.2) or None when blank or malformed."""
    from pydicom.valuerep import DA, TM

    if not date:
        return None
    try:
        day = DA(date)
        moment = TM(time) if time else None
    except ValueError as error:
        log.warning("%s: StudyDate/StudyTime %r/%r unreadable (%s)", source, date, time, error)
        return None
    return dt.datetime.combine(day, moment or dt.time())


# --------------------------------------------------------------------------- pixels


def read_display_pixels(path: str) -> np.ndarray:
    """The uint8 H×W picture of one DICOM image file (see :func:`display_pixels`)."""
    import pydicom

    return display_pixels(pydicom.dcmread(path, force=_claims_dicom(path)))


def display_pixels(ds) -> np.ndarray:
    """The uint8 H×W picture of a data set with pixels: decode, Modality LUT, VOI,
    scaling to 8 bits, MONOCHROME1 inversion (the module docstring says how).

    Raises ``ValueError`` naming the tag for what it cannot show.
    """
    from pydicom.pixels import apply_modality_lut

    frames = int(ds.get("NumberOfFrames") or 1)
    if frames != 1:
        raise ValueError(f"NumberOfFrames (0028,0008) is {frames}; expected one radiograph")
    photometric = _text(ds, "PhotometricInterpretation").upper()
    pixels = ds.pixel_array
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = apply_modality_lut(pixels, ds)
        values, low, high = _apply_voi(values, ds)
        picture = _to_uint8(values, low, high)
        if photometric == "MONOCHROME1":
            picture = 255 - picture
        return picture
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        # pydicom hands colour pixel data over as RGB; the Modality and VOI stages are
        # grayscale-only (PS3.3 §C.11.1), so a colour capture is shown as its luminance.
        if pixels.dtype != np.uint8:
            raise ValueError(
                f"colour image with BitsStored (0028,0101) {ds.BitsStored}; "
                "expected 8 bits per sample"
            )
        return np.asarray(Image.fromarray(pixels).convert("L"))
    raise ValueError(
        f"PhotometricInterpretation (0028,0004) {photometric or 'missing'!r} is not "
        "supported; expected MONOCHROME1, MONOCHROME2 or RGB/YBR"
    )


def _apply_voi(values: np.ndarray, ds) -> tuple[np.ndarray, float, float]:
    """The VOI stage and the range it maps onto (first value shown black, second white).

    A VOI LUT is preferred over a window when both are present (pydicom's default, and
    what the standard's display pipeline does with the first VOI transformation).
    """
    from pydicom.pixels.processing import apply_voi, apply_windowing

    items = ds.get("VOILUTSequence") or []
    if items and "LUTDescriptor" in items[0] and "LUTData" in items[0]:
        bits = int(items[0].LUTDescriptor[2])
        if not np.issubdtype(values.dtype, np.integer):
            # A LUT is indexed by integers; the rescaled values are rounded to them.
            values = np.rint(values).astype(np.int64)
        return apply_voi(values, ds), 0.0, float(2**bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        # The window's output range is pydicom's choice (it depends on Bits Stored and
        # the rescale); the two infinite inputs give it without restating that choice.
        with np.errstate(over="ignore", invalid="ignore"):
            low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)
        return apply_windowing(values, ds), float(low), float(high)
    return values, float(np.min(values)), float(np.max(values))


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.asarray(values, dtype=np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- tables


@dataclass
class _StudyTable:
    """A CSV keyed by one study-naming column; ``lookup(study)`` finds a study's row."""

    path: str
    column: str
    values: dict[str, tuple[int, str]]  # key → (line, value)

    def lookup(self, study: _Study) -> tuple[int, str] | None:
        key = {
            "PatientID": study.patient_id,
            "StudyInstanceUID": study.uid,
            "AccessionNumber": study.accession,
        }[self.column]
        return self.values.get(key) if key else None


def _read_study_table(
    path: str, keys: tuple[str, ...], value: str, what: str, skips: list[Skip]
) -> _StudyTable:
    rows, bad, columns = read_table(path, [value], what)
    skips += bad
    column = next((c for c in keys if c in columns), None)
    if column is None:
        raise ConversionError(
            f"{what} {path} needs a column naming the study: one of {', '.join(keys)}; "
            f"found: {', '.join(columns)}"
        )
    values: dict[str, tuple[int, str]] = {}
    for line, row in rows:
        key = row[column].strip()
        if not key:
            skips.append(Skip(f"{path}:{line}", MALFORMED_ROW, f"empty {column}", level="row"))
        elif key in values:
            skips.append(
                Skip(
                    f"{path}:{line}",
                    MALFORMED_ROW,
                    f"{column} {key} repeats line {values[key][0]}; the first row is used",
                    level="row",
                )
            )
        else:
            values[key] = (line, row[value])
    return _StudyTable(path, column, values)


# --------------------------------------------------------------------------- adapter


@dataclass
class _Study:
    uid: str
    patient_id: str
    accession: str
    files: list[DicomHeader]


@dataclass
class DicomAdapterOutput(AdapterOutput):
    """An adapter output plus the DICOM identifiers of its records (``STUDY_TABLE`` rows)."""

    studies: list[dict] = field(default_factory=list)


def _walk(root: str) -> list[str]:
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            if is_dicom_file(path):
                found.append(path)
    return found


def _tree_fingerprint(root: str, paths: list[str]) -> dict:
    # The plan of a resumed conversion must change when files are added, removed or
    # replaced; names and sizes say so without reading every image.
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{os.path.relpath(path, root)}\t{os.path.getsize(path)}\n".encode())
    return {
        "path": os.path.basename(os.path.abspath(root)),
        "files": len(paths),
        "sha256": digest.hexdigest(),
    }


def _sections(report: str) -> dict[str, str]:
    from vlp.data.reports import parse_sections

    # As the CSV adapter: MIMIC headers are "\n NAME: ", free text writes "NAME:" at a
    # line start; both are made MIMIC's form before sectioning.
    return parse_sections("\n " + re.sub(r"\n(?! )", "\n ", report))


class _ReportFolder:
    """Text files under a folder, found by name: ``{StudyInstanceUID}.txt`` or
    ``{AccessionNumber}.txt``."""

    def __init__(self, folder: str):
        self.folder = folder
        self.by_name: dict[str, list[str]] = defaultdict(list)
        for base, subfolders, names in os.walk(folder):
            subfolders.sort()
            for name in sorted(names):
                if name.lower().endswith(".txt"):
                    self.by_name[name[:-4]].append(os.path.join(base, name))

    def find(self, study: _Study) -> tuple[str | None, str]:
        """``(path, "")`` of the study's report, or ``(None, why not)``."""
        for name in (study.uid, study.accession):
            paths = self.by_name.get(name) if name else None
            if paths and len(paths) > 1:
                return None, f"{len(paths)} files named {name}.txt: {', '.join(paths[:3])}"
            if paths:
                return paths[0], ""
        names = " or ".join(f"{n}.txt" for n in (study.uid, study.accession) if n)
        return None, f"no {names} under {self.folder}"


def read_dicom(
    root: str,
    reports: str | None = None,
    split_table: str | None = None,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
) -> DicomAdapterOutput:
    """Read a folder tree of DICOM files into study records (see the module docstring)."""
    if not os.path.isdir(root):
        raise ConversionError(f"DICOM root not found or not a folder: {root}")
    reports = reports or root
    if not os.path.exists(reports):
        raise ConversionError(f"reports not found: {reports} (a CSV or a folder of .txt files)")
    skips: list[Skip] = []
    paths = _walk(root)
    if not paths:
        raise ConversionError(
            f"no DICOM files under {root}: expected files named *.dcm or *.dicom, or "
            "starting with the 'DICM' prefix of PS3.10"
        )
    inputs: dict[str, dict] = {"tree": _tree_fingerprint(root, paths)}

    studies: dict[str, _Study] = {}
    for path in tqdm(paths, desc="read dicom", unit="file", disable=not progress):
        try:
            header = read_header(path)
        except NotAnImage as error:
            skips.append(Skip(path, NOT_AN_IMAGE, str(error), level="image"))
            continue
        except Exception as error:  # noqa: BLE001 - any parser failure: the file is unreadable
            skips.append(
                Skip(path, UNREADABLE_IMAGE, f"{type(error).__name__}: {error}", level="row")
            )
            continue
        study = studies.setdefault(
            header.study_uid, _Study(header.study_uid, header.patient_id, header.accession, [])
        )
        if header.patient_id != study.patient_id:
            skips.append(
                Skip(
                    path,
                    UNREADABLE_IMAGE,
                    f"PatientID {header.patient_id!r} differs from {study.patient_id!r} of "
                    f"the other files of study {study.uid}",
                    level="row",
                )
            )
            continue
        study.accession = study.accession or header.accession
        study.files.append(header)

    numbers: dict[str, str] = {}
    for uid in studies:
        other = numbers.setdefault(study_number(uid), uid)
        if other != uid:
            raise ConversionError(
                f"StudyInstanceUIDs {other} and {uid} derive the same study id "
                f"{study_number(uid)}; rename one of them"
            )
    keyed = {sample_key(subject_of(s.patient_id), study_number(s.uid)): s for s in studies.values()}
    keys = sorted(keyed)
    if limit is not None:
        keys = keys[:limit]

    if os.path.isfile(reports):
        report_table: _StudyTable | None = _read_study_table(
            reports, REPORT_KEYS, REPORT_TEXT, "report table", skips
        )
        inputs["reports"] = fingerprint_file(reports)
        report_folder = None
    else:
        report_table, report_folder = None, _ReportFolder(reports)
    splits = None
    if split_table is not None:
        splits = _read_study_table(split_table, SPLIT_KEYS, "split", "split table", skips)
        inputs["split"] = fingerprint_file(split_table)
        assigned = []
        for key in keys:
            row = splits.lookup(keyed[key])
            if row is not None:
                subject = subject_of(keyed[key].patient_id)
                assigned.append((subject, row[1].strip(), f"{split_table}:{row[0]}"))
        check_subject_splits(assigned)

    records, table_rows = [], []
    for key in keys:
        study = keyed[key]
        subject, number = subject_of(study.patient_id), study_number(study.uid)
        where = study.files[0].path
        if splits is None:
            split = split_by_hash(subject, seed, split_fractions)
        else:
            found = splits.lookup(study)
            if found is None:
                skips.append(
                    Skip(
                        where,
                        MALFORMED_ROW,
                        f"study {study.uid} ({splits.column}) not in split table {split_table}",
                        key,
                    )
                )
                continue
            split = found[1].strip()
        report, source = _report_of(study, report_table, report_folder, key, split, skips)
        if report is None:
            continue
        when = [study_datetime(h.study_date, h.study_time, h.path) for h in study.files]
        images = [ImageRef(h.instance_uid, h.path, h.view) for h in study.files]
        record, bad = build_record(
            subject,
            number,
            split,
            min((w for w in when if w is not None), default=None),
            images,
            report,
            source,
            sections=_sections(report),
            unknown_view_is_error=True,
        )
        skips += bad
        if record is None:
            continue
        records.append(record)
        table_rows.append(
            {
                "key": key,
                "subject_id": subject,
                "study_id": number,
                "split": split,
                "PatientID": study.patient_id,
                "StudyInstanceUID": study.uid,
                "AccessionNumber": study.accession,
            }
        )
    return DicomAdapterOutput("dicom", records, skips, len(keys), inputs, table_rows)


def _report_of(
    study: _Study,
    table: _StudyTable | None,
    folder: _ReportFolder | None,
    key: str,
    split: str,
    skips: list[Skip],
) -> tuple[str | None, str]:
    """``(report text, where it came from)``, or ``(None, ...)`` with the skip recorded."""
    if table is not None:
        found = table.lookup(study)
        if found is None or not found[1].strip():
            what = "an empty report_text" if found else f"no row for {table.column}"
            skips.append(
                Skip(table.path, MISSING_REPORT, f"{what} of study {study.uid}", key, split)
            )
            return None, ""
        return found[1].strip(), f"{table.path}:{found[0]}"
    path, why = folder.find(study)
    if path is None:
        skips.append(Skip(study.files[0].path, MISSING_REPORT, why, key, split))
        return None, ""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        skips.append(Skip(path, MISSING_REPORT, type(error).__name__, key, split))
        return None, ""
    if not text.strip():
        skips.append(Skip(path, MISSING_REPORT, "empty report file", key, split))
        return None, ""
    return text, path


def write_study_table(out: str, rows: list[dict]) -> str:
    """Write ``OUT/dicom_studies.csv`` (sorted by key, replaced atomically); its path."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(STUDY_TABLE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["key"]):
        writer.writerow(row)
    path = os.path.join(out, STUDY_TABLE)
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())
    os.replace(path + ".tmp", path)
    return path
