"""Adapter for the Indiana University chest X-ray collection (Open-i; Demner-Fushman et al.,
JAMIA 2016).

Inputs:

* ``--reports``: a folder of Open-i XML reports (``ecgen-radiology/*.xml``) or the
  ``NLMCXR_reports.tgz`` archive itself. Sections come from the ``AbstractText``
  ``Label`` attributes (COMPARISON, INDICATION, FINDINGS, IMPRESSION) and are named and
  filtered like MIMIC sections (:func:`vlp.data.reports.sections_from_pairs`).
* ``--images``: the PNG folder. An XML ``parentImage`` id such as
  ``CXR3029_IM-1404-1001`` is matched to a file whose name, without a leading ``CXR``
  and without ``.png``/``.dcm`` extensions, equals the id without its leading ``CXR``;
  this matches both the NLM ``CXR3029_IM-1404-1001.png`` and the Kaggle
  ``3029_IM-1404-1001.dcm.png`` names.
* ``--projections`` (optional): a CSV with ``filename`` and ``projection``
  (``Frontal``/``Lateral``) columns, as in the Kaggle ``indiana_projections.csv``.
  **Without it, the first image of a report is taken as frontal and the second as
  lateral** (the order of the XML), further images are ignored and reported; this is a
  heuristic: Open-i does not guarantee the order.

Each report is one study and one subject (Open-i has no patient ids or dates), so there
are no priors. There is no official split: subjects are assigned by a seeded hash with
``--split-fractions`` (default 0.9, 0.05, 0.05). No labels are read; CheXpert labels are
null. Views are stored as ``FRONTAL``/``LATERAL``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator

from tqdm import tqdm

from vlp.data.convert.records import (
    GENERIC_FRONTAL,
    GENERIC_LATERAL,
    MALFORMED_ROW,
    UNKNOWN_VIEW,
    AdapterOutput,
    ConversionError,
    ImageRef,
    Skip,
    build_record,
    fingerprint_file,
    read_table,
    split_by_hash,
)
from vlp.data.reports import sections_from_pairs
from vlp.data.schema import sample_key

DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)


def normalise_image_id(name: str) -> str:
    """``CXR3029_IM-1404-1001.png`` / ``3029_IM-1404-1001.dcm.png`` → ``3029_IM-1404-1001``."""
    base = os.path.basename(name)
    base = re.sub(r"(\.dcm)?\.(png|jpg|jpeg)$", "", base, flags=re.IGNORECASE)
    base = re.sub(r"\.dcm$", "", base, flags=re.IGNORECASE)
    return re.sub(r"^CXR", "", base)


def iter_reports(reports: str) -> Iterator[tuple[str, bytes]]:
    """``(name, xml bytes)`` for every report, sorted by name, from a folder or a tgz."""
    if os.path.isdir(reports):
        names = sorted(n for n in os.listdir(reports) if n.lower().endswith(".xml"))
        for name in names:
            with open(os.path.join(reports, name), "rb") as handle:
                yield os.path.join(reports, name), handle.read()
        return
    if not os.path.isfile(reports):
        raise ConversionError(
            f"Open-i reports not found: {reports} (a folder of XML files or a .tgz)"
        )
    with tarfile.open(reports, "r:*") as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.isfile() and m.name.lower().endswith(".xml")),
            key=lambda m: m.name,
        )
        for member in members:
            yield f"{reports}!{member.name}", archive.extractfile(member).read()


def parse_report_xml(data: bytes) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Report id, labelled section texts, and parentImage ids (in document order)."""
    root = ET.fromstring(data)
    uid = root.find("uId")
    report_id = uid.get("id") if uid is not None else None
    if not report_id:
        raise ValueError("no <uId id=...>")
    report_id = re.sub(r"^CXR", "", report_id)
    pairs = [(a.get("Label") or "", a.text or "") for a in root.iter("AbstractText")]
    images = [p.get("id") for p in root.iter("parentImage") if p.get("id")]
    return report_id, pairs, images


def _read_projections(path: str, skips: list[Skip], inputs: dict) -> dict[str, str]:
    rows, bad, _ = read_table(path, ["filename", "projection"], "Open-i projection table")
    skips += bad
    inputs["projections"] = fingerprint_file(path)
    views = {}
    for _line, row in rows:
        projection = row["projection"].strip().lower()
        view = {"frontal": GENERIC_FRONTAL, "lateral": GENERIC_LATERAL}.get(
            projection, row["projection"].strip()
        )
        views[normalise_image_id(row["filename"])] = view
    return views


def read_iu(
    reports: str,
    images: str,
    projections: str | None = None,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
) -> AdapterOutput:
    """Read Open-i reports and PNGs into study records (see the module docstring)."""
    if not os.path.isdir(images):
        raise ConversionError(f"Open-i image folder not found: {images}")
    skips: list[Skip] = []
    inputs: dict[str, dict] = {}
    image_index = {
        normalise_image_id(name): os.path.join(images, name)
        for name in sorted(os.listdir(images))
        if name.lower().endswith((".png", ".jpg", ".jpeg"))
    }
    inputs["images"] = {
        "path": os.path.basename(os.path.normpath(images)),
        "files": len(image_index),
    }
    views = _read_projections(projections, skips, inputs) if projections else None

    records = []
    seen = 0
    digest = hashlib.sha256()  # fingerprint of the reports actually read
    report_iter = iter_reports(reports)
    for source, data in tqdm(report_iter, desc="read iu", unit="report", disable=not progress):
        if limit is not None and seen >= limit:
            break
        seen += 1
        digest.update(os.path.basename(source).encode() + b"\0" + data)
        try:
            report_id, pairs, image_ids = parse_report_xml(data)
        except (ET.ParseError, ValueError) as error:
            skips.append(Skip(source, MALFORMED_ROW, f"report XML: {error}"))
            continue
        split = split_by_hash(report_id, seed, split_fractions)
        key = sample_key(report_id, report_id)
        refs = []
        for position, image_id in enumerate(image_ids):
            norm = normalise_image_id(image_id)
            path = image_index.get(norm, os.path.join(images, f"{image_id}.png"))
            if views is not None:
                view = views.get(norm, "")
                if not view:
                    skips.append(
                        Skip(path, UNKNOWN_VIEW, "not in the projection table", key, split, "image")
                    )
                    continue
            elif position < 2:
                view = (GENERIC_FRONTAL, GENERIC_LATERAL)[position]
            else:
                skips.append(
                    Skip(
                        path,
                        "extra image",
                        "no projection table: only two images used",
                        key,
                        split,
                        "image",
                    )
                )
                continue
            refs.append(ImageRef(image_id, path, view))
        sections = sections_from_pairs(pairs)
        report = "\n".join(
            f" {name.upper()}: {text}" for name, text in pairs if (text or "").strip()
        )
        record, bad = build_record(
            report_id, report_id, split, None, refs, report, source, sections=sections
        )
        skips += bad
        if record is not None:
            records.append(record)
    inputs["reports"] = {
        "path": os.path.basename(os.path.normpath(reports)),
        "reports": seen,
        "sha256": digest.hexdigest(),
    }
    return AdapterOutput("iu", records, skips, seen, inputs)
