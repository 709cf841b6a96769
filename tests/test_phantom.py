"""Tests of the phantom generator (vlp.data.phantom).

Display convention checked here: frontal radiographs are shown as read, the patient
facing the viewer, so the patient's LEFT is on the image RIGHT (a left effusion's box lies
in the right half of the image). Lateral views show anterior on the image left.

Expected values come from independent computations: a small keyword labeller written
here (not the generator's templates), severities re-compared by hand, pixel statistics of
re-rendered images, and the MIMIC section regex.
"""

from __future__ import annotations

import csv
import filecmp
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlp.data.phantom import PhantomConfig, generate, read_truth, render_view, write_preview
from vlp.data.phantom.acquisition import Acquisition
from vlp.data.phantom.anatomy import Anatomy
from vlp.data.phantom.findings import DEFAULT_PREVALENCE, FINDING_TYPES, sample_course
from vlp.data.phantom.render import PatientRenderer
from vlp.data.schema import CHEXPERT_LABELS

PREVALENCE = {**DEFAULT_PREVALENCE, "pneumothorax": 0.3, "nodule": 0.3, "fracture": 0.2}
SIZE = 160


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    cfg = PhantomConfig(patients=16, seed=3, image_size=SIZE, prevalence=PREVALENCE)
    summary = generate(out, cfg, progress=False)
    return out, summary, read_truth(out)


def _csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


# ------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    cfg = dict(patients=5, seed=11, image_size=96, max_studies=3)
    generate(tmp_path / "a", PhantomConfig(**cfg), progress=False)
    generate(tmp_path / "b", PhantomConfig(**cfg, workers=2), progress=False)
    files_a = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    files_b = sorted(
        p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    assert files_a == files_b and len(files_a) > 10
    for rel in files_a:
        assert filecmp.cmp(tmp_path / "a" / rel, tmp_path / "b" / rel, shallow=False), rel
    generate(tmp_path / "c", PhantomConfig(**{**cfg, "seed": 12}), progress=False)
    assert not filecmp.cmp(
        tmp_path / "a" / "mimic-cxr-2.0.0-chexpert.csv",
        tmp_path / "c" / "mimic-cxr-2.0.0-chexpert.csv",
        shallow=False,
    )


# ------------------------------------------------------------------ layout and tables


def test_layout_ids_and_csv_columns(dataset):
    out, summary, truth = dataset
    expected = {
        "mimic-cxr-2.0.0-metadata.csv": [
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
        ],
        "mimic-cxr-2.0.0-split.csv": ["dicom_id", "study_id", "subject_id", "split"],
        "mimic-cxr-2.0.0-chexpert.csv": ["subject_id", "study_id", *CHEXPERT_LABELS],
        "regex_report_edema_severity.csv": ["subject_id", "study_id", "edema_severity"],
        "MS_CXR_Local_Alignment_v1.0.0.csv": [
            "dicom_id",
            "category",
            "label_text",
            "x",
            "y",
            "w",
            "h",
            "image_width",
            "image_height",
        ],
        "MS_CXR_T_temporal_image_classification_v1.0.0.csv": [
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
    }
    for name, cols in expected.items():
        header, _ = _csv(out / name)
        assert header == cols, name

    _, meta = _csv(out / "mimic-cxr-2.0.0-metadata.csv")
    assert len(meta) == summary["images"]
    for row in meta:
        sub, stu, did = row["subject_id"], row["study_id"], row["dicom_id"]
        assert re.fullmatch(r"1\d{7}", sub) and re.fullmatch(r"5\d{7}", stu)
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", did)
        path = out / "files" / ("p" + sub)[:3] / f"p{sub}" / f"s{stu}" / f"{did}.jpg"
        with Image.open(path) as im:
            assert im.mode == "L"
            assert (im.height, im.width) == (int(row["Rows"]), int(row["Columns"]))
            assert max(im.size) == SIZE
        assert (path.parent.parent / f"s{stu}.txt").is_file()
        assert row["ViewPosition"] in {"PA", "AP", "LATERAL", "LL"}
        assert 2100 <= int(row["StudyDate"][:4]) <= 2200
        assert re.fullmatch(r"\d{6}\.\d+", row["StudyTime"])

    # Study dates increase within a patient.
    by_subject: dict[str, list] = {}
    for rec in truth:
        by_subject.setdefault(rec["subject_id"], []).append(
            (rec["study_index"], rec["study_date"] + rec["study_time"].rjust(12, "0"))
        )
    for seq in by_subject.values():
        stamps = [s for _, s in sorted(seq)]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)

    # Patient-level split covering all three splits.
    _, split = _csv(out / "mimic-cxr-2.0.0-split.csv")
    per_subject: dict[str, set] = {}
    for row in split:
        per_subject.setdefault(row["subject_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in per_subject.values())
    assert {next(iter(s)) for s in per_subject.values()} == {"train", "validate", "test"}


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="effusion_typo"):
        generate("/tmp/never", PhantomConfig(prevalence={"effusion_typo": 0.2}))
    with pytest.raises(ValueError, match="min_studies"):
        generate("/tmp/never", PhantomConfig(min_studies=3, max_studies=2))


# ------------------------------------------------------------------ reports


HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s")


def test_reports_parse_with_the_mimic_header_regex(dataset):
    out, _, truth = dataset
    for rec in truth:
        text = (out / rec["report_path"]).read_text()
        assert text.startswith(" " * 33 + "FINAL REPORT\n")
        names = HEADER.findall(text)
        assert names[:4] == ["EXAMINATION", "INDICATION", "TECHNIQUE", "COMPARISON"], names
        assert names[-1] == "IMPRESSION" and set(names) <= {*names[:4], "FINDINGS", "IMPRESSION"}
        assert all(line.startswith(" ") and len(line) <= 79 for line in text.splitlines()[1:])
        assert ("None." in text) == (rec["prior_study_id"] is None)


# An independent keyword labeller (polarity per sentence: hedge, then negation, else +).
KEYWORDS = {
    "Pleural Effusion": ["effusion"],
    "Pneumothorax": ["pneumothorax"],
    "Consolidation": ["consolidation"],
    "Pneumonia": ["pneumonia"],
    "Cardiomegaly": ["cardiomegaly", "heart size", "heart is", "cardiac silhouette"],
    "Enlarged Cardiomediastinum": ["cardiomediastinal", "mediastinal contours"],
    "Edema": ["edema", "vascular congestion", "vascular engorgement"],
    "Atelectasis": ["atelectasis"],
    "Lung Opacity": ["opacity", "opacities", "opacification"],
    "Lung Lesion": ["nodule", "mass"],
    "Fracture": ["fracture"],
    "Support Devices": ["tube", "catheter", "central line", "pacemaker", "pacing device"],
}
HEDGE = re.compile(r"\b(possible|cannot be excluded|may|questionable)\b")
NEGATION = re.compile(r"\b(no|not|without|normal|resolved|resolution)\b")


def keyword_labels(report: str) -> dict[str, float | None]:
    body = report[
        report.index("FINDINGS:") if "FINDINGS:" in report else report.index("IMPRESSION:") :
    ]
    sentences = re.split(r"(?<=\.)\s+", " ".join(body.split()))
    found: dict[str, list[int]] = {}
    for s in sentences:
        low = s.lower()
        pol = -1 if HEDGE.search(low) else 0 if NEGATION.search(low) else 1
        for label, words in KEYWORDS.items():
            if any(w in low for w in words):
                found.setdefault(label, []).append(pol)
    out: dict[str, float | None] = {n: None for n in CHEXPERT_LABELS}
    for label, pols in found.items():
        out[label] = 1.0 if 1 in pols else -1.0 if -1 in pols else 0.0
    sick = any(
        out[n] in (1.0, -1.0) for n in CHEXPERT_LABELS if n not in ("No Finding", "Support Devices")
    )
    out["No Finding"] = None if sick else 1.0
    return out


ALLOWED = {
    "pleural_effusion": {"Pleural Effusion"},
    "cardiomegaly": {"Cardiomegaly"},
    "edema": {"Edema"},
    "consolidation": {"Consolidation", "Pneumonia", "Lung Opacity"},
    "atelectasis": {"Atelectasis"},
    "pneumothorax": {"Pneumothorax"},
    "nodule": {"Lung Lesion"},
    "support_devices": {"Support Devices"},
    "fracture": {"Fracture"},
}


def test_chexpert_labels_agree_with_report_text(dataset):
    out, _, truth = dataset
    _, rows = _csv(out / "mimic-cxr-2.0.0-chexpert.csv")
    table = {row["study_id"]: row for row in rows}
    seen = {1.0: 0, 0.0: 0, -1.0: 0}
    for rec in truth:
        text = (out / rec["report_path"]).read_text()
        expected = keyword_labels(text)
        row = table[str(rec["study_id"])]
        for name in CHEXPERT_LABELS:
            got = None if row[name] == "" else float(row[name])
            assert got == expected[name], (rec["study_id"], name, got, expected[name], text)
            if got is not None:
                seen[got] += 1
        # Every present finding is mentioned (positively or hedged); hedged ones give -1.
        for kind, f in rec["findings"].items():
            values = {expected[n] for n in ALLOWED[kind]}
            assert values & {1.0, -1.0}, (rec["study_id"], kind, text)
            if f["hedged"]:
                assert -1.0 in values and 1.0 not in values, (kind, text)
    assert all(v > 0 for v in seen.values()), seen


def test_prevalence_and_lateral_fraction(dataset):
    _, summary, truth = dataset
    assert 0.65 <= summary["lateral_fraction"] <= 1.0
    assert summary["prevalence"]["pleural_effusion"] > 0
    # The Markov course keeps the per-study prevalence, counted over many patients.
    rng = np.random.default_rng(0)
    counts = dict.fromkeys(FINDING_TYPES, 0)
    total = 0
    for _ in range(3000):
        for study in sample_course(rng, int(rng.integers(1, 7)), DEFAULT_PREVALENCE):
            total += 1
            for k in study:
                counts[k] += 1
    for k, p in DEFAULT_PREVALENCE.items():
        assert abs(counts[k] / total - p) < 0.03, (k, counts[k] / total, p)


def test_progression_labels_follow_levels(dataset):
    """MS-CXR-T labels follow the change of the continuous level (severity + extent - 0.5),
    so a change within one grade is labelled too, and the report calls it slight."""
    out, _, truth = dataset
    by_id = {r["study_id"]: r for r in truth}
    _, rows = _csv(out / "MS_CXR_T_temporal_image_classification_v1.0.0.csv")
    assert rows
    checked = within_grade = 0
    for row in rows:
        rec = by_id[int(row["study_id"])]
        prior = by_id[rec["prior_study_id"]]
        assert row["previous_dicom_id"] == prior["views"]["frontal"]["dicom_id"]
        for name in ("consolidation", "edema", "pleural_effusion", "pneumothorax", "pneumonia"):

            def sev(r, name=name):
                key = "consolidation" if name == "pneumonia" else name
                f = r["findings"].get(key)
                if f is None or (name == "pneumonia" and not f["params"]["infectious"]):
                    return 0, 0.0
                return f["severity"], f["severity"] + f["params"]["extent"] - 0.5

            (grade_a, a), (grade_b, b) = sev(prior), sev(rec)
            want = (
                ""
                if a == b == 0
                else ("worsening" if b > a else "improving" if b < a else "stable")
            )
            assert row[f"{name}_progression"] == want, (row, name, a, b)
            checked += want != ""
            if want in ("worsening", "improving") and grade_a == grade_b:
                within_grade += 1
                key = "consolidation" if name == "pneumonia" else name
                said = [s for s in rec["sentences"] if s["finding"] == key]
                slight = ("slight", "minimal", "mildly")
                hedged = all(s["polarity"] == -1 for s in said)  # hedging replaces the change
                assert hedged or any(w in s["text"].lower() for s in said for w in slight), (
                    rec["study_id"],
                    name,
                    said,
                )
    assert checked > 0 and within_grade > 0, (checked, within_grade)


# ------------------------------------------------------------------ boxes and pixels


def test_boxes_inside_images_and_on_the_right_side(dataset):
    out, _, truth = dataset
    _, rows = _csv(out / "MS_CXR_Local_Alignment_v1.0.0.csv")
    dicoms = {v["dicom_id"] for r in truth for v in r["views"].values() if v}
    for row in rows:
        x, y, w, h = (int(row[k]) for k in "xywh")
        W, H = int(row["image_width"]), int(row["image_height"])
        assert row["dicom_id"] in dicoms
        assert w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= W and y + h <= H
    sided = 0
    for rec in truth:
        W = rec["views"]["frontal"]["columns"]
        H = rec["views"]["frontal"]["rows"]
        for kind, f in rec["findings"].items():
            side = f.get("side")
            for b in f["boxes"].get("frontal", []):
                assert b is not None
                cx, cy = b[0] + b[2] / 2, b[1] + b[3] / 2
                if side in ("left", "right") and kind != "support_devices":
                    assert (cx > W / 2) == (side == "left"), (kind, side, b, W)
                    sided += 1
                if kind == "pleural_effusion":
                    assert cy > 0.5 * H
                if kind == "pneumothorax":
                    assert b[1] < 0.4 * H
            if kind == "fracture":
                assert f["boxes"].get("lateral", []) == []
    assert sided > 5


def _effusion_pair(subtlety: float, severity: int = 2):
    a = Anatomy()
    r = PatientRenderer(a, 256)
    acq = Acquisition(view="PA", noise=0.0)
    eff = {
        "pleural_effusion": {
            "type": "pleural_effusion",
            "severity": severity,
            "side": "left",
            "lobe": None,
            "params": {"height": 1.0, "meniscus": 0.4},
        }
    }
    with_img, boxes = r.render("frontal", eff, acq, subtlety)
    without_img, _ = r.render("frontal", {}, acq, subtlety)
    return with_img.astype(float), without_img.astype(float), boxes["pleural_effusion"][0]


def test_effusion_is_visible_in_its_box_and_scales_with_subtlety():
    w, wo, (x, y, bw, bh) = _effusion_pair(1.0)
    inside = (w[y : y + bh, x : x + bw].mean(), wo[y : y + bh, x : x + bw].mean())
    assert inside[0] - inside[1] > 15, inside  # gray levels, brighter with fluid
    # Outside the box only the faint top of the fluid's hazy edge changes.
    diff = np.abs(w - wo)
    outside = np.ones_like(w, bool)
    outside[y : y + bh, x : x + bw] = False
    assert diff[outside].max() < 0.15 * diff[~outside].max()
    assert diff[outside].sum() < 0.05 * diff[~outside].sum()
    # Lower subtlety: still visible, but less.
    w2, wo2, (x2, y2, bw2, bh2) = _effusion_pair(0.3)
    diff2 = w2[y2 : y2 + bh2, x2 : x2 + bw2].mean() - wo2[y2 : y2 + bh2, x2 : x2 + bw2].mean()
    assert 1.0 < diff2 < inside[0] - inside[1]


def test_every_effusion_in_the_dataset_brightens_its_box(dataset):
    """Each drawn effusion, removed from the same image (same acquisition), darkens its box."""
    out, _, truth = dataset
    diffs = []
    for rec in truth:
        v = rec["views"]["frontal"]
        img, masks = render_view(rec, "frontal")
        # The re-rendered image is the written JPEG up to compression.
        sdir = out / Path(rec["report_path"]).with_suffix("")
        jpg = np.asarray(Image.open(sdir / f"{v['dicom_id']}.jpg"), dtype=float)
        assert np.abs(jpg - img).mean() < 2.0
        for kind, m in masks.items():
            assert m.any(), kind
        if "pleural_effusion" not in rec["findings"]:
            continue
        without = {k: dict(f) for k, f in rec["findings"].items() if k != "pleural_effusion"}
        img_without, _ = render_view({**rec, "findings": without}, "frontal")
        for b in rec["findings"]["pleural_effusion"]["boxes"]["frontal"]:
            x, y, w, h = b
            box = (slice(y, y + h), slice(x, x + w))
            diffs.append(img[box].astype(float).mean() - img_without[box].astype(float).mean())
    assert diffs, "no effusion drawn with this seed"
    assert min(diffs) > 3.0, diffs


def _small_effusion() -> dict:
    return {
        "pleural_effusion": {
            "type": "pleural_effusion",
            "severity": 1,
            "side": "right",
            "lobe": None,
            "params": {"height": 1.0, "meniscus": 0.4},
        }
    }


def test_a_small_effusion_shows_on_the_lateral_view_only():
    """The lateral-only finding: a severity-1 effusion leaves the frontal image unchanged
    and brightens the posterior sulcus of the lateral."""
    r = PatientRenderer(Anatomy(), 256)
    for view, acq in (("frontal", Acquisition(view="PA", noise=0.0)),):
        with_img, boxes = r.render(view, _small_effusion(), acq, 1.0)
        without_img, _ = r.render(view, {}, acq, 1.0)
        assert np.array_equal(with_img, without_img) and "pleural_effusion" not in boxes
    acq = Acquisition(view="LATERAL", noise=0.0)
    with_img, boxes = r.render("lateral", _small_effusion(), acq, 1.0)
    without_img, _ = r.render("lateral", {}, acq, 1.0)
    ((x, y, w, h),) = boxes["pleural_effusion"]
    box = (slice(y, y + h), slice(x, x + w))
    gain = with_img[box].astype(float).mean() - without_img[box].astype(float).mean()
    assert gain > 5.0, gain
    assert x + w / 2 > 0.5 * with_img.shape[1]  # posterior: the image right of a lateral


def test_small_effusions_in_the_dataset_have_lateral_boxes_only(dataset):
    _, _, truth = dataset
    small = [
        r for r in truth
        if r["findings"].get("pleural_effusion", {}).get("severity") == 1
    ]  # fmt: skip
    assert small, "no small effusion with this seed"
    for rec in small:
        boxes = rec["findings"]["pleural_effusion"]["boxes"]
        assert boxes.get("frontal", []) == []
        assert (rec["views"]["lateral"] is not None) == bool(boxes.get("lateral"))
        text = " ".join(s["text"] for s in rec["sentences"])
        if rec["views"]["lateral"] is None:
            assert "lateral view" not in text  # no report cites a view the study lacks


#: how a finding's worsening shows in gray levels: opacities brighten, a pneumothorax darkens.
PROGRESSION_SIGN = {"pleural_effusion": 1, "edema": 1, "consolidation": 1, "pneumothorax": -1}


def test_images_change_with_the_progression_labels(dataset):
    """Re-render each current frontal with one finding set back to the prior's state (same
    patient, same acquisition, everything else equal): stable leaves the image unchanged,
    worsening changes its region in the finding's direction, improving the other way."""
    _, _, truth = dataset
    by_id = {r["study_id"]: r for r in truth}
    seen = {"worsening": 0, "improving": 0, "stable": 0}
    for rec in truth:
        if not rec["progression"]:
            continue
        prior = by_id[rec["prior_study_id"]]
        now, now_masks = render_view(rec, "frontal")
        for name, sign in PROGRESSION_SIGN.items():
            label = rec["progression"][name]
            if label is None:
                continue
            findings = {k: f for k, f in rec["findings"].items() if k != name}
            if name in prior["findings"]:
                findings[name] = prior["findings"][name]
            then, then_masks = render_view({**rec, "findings": findings}, "frontal")
            now_sev = rec["findings"].get(name, {}).get("severity", 0)
            then_sev = prior["findings"].get(name, {}).get("severity", 0)
            if label == "stable":
                assert np.array_equal(now, then), (rec["study_id"], name)
                seen[label] += 1
                continue
            region = now_masks.get(name, np.zeros(now.shape, bool)) | then_masks.get(
                name, np.zeros(now.shape, bool)
            )
            if not region.any():  # lateral-only at both severities (small effusions)
                assert name == "pleural_effusion" and max(now_sev, then_sev) <= 1
                continue
            change = float((now.astype(float) - then.astype(float))[region].mean())
            direction = 1 if label == "worsening" else -1
            assert sign * direction * change > 1.0, (rec["study_id"], name, label, change)
            seen[label] += 1
    assert all(seen.values()), seen


def test_signal_figure_writes_png(tmp_path):
    from vlp.data.phantom.preview import write_signal_figure

    png = write_signal_figure(tmp_path / "signals.png", image_size=96)
    with Image.open(png) as im:
        assert im.size[0] > 600 and im.size[1] > 300


def test_preview_writes_png(dataset, tmp_path):
    out, _, _ = dataset
    png = write_preview(out, tmp_path / "p.png", n_studies=2)
    with Image.open(png) as im:
        assert im.size[0] > 300 and im.size[1] > 300


def test_phantom_shards_are_built_once_per_settings(tmp_path, monkeypatch):
    """``build_phantom_shards`` (the demo's and the benchmarks' phantoms): the same settings
    reuse the folder untouched; another phantom seed, another ``PHANTOM_VERSION`` or a build
    that never recorded its end rebuild it."""
    import json

    import vlp.data.phantom as phantom_package
    from vlp.data.convert.api import ConvertOptions
    from vlp.data.phantom_cache import RECORD, build_phantom_shards

    options = ConvertOptions(image_size=64, priors=1, shard_size=20)
    messages: list[str] = []

    def build(seed: int) -> Path:
        cfg = PhantomConfig(patients=4, seed=seed, image_size=64)
        return build_phantom_shards(tmp_path, cfg, options, log=messages.append)

    def studies(shards: Path) -> set[int]:
        truth = read_truth(tmp_path / "phantom")
        assert {str(r["study_id"]) for r in truth} >= {str(s) for s in _shard_study_ids(shards)}, (
            "every shard sample comes from the phantom tree beside it"
        )
        return {r["study_id"] for r in truth}

    shards = build(seed=5)
    first = studies(shards)
    stamp = {p: p.stat().st_mtime_ns for p in shards.rglob("*.tar")}
    assert stamp and build(seed=5) == shards
    assert {p: p.stat().st_mtime_ns for p in shards.rglob("*.tar")} == stamp
    assert messages[-1].startswith("reusing"), messages

    build(seed=6)
    assert studies(shards).isdisjoint(first), "another seed: the folder is rebuilt"
    assert json.loads((tmp_path / RECORD).read_text())["phantom"]["seed"] == 6

    monkeypatch.setattr(phantom_package, "PHANTOM_VERSION", phantom_package.PHANTOM_VERSION + 1)
    build(seed=6)
    assert not messages[-1].startswith("reusing"), "a new phantom version rebuilds"
    (tmp_path / RECORD).unlink()  # a build interrupted before its end
    build(seed=6)
    assert not messages[-1].startswith("reusing") and (tmp_path / RECORD).is_file()


def _shard_study_ids(shards: Path) -> list[int]:
    """Study ids of every sample in the shards, read with tarfile (not vlp's reader)."""
    import json
    import tarfile

    ids = []
    for tar in sorted(shards.rglob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".json"):
                    ids.append(json.load(archive.extractfile(member))["study_id"])
    return ids
