"""Tests of report sectioning and sentence splitting (``vlp.data.reports``).

Hand-checked cases plus every report of the Open-i IU X-ray collection shipped (as
``data/NLMCXR_reports.tgz``) in the torchxrayvision wheel; the data is read in place and
never copied into the repository.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tarfile
import xml.etree.ElementTree as ET

import pytest

from vlp.data.reports import (
    normalize_section_name,
    parse_sections,
    sections_from_pairs,
    split_sentences,
    training_sentences,
    training_text,
)

MIMIC_STYLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset of
 shortness of breath.

 COMPARISONS:  ___.

 FINDINGS:

 PA and lateral views of the chest.  There is a 1.5 cm nodule in the right
 upper lobe.  No pleural effusion.

 IMPRESSION:

 1. Right upper lobe nodule, approx. 1.5 cm.
 2. No acute process.
"""


def test_parse_sections_mimic_layout():
    sections = parse_sections(MIMIC_STYLE)
    assert sections == {
        "preamble": "FINAL REPORT",
        "examination": "CHEST (PA AND LAT)",
        "indication": "___F with new onset of shortness of breath.",
        "comparison": "___.",
        "findings": "PA and lateral views of the chest. There is a 1.5 cm nodule in the right "
        "upper lobe. No pleural effusion.",
        "impression": "1. Right upper lobe nodule, approx. 1.5 cm. 2. No acute process.",
    }


def test_header_normalisation_and_last_occurrence_wins():
    text = "Preamble text\n CONCLUSION: first\n FINDINGS AND IMPRESSION: second one\n"
    assert parse_sections(text)["impression"] == "second one"
    assert normalize_section_name("Findings/Impression") == "impression"
    assert normalize_section_name("COMPARISONS") == "comparison"
    assert normalize_section_name("  Clinical   History ") == "history"
    assert normalize_section_name("TECHNIQUE") == "technique"


def test_headers_need_newline_and_space():
    # "FINDINGS:" at a line start without the leading space is not a MIMIC header.
    sections = parse_sections("intro\nFINDINGS: x")
    assert "findings" not in sections and sections["preamble"] == "intro FINDINGS: x"


def test_empty_sections_dropped_and_last_paragraph_fallback():
    text = "\n FINDINGS: \n IMPRESSION:\n \n"
    sections = parse_sections(text)
    assert "findings" not in sections and "impression" not in sections
    text = "WET READ: abc\n\n PORTABLE AP:\n The lungs are clear.\n\n Heart size normal.\n"
    sections = parse_sections(text)
    assert sections["last_paragraph"] == "Heart size normal."
    assert training_text(sections) == "Heart size normal."
    # With findings present there is no fallback.
    assert "last_paragraph" not in parse_sections("x\n FINDINGS: a.\n\n b.")


def test_training_text_is_impression_then_findings():
    sections = parse_sections(MIMIC_STYLE)
    assert training_text(sections) == sections["impression"] + " " + sections["findings"]
    assert training_sentences(sections) == [
        "Right upper lobe nodule, approx. 1.5 cm.",
        "No acute process.",
        "PA and lateral views of the chest.",
        "There is a 1.5 cm nodule in the right upper lobe.",
        "No pleural effusion.",
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1. No effusion. 2. No pneumothorax.", ["No effusion.", "No pneumothorax."]),
        ("1. Mild cardiomegaly 2. Small effusion", ["Mild cardiomegaly", "Small effusion"]),
        ("1) Clear lungs.\n2) Normal heart", ["Clear lungs.", "Normal heart"]),
        ("Nodule measures 1.5 cm. Stable.", ["Nodule measures 1.5 cm.", "Stable."]),
        (
            "Dr. ___ was paged at 8:30 a.m. on ___. Findings were discussed.",
            ["Dr. ___ was paged at 8:30 a.m. on ___.", "Findings were discussed."],
        ),
        (
            "Atelectasis vs. pneumonia. Approx. 3 mm nodule.",
            ["Atelectasis vs. pneumonia.", "Approx. 3 mm nodule."],
        ),
        (
            "The lungs are\n clear.  The heart\n is normal.  ",
            ["The lungs are clear.", "The heart is normal."],
        ),
        ("Compared to ___.  ___.  No change.", ["Compared to ___.", "No change."]),
        ("Normal.", ["Normal."]),
        ("XXXX are normal. XXXX. Lungs clear", ["XXXX are normal.", "Lungs clear"]),
        (
            "Tubes, lines etc. are unchanged. Is there effusion? No.",
            ["Tubes, lines etc. are unchanged.", "Is there effusion?", "No."],
        ),
        ("A size of 2. The heart", ["A size of 2.", "The heart"]),
        ("", []),
        ("   \n ", []),
    ],
)
def test_split_sentences_cases(text, expected):
    assert split_sentences(text) == expected


def test_sentences_have_no_list_markers_or_double_spaces():
    for sentence in split_sentences("1. A b.\n 2. C  d.\n 3.  E f"):
        assert not re.match(r"^\d+[.)]", sentence) and "  " not in sentence


def test_sections_from_pairs_matches_parse_sections():
    pairs = [("COMPARISON", "None."), ("FINDINGS", " Clear\n lungs. "), ("IMPRESSION", "")]
    assert sections_from_pairs(pairs) == {"comparison": "None.", "findings": "Clear lungs."}
    text = "".join(f"\n {name}: {value}" for name, value in pairs)
    assert {
        k: v for k, v in parse_sections(text).items() if k != "preamble"
    } == sections_from_pairs(pairs)


def _nlmcxr_tgz():
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "data", "NLMCXR_reports.tgz")
    return path if os.path.isfile(path) else None


NLMCXR = _nlmcxr_tgz()


def _letters(text: str) -> str:
    return re.sub(r"[^A-Za-z]", "", text.replace("XXXX", ""))


@pytest.mark.skipif(
    NLMCXR is None,
    reason="torchxrayvision (pip install --no-deps torchxrayvision) with data/NLMCXR_reports.tgz "
    "is not installed",
)
def test_every_real_iu_report_with_text_yields_sentences():
    # Hand-split impressions of two real reports with numbered lists and placeholders.
    hand_checked = {
        "ecgen-radiology/101.xml": [
            "Mild stable cardiomegaly and central vascular congestion.",
            "Low lung volumes with elevated left hemidiaphragm and basilar subsegmental "
            "atelectasis.",
            "Extensive bilateral shoulder degenerative changes with subluxation/dislocation left "
            "shoulder, possibly chronic.",
            "Suggest clinical correlation.",
        ],
        "ecgen-radiology/1003.xml": [
            "Retrocardiac soft tissue density.",
            "The appearance suggests hiatal hernia.",
            "XXXX left base bandlike opacity.",
            "The appearance suggests atelectasis.",
        ],
    }
    checked = 0
    with tarfile.open(NLMCXR) as archive:
        for member in archive.getmembers():
            if not member.name.endswith(".xml"):
                continue
            root = ET.fromstring(archive.extractfile(member).read())
            pairs = [(a.get("Label"), a.text or "") for a in root.iter("AbstractText")]
            sections = sections_from_pairs(pairs)
            if not (sections.get("findings") or sections.get("impression")):
                continue
            checked += 1
            sentences = training_sentences(sections)
            if member.name in hand_checked:
                assert split_sentences(sections["impression"]) == hand_checked.pop(member.name)
            assert sentences, member.name
            for sentence in sentences:
                # No fragment is a bare list marker, placeholder or number.
                assert re.search(r"[A-Za-z]{2}", re.sub(r"XXXX", "", sentence)), (
                    member.name,
                    sentence,
                )
                assert sentence == sentence.strip() and "  " not in sentence
            # Words survive the split: only list markers, placeholders and stray single
            # letters (e.g. "XXXX p.m. XXXX.") may be dropped.
            lost = len(_letters(training_text(sections))) - len(_letters(" ".join(sentences)))
            assert 0 <= lost <= 2, (member.name, sentences)
    assert checked > 3800 and not hand_checked
