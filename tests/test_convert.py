"""End-to-end tests of the shard converter (``vlp.data.convert``) on tiny generated inputs.

Expected values come from the fixture definitions (dates, views, labels written by the
test), from plain PIL decoding, or from a second independent conversion, never from the
converter's own output.
"""

from __future__ import annotations

import csv
import datetime as dt
import glob
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlp.data.convert import main
from vlp.data.convert import writer as writer_module
from vlp.data.convert.images import load_resized, target_size
from vlp.data.convert.records import ConversionError, StudyRecord, assign_priors
from vlp.data.schema import CHEXPERT_LABELS, JSON_FIELDS, SPLITS

REAL_CXR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "real-cxr")

# ------------------------------------------------------------------------------ fixtures


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth gradient plus noise, so that resizing is meaningful."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 80 * np.sin(x / (width / 3.0) + seed) * np.cos(y / (height / 2.0))
    return np.clip(base + rng.normal(0, 8, size=base.shape), 0, 255).astype(np.uint8)


def _save_jpeg(path: str, width: int, height: int, seed: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(_pattern(width, height, seed), mode="L").save(path, quality=95)


REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough

 FINDINGS:
 Study {study} shows clear lungs.  No pleural effusion.

 IMPRESSION:
 1. No acute process in study {study}.
 2. Stable heart size.
"""

# subject -> split, studies: (study_id, date, time, [(dicom, view, (w, h))])
MIMIC_STUDIES = {
    "10000001": (
        "train",
        [
            (
                "50000011",
                "21800101",
                "101500.0",
                [("d11a", "AP", (60, 80)), ("d11b", "PA", (64, 80))],
            ),
            (
                "50000012",
                "21800111",
                "93000.5",
                [("d12a", "PA", (64, 80)), ("d12b", "LATERAL", (80, 64))],
            ),
            ("50000013", "21800301", "120000", [("d13a", "AP", (70, 80))]),
        ],
    ),
    "10000002": ("train", [("50000021", "21900505", "80000", [("d21a", "PA", (64, 80))])]),
    "10000003": (
        "train",
        [
            ("50000031", "21810101", "80000", [("d31a", "PA", (64, 80)), ("d31b", "LL", (80, 64))]),
            ("50000032", "21810102", "80000", [("d32a", "AP", (64, 80))]),
        ],
    ),
    "10000004": ("train", [("50000041", "21820101", "80000", [("d41a", "LATERAL", (80, 64))])]),
    "10000005": ("validate", [("50000051", "21830101", "80000", [("d51a", "PA", (64, 80))])]),
    "10000006": (
        "test",
        [
            ("50000061", "21840101", "80000", [("d61a", "PA", (64, 80))]),
            ("50000062", "21840201", "80000", [("d62a", "PA", (64, 80))]),
        ],
    ),
}

CHEXPERT_ROWS = {
    ("10000001", "50000012"): {"Atelectasis": "1.0", "Edema": "-1.0", "No Finding": "0.0"},
    ("10000006", "50000062"): {"Pneumothorax": "1.0"},
}


def _write_csv(path: str, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def make_mimic(root: str, split_override: dict | None = None) -> str:
    meta, splits = [], []
    seed = 0
    for subject, (split, studies) in MIMIC_STUDIES.items():
        for study, date, time, images in studies:
            folder = os.path.join(root, "files", f"p{subject[:2]}", f"p{subject}", f"s{study}")
            os.makedirs(folder, exist_ok=True)
            with open(folder + ".txt", "w") as handle:
                handle.write(REPORT.format(study=study))
            for dicom, view, (w, h) in images:
                seed += 1
                _save_jpeg(os.path.join(folder, f"{dicom}.jpg"), w, h, seed)
                meta.append(
                    {
                        "dicom_id": dicom,
                        "subject_id": subject,
                        "study_id": study,
                        "PerformedProcedureStepDescription": "CHEST",
                        "ViewPosition": view,
                        "Rows": h,
                        "Columns": w,
                        "StudyDate": date,
                        "StudyTime": time,
                    }
                )
                row_split = (split_override or {}).get(dicom, split)
                splits.append(
                    {
                        "dicom_id": dicom,
                        "study_id": study,
                        "subject_id": subject,
                        "split": row_split,
                    }
                )
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"), list(meta[0]), meta)
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv"), list(splits[0]), splits)
    chex = []
    for (subject, study), values in CHEXPERT_ROWS.items():
        row = {"subject_id": subject, "study_id": study}
        row.update({label: values.get(label, "") for label in CHEXPERT_LABELS})
        chex.append(row)
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv"), list(chex[0]), chex)
    _write_csv(
        os.path.join(root, "regex_report_edema_severity.csv"),
        ["subject_id", "study_id", "edema_severity"],
        [{"subject_id": "10000001", "study_id": "50000013", "edema_severity": "2"}],
    )
    _write_csv(
        os.path.join(root, "MS_CXR_Local_Alignment_v1.0.0.csv"),
        ["dicom_id", "category", "label_text", "x", "y", "w", "h", "image_width", "image_height"],
        [
            {
                "dicom_id": "d11a",
                "category": "Cardiomegaly",
                "label_text": "enlarged heart",
                "x": 6,
                "y": 20,
                "w": 30,
                "h": 40,
                "image_width": 60,
                "image_height": 80,
            }
        ],
    )
    _write_csv(
        os.path.join(root, "MS_CXR_T_temporal_image_classification_v1.0.0.csv"),
        [
            "dicom_id",
            "previous_dicom_id",
            "study_id",
            "subject_id",
            "consolidation_progression",
            "edema_progression",
            "pleural_effusion_progression",
            "pneumonia_progression",
            "pneumothorax_progression",
        ],
        [
            {
                "dicom_id": "d13a",
                "previous_dicom_id": "d11b",
                "study_id": "50000013",
                "subject_id": "10000001",
                "consolidation_progression": "",
                "edema_progression": "worsening",
                "pleural_effusion_progression": "stable",
                "pneumonia_progression": "",
                "pneumothorax_progression": "",
            }
        ],
    )
    return root


def _load_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _read_rows(path: str) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_shards(split_dir: str) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(glob.glob(os.path.join(split_dir, "shard-*.tar"))):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


def tree_hashes(out: str) -> dict[str, str]:
    hashes = {}
    for path in sorted(glob.glob(os.path.join(out, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                hashes[os.path.relpath(path, out)] = hashlib.sha256(handle.read()).hexdigest()
    return hashes


def run_mimic(root: str, out: str, *extra: str) -> int:
    return main(
        [
            "mimic",
            "--root",
            root,
            "--out",
            out,
            "--image-size",
            "32",
            "--shard-size",
            "2",
            "--workers",
            "1",
            "--priors",
            "2",
            "--quiet",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def mimic_root(tmp_path_factory):
    return make_mimic(str(tmp_path_factory.mktemp("mimic")))


# ---------------------------------------------------------------------------- MIMIC


def test_mimic_end_to_end(mimic_root, tmp_path):
    out = str(tmp_path / "out")
    assert run_mimic(mimic_root, out) == 0

    # Expected keys: studies that have a frontal view (10000004 has only a lateral).
    expected = {split: set() for split in SPLITS}
    for subject, (split, studies) in MIMIC_STUDIES.items():
        for study, _, _, images in studies:
            if any(view in ("PA", "AP") for _, view, _ in images):
                expected[split].add(f"p{subject}-s{study}")
    samples = {}
    for split in SPLITS:
        got = read_shards(os.path.join(out, split))
        assert set(got) == expected[split]
        manifest = _load_json(os.path.join(out, split, "manifest.json"))
        assert manifest["total_samples"] == len(expected[split])
        assert all(shard["samples"] <= 2 for shard in manifest["shards"])
        samples.update(got)
    summary = _load_json(os.path.join(out, "conversion.json"))
    assert summary["skipped_studies"] == {"no frontal view": 1}
    assert summary["errors"] == 0

    for members in samples.values():
        record = json.loads(members["json"])
        assert set(record) == set(JSON_FIELDS)
        assert set(record["labels"]["chexpert"]) == set(CHEXPERT_LABELS)
        frontal = Image.open(io.BytesIO(members["frontal.jpg"]))
        assert frontal.mode == "L" and max(frontal.size) == 32
        assert record["frontal"]["size"] == [frontal.size[1], frontal.size[0]]

    # PA preferred over AP, except that an MS-CXR box on the AP image makes it preferred.
    s12 = json.loads(samples["p10000001-s50000012"]["json"])
    assert s12["frontal"]["dicom_id"] == "d12a" and s12["lateral"]["dicom_id"] == "d12b"
    assert s12["labels"]["chexpert"]["Atelectasis"] == 1
    assert s12["labels"]["chexpert"]["Edema"] == -1
    assert s12["labels"]["chexpert"]["No Finding"] == 0
    assert s12["labels"]["chexpert"]["Pneumonia"] is None
    s11 = json.loads(samples["p10000001-s50000011"]["json"])
    assert s11["frontal"]["dicom_id"] == "d11a"  # boxed image wins over the PA
    box = s11["labels"]["boxes"][0]
    stored_h, stored_w = s11["frontal"]["size"]  # 60x80 original -> 24x32
    assert (stored_w, stored_h) == target_size(60, 80, 32)
    assert box["x"] == pytest.approx(6 * stored_w / 60) and box["h"] == pytest.approx(
        40 * stored_h / 80
    )
    assert box["view"] == "frontal" and box["phrase"] == "enlarged heart"
    s31 = json.loads(samples["p10000003-s50000031"]["json"])
    assert s31["lateral"]["view"] == "LL"
    assert "lateral.jpg" not in samples["p10000003-s50000032"]

    # Priors: same subject, strictly earlier, most recent first; gap from the fixture dates.
    s13 = json.loads(samples["p10000001-s50000013"]["json"])
    when = {
        "50000011": dt.datetime(2180, 1, 1, 10, 15),
        "50000012": dt.datetime(2180, 1, 11, 9, 30, 0, 500000),
        "50000013": dt.datetime(2180, 3, 1, 12, 0),
    }
    # MS-CXR-T names d11b (study 50000011) as the previous image: it comes first.
    assert [p["study_id"] for p in s13["priors"]] == ["50000011", "50000012"]
    assert s13["priors"][0]["frontal"]["dicom_id"] == "d11b"
    gap = (when["50000013"] - when["50000011"]).total_seconds() / 86400
    assert s13["priors"][0]["gap_days"] == pytest.approx(gap)
    assert s13["labels"]["progression"] == {"edema": "worsening", "pleural_effusion": "stable"}
    assert s13["labels"]["edema_severity"] == 2
    assert {"prior1.frontal.jpg", "prior2.frontal.jpg", "prior2.lateral.jpg"} <= set(
        samples["p10000001-s50000013"]
    )
    assert s12["priors"][0]["study_id"] == "50000011"
    assert s12["priors"][0]["sentences"] == [
        "No acute process in study 50000011.",
        "Stable heart size.",
        "Study 50000011 shows clear lungs.",
        "No pleural effusion.",
    ]
    assert json.loads(samples["p10000001-s50000011"]["json"])["priors"] == []
    assert json.loads(samples["p10000006-s50000062"]["json"])["priors"][0]["study_id"] == "50000061"

    # Text: impression then findings.
    assert samples["p10000002-s50000021"]["txt"].decode() == (
        "1. No acute process in study 50000021. 2. Stable heart size. "
        "Study 50000021 shows clear lungs. No pleural effusion."
    )

    # Pixels: the stored frontal matches a plain full decode + resize of the source.
    source = Image.open(os.path.join(mimic_root, "files/p10/p10000002/s50000021/d21a.jpg"))
    reference = np.asarray(
        source.convert("L").resize(target_size(64, 80, 32), Image.LANCZOS), float
    )
    stored = np.asarray(
        Image.open(io.BytesIO(samples["p10000002-s50000021"]["frontal.jpg"])), float
    )
    assert np.abs(stored - reference).mean() < 6


def test_tar_members_have_fixed_metadata(mimic_root, tmp_path):
    out = str(tmp_path / "out")
    assert run_mimic(mimic_root, out) == 0
    with tarfile.open(os.path.join(out, "train", "shard-000000.tar")) as tar:
        for member in tar.getmembers():
            assert (
                member.mtime,
                member.uid,
                member.gid,
                member.uname,
                member.gname,
                member.mode,
            ) == (0, 0, 0, "", "", 0o644)
            assert member.name.rsplit(".", 1)[-1] in ("jpg", "json", "txt")


def test_deterministic_across_runs_and_workers(mimic_root, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_mimic(mimic_root, a) == 0
    assert run_mimic(mimic_root, b, "--workers", "2") == 0
    hashes_a, hashes_b = tree_hashes(a), tree_hashes(b)
    assert any(name.endswith(".tar") for name in hashes_a)
    assert hashes_a == hashes_b


def test_seed_changes_order_not_content(mimic_root, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_mimic(mimic_root, a) == 0
    assert run_mimic(mimic_root, b, "--seed", "7") == 0
    assert read_shards(os.path.join(a, "train")) == read_shards(os.path.join(b, "train"))


def test_resume_after_interrupted_run(mimic_root, tmp_path, monkeypatch):
    clean, resumed = str(tmp_path / "clean"), str(tmp_path / "resumed")
    assert run_mimic(mimic_root, clean) == 0

    real_commit = writer_module._commit
    calls = {"n": 0}

    def dying_commit(tmp, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard is fully written to .tmp, then the process "dies"
            raise KeyboardInterrupt
        real_commit(tmp, path)

    monkeypatch.setattr(writer_module, "_commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        run_mimic(mimic_root, resumed)
    train = os.path.join(resumed, "train")
    assert os.path.exists(os.path.join(train, "shard-000001.tar.tmp"))
    assert not os.path.exists(os.path.join(train, "shard-000001.tar"))
    assert not os.path.exists(os.path.join(train, "manifest.json"))
    first_mtime = os.stat(os.path.join(train, "shard-000000.tar")).st_mtime_ns

    monkeypatch.setattr(writer_module, "_commit", real_commit)
    written = []
    real_write = writer_module.write_tar_atomic

    def counting_write(path, samples):
        written.append(os.path.relpath(path, resumed))
        return real_write(path, samples)

    import vlp.data.convert.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "write_tar_atomic", counting_write)
    assert run_mimic(mimic_root, resumed) == 0
    # Only the unfinished shards are written again; the finished one is left alone.
    assert sorted(written) == [
        "test/shard-000000.tar",
        "train/shard-000001.tar",
        "train/shard-000002.tar",
        "validate/shard-000000.tar",
    ]
    assert os.stat(os.path.join(train, "shard-000000.tar")).st_mtime_ns == first_mtime
    assert not glob.glob(os.path.join(resumed, "*", "*.tmp"))
    assert tree_hashes(resumed) == tree_hashes(clean)


def test_resume_refuses_output_of_other_arguments(mimic_root, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_mimic(mimic_root, out) == 0
    assert run_mimic(mimic_root, out) == 0  # same plan: nothing to do, still fine
    assert run_mimic(mimic_root, out, "--quality", "50") == 1
    assert "other inputs or arguments" in capsys.readouterr().err


def test_corrupt_image_and_missing_report_are_counted(tmp_path):
    root = make_mimic(str(tmp_path / "mimic"))
    with open(os.path.join(root, "files/p10/p10000002/s50000021/d21a.jpg"), "wb") as handle:
        handle.write(b"not a jpeg at all")
    os.remove(os.path.join(root, "files/p10/p10000005/s50000051.txt"))
    out = str(tmp_path / "out")
    assert run_mimic(root, out, "--max-error-rate", "0.5") == 0
    train = read_shards(os.path.join(out, "train"))
    assert "p10000002-s50000021" not in train and "p10000001-s50000011" in train
    assert read_shards(os.path.join(out, "validate")) == {}
    summary = _load_json(os.path.join(out, "conversion.json"))
    assert summary["errors"] == 2
    assert summary["skipped_studies"] == {
        "missing report": 1,
        "no frontal view": 1,
        "unreadable image": 1,
    }
    assert summary["error_rate"] == pytest.approx(2 / 10)
    manifest = _load_json(os.path.join(out, "train", "manifest.json"))
    assert manifest["skipped_studies"]["unreadable image"] == 1
    assert manifest["skipped_images"]["unreadable image"] == 1
    validate = _load_json(os.path.join(out, "validate", "manifest.json"))
    assert validate["skipped_studies"] == {"missing report": 1}


def test_error_rate_exceeded_fails_and_names_inputs(tmp_path, capsys):
    root = make_mimic(str(tmp_path / "mimic"))
    bad = os.path.join(root, "files/p10/p10000002/s50000021/d21a.jpg")
    with open(bad, "wb") as handle:
        handle.write(b"\xff\xd8 truncated")
    assert run_mimic(root, str(tmp_path / "out"), "--max-error-rate", "0.05") == 1
    err = capsys.readouterr().err
    assert "exceed --max-error-rate" in err and bad in err


def test_split_table_disagreement_names_subject(tmp_path, capsys):
    root = make_mimic(str(tmp_path / "mimic"), split_override={"d32a": "test"})
    assert run_mimic(root, str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "subject 10000003" in err and "two splits" in err


def test_priors_never_cross_splits():
    def record(split, study, day):
        return StudyRecord(
            "1", study, split, dt.datetime(2100, 1, day), [object()], [], "", {}, ["x"]
        )

    a, b, c = record("train", "1", 1), record("test", "2", 2), record("train", "3", 3)
    assign_priors([a, b, c], 3)
    assert [p.study_id for p, _ in c.priors] == ["1"] and b.priors == []


def test_missing_required_column_is_named(tmp_path, capsys):
    root = make_mimic(str(tmp_path / "mimic"))
    path = os.path.join(root, "mimic-cxr-2.0.0-metadata.csv")
    rows = _read_rows(path)
    _write_csv(
        path,
        [c for c in rows[0] if c != "ViewPosition"],
        [{k: v for k, v in r.items() if k != "ViewPosition"} for r in rows],
    )
    assert run_mimic(root, str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "ViewPosition" in err and "mimic-cxr-2.0.0-metadata.csv" in err


def test_missing_split_table_is_named(tmp_path, capsys):
    root = make_mimic(str(tmp_path / "mimic"))
    os.remove(os.path.join(root, "mimic-cxr-2.0.0-split.csv"))
    assert run_mimic(root, str(tmp_path / "out")) == 1
    assert "mimic-cxr-2.0.0-split.csv" in capsys.readouterr().err


def test_malformed_row_is_skipped_and_counted(tmp_path):
    root = make_mimic(str(tmp_path / "mimic"))
    with open(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv"), "a") as handle:
        handle.write("10000002,50000021,1.0,7.0," + ",".join([""] * 12) + "\n")  # 7: no label
        handle.write("10000002\n")  # too few fields
    out = str(tmp_path / "out")
    assert run_mimic(root, out, "--max-error-rate", "0.5") == 0
    summary = _load_json(os.path.join(out, "conversion.json"))
    assert summary["skipped_studies"].get("malformed row") == 2
    skips = {s["path"].rsplit("/", 1)[-1]: s["detail"] for s in summary["skips_without_split"]}
    assert "7.0" in skips["mimic-cxr-2.0.0-chexpert.csv:4"]
    assert "expected 16 fields" in skips["mimic-cxr-2.0.0-chexpert.csv:5"]


# ----------------------------------------------------------------------------- images


def test_draft_decode_of_large_jpeg(tmp_path):
    path = str(tmp_path / "big.jpg")
    _save_jpeg(path, 2500, 3000, seed=3)
    image, orig = load_resized(path, 512)
    assert orig == (3000, 2500)
    assert image.size == (427, 512) and image.mode == "L"
    # Same picture as a full decode + resize (draft mode only trades a little sharpness).
    reference = np.asarray(Image.open(path).convert("L").resize((427, 512), Image.LANCZOS), float)
    assert np.abs(np.asarray(image, float) - reference).mean() < 3


def test_draft_mode_avoids_full_decode(tmp_path, monkeypatch):
    path = str(tmp_path / "big.jpg")
    _save_jpeg(path, 2500, 3000, seed=4)
    seen = []
    real_resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        seen.append(self.size)
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    load_resized(path, 512)
    assert seen and max(seen[0]) < 3000 / 2  # decoded at a DCT-reduced size, not 2500x3000


@pytest.mark.skipif(not os.path.isdir(REAL_CXR), reason=f"real radiographs not found at {REAL_CXR}")
def test_real_radiographs_through_image_path():
    paths = sorted(glob.glob(os.path.join(REAL_CXR, "*.png")))
    assert paths
    for path in paths:
        original = np.asarray(Image.open(path).convert("L"), float)
        image, orig = load_resized(path, 256)
        assert orig == original.shape and max(image.size) == 256
        small = np.asarray(image, float)
        # Independent reference: block means of the original at the same scale.
        f = original.shape[0] // small.shape[0]
        blocks = original[: small.shape[0] * f, : small.shape[1] * f]
        blocks = blocks.reshape(small.shape[0], f, small.shape[1], f).mean(axis=(1, 3))
        assert abs(small.mean() - original.mean()) < 2
        assert np.corrcoef(small.ravel(), blocks.ravel())[0, 1] > 0.98


def test_sixteen_bit_png_is_scaled_by_its_range(tmp_path):
    path = str(tmp_path / "deep.png")
    values = np.linspace(1000, 5000, 40 * 30).reshape(40, 30).astype(np.uint16)
    Image.fromarray(values).save(path)
    image, _ = load_resized(path, 40)
    array = np.asarray(image)
    assert array.min() == 0 and array.max() == 255


# --------------------------------------------------------------------------------- IU

IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR{id}"/>
<MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="INDICATION">Cough.</AbstractText>
<AbstractText Label="FINDINGS">{findings}</AbstractText>
<AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation>
{images}
</eCitation>"""


def make_iu(root: str) -> tuple[str, str]:
    reports, images = os.path.join(root, "xml"), os.path.join(root, "png")
    os.makedirs(reports)
    os.makedirs(images)
    cases = {
        "1": ("The heart is normal. XXXX are clear.", "1. No acute disease. 2. Normal.", 2),
        "2": ("", "Mild cardiomegaly.", 1),
        "3": ("Clear lungs.", "", 0),  # no images: not a sample
        "4": ("", "", 1),  # no text: not a sample
    }
    for rid, (findings, impression, n_images) in cases.items():
        ids = [f"CXR{rid}_IM-000{rid}-{1001 + 1000 * i}" for i in range(n_images)]
        for i, image_id in enumerate(ids):
            Image.fromarray(_pattern(50 + 10 * i, 60, int(rid) + i)).save(
                os.path.join(images, f"{image_id}.png")
            )
        parents = "".join(
            f'<parentImage id="{i}"><figureId>F1</figureId></parentImage>' for i in ids
        )
        with open(os.path.join(reports, f"{rid}.xml"), "w") as handle:
            handle.write(
                IU_XML.format(id=rid, findings=findings, impression=impression, images=parents)
            )
    return reports, images


def test_iu_end_to_end(tmp_path):
    reports, images = make_iu(str(tmp_path))
    out = str(tmp_path / "out")
    # validate/test fractions 0: every subject lands in train.
    code = main(
        [
            "iu",
            "--reports",
            reports,
            "--images",
            images,
            "--out",
            out,
            "--image-size",
            "24",
            "--workers",
            "1",
            "--quiet",
            "--split-fractions",
            "1,0,0",
        ]
    )
    assert code == 0
    samples = read_shards(os.path.join(out, "train"))
    assert set(samples) == {"p1-s1", "p2-s2"}
    one = json.loads(samples["p1-s1"]["json"])
    assert one["frontal"]["dicom_id"] == "CXR1_IM-0001-1001" and one["frontal"]["orig_size"] == [
        60,
        50,
    ]
    assert one["lateral"]["dicom_id"] == "CXR1_IM-0001-2001" and "lateral.jpg" in samples["p1-s1"]
    assert one["sentences"] == [
        "No acute disease.",
        "Normal.",
        "The heart is normal.",
        "XXXX are clear.",
    ]
    assert one["sections"]["comparison"] == "None." and one["priors"] == []
    assert "lateral.jpg" not in samples["p2-s2"]
    summary = _load_json(os.path.join(out, "conversion.json"))
    assert summary["skipped_studies"] == {"no findings/impression text": 1, "no frontal view": 1}


def test_iu_reads_the_tgz_and_projection_table(tmp_path):
    reports, images = make_iu(str(tmp_path))
    tgz = str(tmp_path / "reports.tgz")
    with tarfile.open(tgz, "w:gz") as archive:
        archive.add(reports, arcname="ecgen-radiology")
    projections = str(tmp_path / "proj.csv")
    # Kaggle-style names; the projection table says report 1's *second* image is frontal.
    _write_csv(
        projections,
        ["uid", "filename", "projection"],
        [
            {"uid": 1, "filename": "1_IM-0001-1001.dcm.png", "projection": "Lateral"},
            {"uid": 1, "filename": "1_IM-0001-2001.dcm.png", "projection": "Frontal"},
            {"uid": 2, "filename": "2_IM-0002-1001.dcm.png", "projection": "Frontal"},
        ],
    )
    out = str(tmp_path / "out")
    assert (
        main(
            [
                "iu",
                "--reports",
                tgz,
                "--images",
                images,
                "--projections",
                projections,
                "--out",
                out,
                "--image-size",
                "24",
                "--workers",
                "1",
                "--quiet",
                "--split-fractions",
                "1,0,0",
            ]
        )
        == 0
    )
    one = json.loads(read_shards(os.path.join(out, "train"))["p1-s1"]["json"])
    assert one["frontal"]["dicom_id"] == "CXR1_IM-0001-2001"
    assert one["lateral"]["dicom_id"] == "CXR1_IM-0001-1001"


# -------------------------------------------------------------------------------- CSV


def make_table(root: str) -> str:
    os.makedirs(os.path.join(root, "img"))
    rows = []
    for i, (subject, study, view, split, when) in enumerate(
        [
            ("a", "1", "PA", "train", "2100-01-01T08:00:00"),
            ("a", "1", "LATERAL", "train", "2100-01-01T08:00:00"),
            ("a", "2", "AP", "train", "2100-01-03T20:00:00"),
            ("b", "3", "FRONTAL", "test", ""),
            ("c", "4", "OBLIQUE", "validate", "2100-01-01"),  # unknown view: an error
        ]
    ):
        name = f"img/{subject}{study}_{i}.png"
        Image.fromarray(_pattern(40, 50, i)).save(os.path.join(root, name))
        rows.append(
            {
                "subject_id": subject,
                "study_id": study,
                "image_path": name,
                "view": view,
                "study_datetime": when,
                "split": split,
                "report_text": f"FINDINGS: Lungs clear in {study}.\nIMPRESSION: Normal study {study}.",
                "Cardiomegaly": "1" if study == "2" else "",
                "Edema": "-1" if study == "1" else "0",
            }
        )
    path = os.path.join(root, "table.csv")
    _write_csv(path, list(rows[0]), rows)
    return path


def test_csv_end_to_end(tmp_path):
    table = make_table(str(tmp_path))
    out = str(tmp_path / "out")
    assert (
        main(
            [
                "csv",
                "--table",
                table,
                "--out",
                out,
                "--image-size",
                "20",
                "--workers",
                "1",
                "--quiet",
                "--max-error-rate",
                "0.5",
            ]
        )
        == 0
    )
    train = read_shards(os.path.join(out, "train"))
    assert set(train) == {"pa-s1", "pa-s2"}
    assert set(read_shards(os.path.join(out, "test"))) == {"pb-s3"}
    assert read_shards(os.path.join(out, "validate")) == {}
    two = json.loads(train["pa-s2"]["json"])
    assert two["priors"][0]["study_id"] == "1"
    assert two["priors"][0]["gap_days"] == pytest.approx(2.5)
    assert (
        two["labels"]["chexpert"]["Cardiomegaly"] == 1 and two["labels"]["chexpert"]["Edema"] == 0
    )
    assert two["labels"]["chexpert"]["Atelectasis"] is None
    assert two["sections"]["impression"] == "Normal study 2."
    assert train["pa-s2"]["txt"].decode() == "Normal study 2. Lungs clear in 2."
    assert "prior1.lateral.jpg" in train["pa-s2"]
    summary = _load_json(os.path.join(out, "conversion.json"))
    assert summary["skipped_studies"] == {"unknown view": 1} and summary["errors"] == 1


def test_csv_missing_report_column_is_named(tmp_path, capsys):
    table = make_table(str(tmp_path))
    rows = _read_rows(table)
    _write_csv(
        table,
        [c for c in rows[0] if c != "report_text"],
        [{k: v for k, v in r.items() if k != "report_text"} for r in rows],
    )
    assert main(["csv", "--table", table, "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "report_text" in err and "report_path" in err


def test_csv_report_path_missing_is_counted(tmp_path):
    table = make_table(str(tmp_path))
    rows = _read_rows(table)
    with open(os.path.join(str(tmp_path), "r1.txt"), "w") as handle:
        handle.write("IMPRESSION: From a file.")
    for row in rows:
        row["report_path"] = "r1.txt" if row["study_id"] == "1" else "missing.txt"
        row["report_text"] = ""
    _write_csv(table, list(rows[0]), rows)
    out = str(tmp_path / "out")
    assert (
        main(
            [
                "csv",
                "--table",
                table,
                "--out",
                out,
                "--quiet",
                "--workers",
                "1",
                "--image-size",
                "20",
                "--max-error-rate",
                "0.9",
            ]
        )
        == 0
    )
    train = read_shards(os.path.join(out, "train"))
    assert set(train) == {"pa-s1"}
    assert json.loads(train["pa-s1"]["json"])["sentences"] == ["From a file."]
    summary = _load_json(os.path.join(out, "conversion.json"))
    # The report is checked first, so study 4 (unknown view) counts as missing report.
    assert summary["skipped_studies"] == {"missing report": 3}


def test_conversion_error_is_raised_by_library_api(tmp_path):
    from vlp.data.convert.table import read_table_adapter

    with pytest.raises(ConversionError, match="image table not found"):
        read_table_adapter(str(tmp_path / "nope.csv"))


def test_resume_after_sigkill_of_a_real_conversion(tmp_path):
    """Kill `tools/make_shards.py` with SIGKILL mid-run; the rerun completes it, byte-identical."""
    import signal
    import subprocess
    import sys
    import time

    from vlp.data.phantom import PhantomConfig, generate

    root = tmp_path / "phantom"
    generate(root, PhantomConfig(patients=40, seed=3, image_size=1024), progress=False)
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "make_shards.py")

    def command(out):
        return [sys.executable, tool, "mimic", "--root", str(root), "--out", str(out),
                "--image-size", "512", "--shard-size", "4", "--workers", "1"]  # fmt: skip

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert subprocess.run(command(clean), capture_output=True, timeout=600).returncode == 0
    proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(str(killed / "train" / "shard-*.tar")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "train" / "manifest.json").exists(), (
        "the conversion finished before the kill"
    )
    finished_before = set(glob.glob(str(killed / "*" / "shard-*.tar")))
    assert finished_before, "no shard was finished before the kill"
    assert subprocess.run(command(killed), capture_output=True, timeout=600).returncode == 0
    assert not glob.glob(str(killed / "*" / "*.tmp"))
    assert tree_hashes(str(killed)) == tree_hashes(str(clean))
