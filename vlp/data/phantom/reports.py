"""Report text of the phantom: MIMIC-CXR style free text with sentence-level ground truth.

One job: write the report of one study from its findings (and the prior study's), and
record for every sentence which findings it describes and with which polarity.

Language. Each finding has several noun-phrase forms (side, lobe, severity words) placed
in sentence frames for a first description, for a change since the prior study (new,
increased, slightly increased within one grade, decreased, unchanged, resolved), for
hedging ("cannot be excluded", "may represent", "possible") and for negation ("No
pneumothorax.", grouped "No focal consolidation, pleural effusion or pneumothorax.").
Unrelated sentences (notification, recommendation) and numbered impressions occur as in
MIMIC-CXR (Johnson et al., Sci Data 2019).

Labels. Like the CheXpert labeler (Irvin et al., AAAI 2019) labels come from mentions,
with one simplification: every label a sentence mentions takes that sentence's polarity
(1 positive, -1 hedged, 0 negated). A report's label is 1 if any sentence gives 1, else -1
if any gives -1, else 0 if any gives 0, else blank. "No Finding" is 1 when no label other
than Support Devices is 1 or -1. Unlike MIMIC-CXR (impression only) the labels read the
findings and impression sections together; both always agree on each finding.
"""

from __future__ import annotations

import textwrap

import numpy as np

from vlp.data.phantom.findings import level
from vlp.data.schema import CHEXPERT_LABELS

_LOBE_NAMES = {
    "RUL": ["right upper lobe"],
    "RML": ["right middle lobe"],
    "RLL": ["right lower lobe", "right basilar"],
    "LUL": ["left upper lobe"],
    "LLL": ["left lower lobe", "left basilar", "retrocardiac left lower lobe"],
}
_ORDINAL = {3: "fourth", 4: "fifth", 5: "sixth", 6: "seventh", 7: "eighth", 8: "ninth", 9: "tenth"}

#: Base CheXpert label of each finding type.
BASE_LABEL = {
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

# Sentence frames. {np}: noun phrase, {a}: its article ("a " or ""), {is}/{has}: verb
# agreement, {core}: the finding without severity, {sev}: severity word.
_PRESENT = [
    "{np}.",
    "There {is} {a}{np}.",
    "{a}{np} {is} present.",
    "{a}{np} {is} seen.",
    "{a}{np} {is} noted.",
    "Findings are consistent with {a}{np}.",
]
_NEW = [
    "New {np}.",
    "{a}{np} {is} new since the prior study.",
    "Interval development of {a}{np}.",
    "Since ___, {a}{np} {has} developed.",
    "There {is} {a}new {np}.",
]
_WORSE = [
    "{np} {has} increased since ___.",
    "Worsening {np}.",
    "{np}, increased compared to ___.",
    "Interval increase in {core}, now {sev}.",
    "{np}, larger than on the prior study.",
]
_BETTER = [
    "{np} {has} decreased since ___.",
    "Improving {np}.",
    "{np}, decreased compared to ___.",
    "Interval decrease in {core}, now {sev}.",
    "{np}, smaller than on the prior study.",
]
_STABLE = [
    "Unchanged {np}.",
    "Stable {np}.",
    "{np} {is} unchanged.",
    "{np}, similar to ___.",
    "{np} {is} again seen.",
]
#: A change within one grade (the continuous level moved, the grade word did not).
_SLIGHTLY_WORSE = [
    "{np} {has} slightly increased since ___.",
    "Slight interval increase in {core}, still {sev}.",
    "{np}, minimally larger than on the prior study.",
    "Mildly worsening {np}.",
]
_SLIGHTLY_BETTER = [
    "{np} {has} slightly decreased since ___.",
    "Slight interval decrease in {core}, still {sev}.",
    "{np}, minimally smaller than on the prior study.",
    "Mildly improving {np}.",
]
_RESOLVED = [
    "Interval resolution of the previously seen {core}.",
    "The previously seen {core} {has} resolved.",
    "Previously noted {core} {is} no longer seen.",
    "No residual {bare}.",
]
_HEDGED = [
    "Possible {np}.",
    "{a}{np} cannot be excluded.",
    "There may be {a}{np}.",
    "Questionable {np}.",
    "Findings may represent {a}{np}.",
]
_STATUS_FRAMES = {
    "present": _PRESENT,
    "new": _NEW,
    "worsening": _WORSE,
    "improving": _BETTER,
    "stable": _STABLE,
}

#: Negations of absent findings: (text, labels it negates).
_NEGATIONS = {
    "pleural_effusion": [
        ("No pleural effusion.", ["Pleural Effusion"]),
        ("There is no pleural effusion.", ["Pleural Effusion"]),
        ("No pleural effusions.", ["Pleural Effusion"]),
        ("No evidence of pleural effusion.", ["Pleural Effusion"]),
    ],
    "pneumothorax": [
        ("No pneumothorax.", ["Pneumothorax"]),
        ("There is no pneumothorax.", ["Pneumothorax"]),
        ("No evidence of pneumothorax.", ["Pneumothorax"]),
        ("No pneumothorax is seen.", ["Pneumothorax"]),
    ],
    "consolidation": [
        ("No focal consolidation.", ["Consolidation"]),
        ("There is no focal airspace consolidation.", ["Consolidation"]),
        ("No evidence of pneumonia.", ["Pneumonia"]),
        ("No consolidation concerning for pneumonia is seen.", None),  # replaced below
    ],
    "cardiomegaly": [
        ("Heart size is normal.", ["Cardiomegaly"]),
        ("The heart is normal in size.", ["Cardiomegaly"]),
        ("No cardiomegaly.", ["Cardiomegaly"]),
        ("The cardiac silhouette is within normal limits.", ["Cardiomegaly"]),
        (
            "Heart size and mediastinal contours are normal.",
            ["Cardiomegaly", "Enlarged Cardiomediastinum"],
        ),
        ("Normal cardiomediastinal silhouette.", ["Enlarged Cardiomediastinum"]),
    ],
    "edema": [
        ("No pulmonary edema.", ["Edema"]),
        ("There is no pulmonary edema.", ["Edema"]),
        ("No evidence of pulmonary vascular congestion or edema.", ["Edema"]),
        ("No edema.", ["Edema"]),
    ],
    "nodule": [
        ("No suspicious pulmonary nodules.", ["Lung Lesion"]),
        ("No focal mass or nodule.", ["Lung Lesion"]),
    ],
    "atelectasis": [("No atelectasis.", ["Atelectasis"])],
    "fracture": [
        ("No displaced rib fracture.", ["Fracture"]),
        ("No acute rib fracture is identified.", ["Fracture"]),
    ],
}
# "concerning for" would be hedged language; keep negations unambiguous.
_NEGATIONS["consolidation"][3] = (
    "No focal consolidation or pneumonia.",
    ["Consolidation", "Pneumonia"],
)

_NEGATE_PROB = {
    "pleural_effusion": 0.65,
    "pneumothorax": 0.65,
    "consolidation": 0.6,
    "cardiomegaly": 0.55,
    "edema": 0.4,
    "nodule": 0.08,
    "atelectasis": 0.05,
    "fracture": 0.1,
}
_GROUP = {
    ("consolidation", "pleural_effusion", "pneumothorax"): [
        "No focal consolidation, pleural effusion or pneumothorax.",
        "There is no focal consolidation, pleural effusion, or pneumothorax.",
        "The lungs are clear without consolidation, effusion or pneumothorax.",
    ],
    ("pleural_effusion", "pneumothorax"): [
        "No pleural effusion or pneumothorax.",
        "There is no pleural effusion or pneumothorax.",
    ],
    ("consolidation", "pleural_effusion"): [
        "No focal consolidation or pleural effusion.",
        "The lungs are clear without focal consolidation or effusion.",
    ],
    ("consolidation", "pneumothorax"): ["No focal consolidation or pneumothorax."],
}
_GROUP_LABELS = {
    "consolidation": "Consolidation",
    "pleural_effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
}
_NORMAL_IMPRESSION = [
    "No acute cardiopulmonary process.",
    "No acute intrathoracic abnormality.",
    "Normal chest radiograph.",
    "No acute cardiopulmonary abnormality.",
]
_UNRELATED = [
    "Dr. ___ was notified of the findings by telephone at ___ on ___.",
    "Findings were discussed with Dr. ___ by phone at ___.",
    "These findings were communicated to the referring clinician at ___.",
    "Comparison is limited by differences in technique.",
]
_INDICATIONS = [
    "___M with shortness of breath",
    "___F with cough and fever.  Evaluate for pneumonia",
    "___-year-old man with chest pain",
    "___-year-old woman with dyspnea  // eval for acute process",
    "___M with hypoxia, assess for edema",
    "___F with history of CHF, now with worsening dyspnea",
    "History: ___M with fall, rib pain",
    "___F preoperative evaluation",
    "___M with fever  // r/o pneumonia",
    "___-year-old woman status post line placement",
]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _phrase(rng, f: dict) -> dict:
    """Noun-phrase slots of one present finding."""
    kind, sev, side = f["type"], f["severity"], f["side"]
    plural = False
    article = "a "
    if kind == "pleural_effusion":
        word = _pick(
            rng,
            {
                1: ["small", "small", "trace"],
                2: ["moderate", "moderate-sized"],
                3: ["large", "large-volume"],
            }[sev],
        )
        plural = side == "bilateral"
        eff = "effusions" if plural else "effusion"
        forms = [f"{word} {side} pleural {eff}", f"{word} {side} {eff}"]
        if not plural:
            forms.append(f"{word} {side}-sided pleural effusion")
        core = f"{side} pleural {eff}"
        special = {
            # A small effusion is drawn on the lateral view only (findings.py).
            1: [
                f"Blunting of the posterior costophrenic sulcus on the lateral view is "
                f"consistent with a small {side} pleural {eff}, not seen on the frontal view."
            ],
            3: [
                f"{_cap(word)} {side} pleural {eff} obscuring the "
                f"{'hemidiaphragms' if plural else side + ' hemidiaphragm'}."
            ],
        }.get(sev, [])
        sev_word = word
    elif kind == "cardiomegaly":
        word = _pick(rng, {1: ["mild"], 2: ["moderate"], 3: ["severe", "marked"]}[sev])
        adverb = {
            "mild": "mildly",
            "moderate": "moderately",
            "severe": "severely",
            "marked": "markedly",
        }[word]
        forms = [f"{word} cardiomegaly", f"{word} enlargement of the cardiac silhouette"]
        article = ""
        core = "cardiomegaly"
        special = [
            f"The heart is {adverb} enlarged.",
            f"Heart size is {adverb} enlarged.",
            f"The cardiac silhouette is {adverb} enlarged.",
        ]
        sev_word = word
    elif kind == "edema":
        forms = {
            1: [
                "mild pulmonary vascular congestion",
                "pulmonary vascular engorgement",
                "mild vascular congestion",
            ],
            2: [
                "moderate interstitial pulmonary edema",
                "interstitial edema",
                "moderate pulmonary edema",
            ],
            3: ["severe pulmonary edema", "alveolar pulmonary edema", "severe alveolar edema"],
        }[sev]
        article = ""
        core = "vascular congestion" if sev == 1 else "pulmonary edema"
        special = {
            1: ["Prominence of the hila and upper lobe vessels reflects mild vascular congestion."],
            2: ["Kerley B lines and peribronchial cuffing indicate interstitial edema."],
            3: ["Bilateral perihilar airspace opacities are consistent with alveolar edema."],
        }[sev]
        sev_word = {1: "mild", 2: "moderate", 3: "severe"}[sev]
    elif kind in ("consolidation", "atelectasis", "nodule"):
        lobe = _pick(rng, _LOBE_NAMES[f["lobe"]])
        full = _LOBE_NAMES[f["lobe"]][0]
        if kind == "consolidation" and f["params"].get("infectious"):
            word = {1: "patchy", 2: "focal", 3: "dense"}[sev]
            forms = [
                f"{full} pneumonia",
                f"{word} {full} pneumonia",
                f"{word} consolidation in the {full} consistent with pneumonia",
            ]
            article = ""
            core = f"{full} pneumonia"
            special = [
                f"{_cap(word)} airspace consolidation in the {full} is consistent with pneumonia."
            ]
            sev_word = word
        elif kind == "consolidation":
            word = _pick(
                rng, {1: ["patchy"], 2: ["focal", "moderate"], 3: ["dense", "extensive"]}[sev]
            )
            forms = [
                f"{word} {lobe} consolidation",
                f"{word} consolidation in the {full}",
                f"{word} airspace consolidation in the {full}",
            ]
            article = ""
            core = f"{full} consolidation"
            special = [
                f"{_cap(word)} opacification of the {full}.",
                f"There is a {word} {lobe} airspace opacity.",
            ]
            sev_word = word
        elif kind == "atelectasis":
            word = _pick(
                rng,
                {
                    1: ["minimal", "linear", "subsegmental"],
                    2: ["plate-like", "discoid", "moderate"],
                }[sev],
            )
            base = {"RLL": "right lung base", "LLL": "left lung base", "RML": "right middle lobe"}[
                f["lobe"]
            ]
            forms = [
                f"{word} atelectasis at the {base}",
                f"{word} {lobe} atelectasis",
                f"{word} atelectasis in the {full}",
            ]
            article = ""
            core = f"{full} atelectasis"
            special = [f"Linear opacity at the {base} is consistent with {word} atelectasis."]
            sev_word = word
        else:
            mm = f["params"]["size_mm"]
            if sev == 1:
                forms = [
                    f"{mm} mm nodule in the {full}",
                    f"{mm} mm {full} nodule",
                    f"{full} pulmonary nodule measuring {mm} mm",
                ]
                core = f"{full} nodule"
                special = [
                    f"A rounded {mm} mm opacity in the {full} represents a pulmonary nodule."
                ]
            else:
                cm = f"{mm / 10:.1f}"
                forms = [f"{cm} cm {full} mass", f"mass in the {full} measuring {cm} cm"]
                core = f"{full} mass"
                special = [f"A {cm} cm mass projects over the {full}."]
            sev_word = f"{mm} mm"
    elif kind == "pneumothorax":
        word = _pick(
            rng, {1: ["small", "tiny"], 2: ["moderate", "moderate-sized"], 3: ["large"]}[sev]
        )
        forms = [
            f"{word} {side} pneumothorax",
            f"{word} {side} apical pneumothorax",
            f"{word} {side}-sided pneumothorax",
        ]
        core = f"{side} pneumothorax"
        special = [
            f"A {word} {side} apical pneumothorax is present, with the visceral pleural "
            "line visible at the apex."
        ]
        sev_word = word
    elif kind == "fracture":
        nth = _ORDINAL.get(f["params"]["rib"] + 1, "sixth")
        age = _pick(rng, ["healing", "acute", "nondisplaced", "subacute"])
        forms = [
            f"{age} {side} {nth} rib fracture",
            f"{age} fracture of the {side} {nth} rib",
            f"{age} fracture of the {side} lateral {nth} rib",
        ]
        core = f"{side} {nth} rib fracture"
        special = [
            f"Cortical discontinuity of the {side} {nth} rib is consistent with "
            f"{'an' if age[0] in 'aeiou' else 'a'} {age} fracture."
        ]
        sev_word = age
        article = "an " if age[0] in "aeiou" else "a "
    else:  # support devices are described device by device, see _device_sentences
        raise ValueError(kind)
    return {
        "forms": forms,
        "article": "" if plural else article,
        "is": "are" if plural else "is",
        "has": "have" if plural else "has",
        "core": core,
        "sev": sev_word,
        "special": special,
    }


def _fill(frame: str, slots: dict, np_text: str) -> str:
    text = frame.format(
        np=np_text,
        a=slots["article"],
        core=("the " if slots["article"] else "") + slots["core"],
        bare=slots["core"],
        sev=slots["sev"],
        **{"is": slots["is"], "has": slots["has"]},
    )
    # "a " before a vowel, no doubled articles, capitalised start.
    text = text.replace("a new ", "a new ").replace(" a a", " an a").replace(" a e", " an e")
    text = text.replace(" a i", " an i").replace(" a o", " an o").replace(" a u", " an u")
    if text.startswith("a ") and text[2:3] in "aeiou":
        text = "an " + text[2:]
    return _cap(text)


def _labels_for(kind: str, f: dict, text: str, polarity: int) -> dict[str, int]:
    """Labels a sentence about finding ``f`` mentions, all with the sentence's polarity."""
    low = text.lower()
    names = set()
    if kind == "consolidation":
        if "consolidation" in low:
            names.add("Consolidation")
        if "pneumonia" in low:
            names.add("Pneumonia")
    else:
        names.add(BASE_LABEL[kind])
    if "opacit" in low:
        names.add("Lung Opacity")
    return {n: polarity for n in names}


def _device_sentences(rng, f: dict) -> list[tuple[str, int]]:
    """One sentence per device: (text, index of the device's box)."""
    out = []
    p = f["params"]
    for i, dev in enumerate(p["devices"]):
        if dev == "ett":
            cm = int(round(p["ett_tip"] * 25))
            text = _pick(
                rng,
                [
                    f"Endotracheal tube terminates {cm} cm above the carina.",
                    "The endotracheal tube is in standard position.",
                    f"ET tube tip is {cm} cm above the carina.",
                    f"An endotracheal tube is in place, ending {cm} cm from the carina.",
                ],
            )
        elif dev == "central_line":
            if p["line_side"] == "right":
                text = _pick(
                    rng,
                    [
                        "Right internal jugular central venous catheter terminates in the mid SVC.",
                        "Right IJ central line tip is in the lower SVC.",
                        "A right internal jugular catheter ends at the cavoatrial junction.",
                    ],
                )
            else:
                text = _pick(
                    rng,
                    [
                        "Left subclavian central line ends in the SVC.",
                        "Left-sided central venous catheter tip projects over the SVC.",
                        "A left subclavian catheter terminates in the mid SVC.",
                    ],
                )
        else:
            text = _pick(
                rng,
                [
                    "Left-sided pacemaker with leads in the right atrium and right ventricle.",
                    "Dual-chamber pacemaker leads are in standard position.",
                    "A left chest wall pacing device is present with leads in the right heart.",
                    "Left pectoral pacemaker generator with two leads in expected position.",
                ],
            )
        out.append((text, i))
    return out


def status_of(now: dict | None, before: dict | None, has_prior: bool) -> str:
    """present | new | worsening | improving | stable | resolved | absent."""
    if now is None:
        return "resolved" if before is not None else "absent"
    if not has_prior:
        return "present"
    if before is None:
        return "new"
    if level(now) > level(before):
        return "worsening"
    if level(now) < level(before):
        return "improving"
    return "stable"


_ORDER = (
    "support_devices",
    "consolidation",
    "edema",
    "nodule",
    "atelectasis",
    "pleural_effusion",
    "pneumothorax",
    "cardiomegaly",
    "fracture",
)


def write_report(
    rng: np.random.Generator,
    findings: dict,
    prior: dict | None,
    has_prior: bool,
    views: tuple[str, ...],
) -> dict:
    """Compose one report.

    Returns ``{"text", "sentences": [{section, text, finding, polarity, labels,
    box_index}], "chexpert": {label: 1|0|-1|None}, "hedged": {type: bool}}``.
    ``finding`` is the finding type a sentence describes (None for negations of absent
    findings and unrelated sentences); ``box_index`` names one box of that finding (a
    device), or None for all its boxes.
    """
    prior = prior or {}
    hedged = {
        k: bool(rng.uniform() < (0.18 if f["severity"] == 1 else 0.06))
        for k, f in findings.items()
        if k not in ("support_devices", "cardiomegaly")
    }
    body: list[dict] = []
    impression: list[dict] = []

    def sentence(text, kind, polarity, labels, box_index=None):
        return {
            "text": text,
            "finding": kind,
            "polarity": polarity,
            "labels": labels,
            "box_index": box_index,
        }

    resolved: set[str] = set()
    order = list(_ORDER)
    if rng.uniform() < 0.3:  # radiologists vary the order
        i, j = sorted(rng.choice(len(order), 2, replace=False))
        order[i], order[j] = order[j], order[i]
    for kind in order:
        f = findings.get(kind)
        if f is None:
            st = status_of(None, prior.get(kind), has_prior)
            if st == "resolved" and kind != "support_devices" and rng.uniform() < 0.7:
                slots = _phrase(rng, prior[kind])
                text = _fill(_pick(rng, _RESOLVED), slots, slots["forms"][0])
                labels = _labels_for(kind, prior[kind], text, 0)
                body.append(sentence(text, None, 0, labels))
                resolved.add(kind)
            continue
        if kind == "support_devices":
            for text, i in _device_sentences(rng, f):
                body.append(sentence(text, kind, 1, {"Support Devices": 1}, i))
            continue
        slots = _phrase(rng, f)
        if len(views) == 1:  # no lateral view to have seen a sign on
            slots["special"] = [t for t in slots["special"] if "lateral view" not in t]
        st = status_of(f, prior.get(kind), has_prior)
        pol = -1 if hedged.get(kind) else 1
        for section in ("findings", "impression"):
            np_text = _pick(rng, slots["forms"])
            if pol == -1:
                frame = _pick(rng, _HEDGED)
                text = _fill(frame, slots, np_text)
            elif st == "present" and slots["special"] and rng.uniform() < 0.35:
                text = _pick(rng, slots["special"])
            else:
                frames = _STATUS_FRAMES[st]
                if section == "impression" and st == "present":
                    frames = ["{np}."]
                elif st in ("worsening", "improving") and (
                    f["severity"] == prior[kind]["severity"]
                ):
                    frames = _SLIGHTLY_WORSE if st == "worsening" else _SLIGHTLY_BETTER
                text = _fill(_pick(rng, frames), slots, np_text)
            s = sentence(text, kind, pol, _labels_for(kind, f, text, pol))
            (body if section == "findings" else impression).append(s)

    # Negations of absent findings, partly grouped.
    absent = [k for k in _NEGATE_PROB if k not in findings and k not in resolved]
    negate = [k for k in absent if rng.uniform() < _NEGATE_PROB[k]]
    group = tuple(k for k in ("consolidation", "pleural_effusion", "pneumothorax") if k in negate)
    negations = []
    if len(group) >= 2 and rng.uniform() < 0.7:
        text = _pick(rng, _GROUP[group])
        negations.append(sentence(text, None, 0, {_GROUP_LABELS[k]: 0 for k in group}))
        negate = [k for k in negate if k not in group]
    for k in negate:
        text, labels = _pick(rng, _NEGATIONS[k])
        negations.append(sentence(text, None, 0, {n: 0 for n in labels}))
    body.extend(negations)

    if not impression:
        impression.append(sentence(_pick(rng, _NORMAL_IMPRESSION), None, 0, {}))
    elif negations and rng.uniform() < 0.3:
        impression.append(dict(negations[0]))
    if "consolidation" in findings and rng.uniform() < 0.3:
        impression.append(
            sentence(
                "Recommend follow-up radiographs after treatment to document resolution.",
                None,
                0,
                {},
            )
        )
    if "nodule" in findings and rng.uniform() < 0.6:
        impression.append(sentence("Recommend chest CT for further characterization.", None, 0, {}))
    if rng.uniform() < 0.12:
        impression.append(sentence(_pick(rng, _UNRELATED), None, 0, {}))

    only_impression = rng.uniform() < 0.1
    numbered = len(impression) > 1 and rng.uniform() < 0.3
    sentences = []
    if not only_impression:
        sentences += [{**s, "section": "findings"} for s in body]
    sentences += [{**s, "section": "impression"} for s in impression]
    if only_impression:  # the body's sentences move into the impression
        sentences += [{**s, "section": "impression"} for s in body]

    text = _layout(rng, sentences, views, has_prior, numbered, only_impression)
    return {
        "text": text,
        "sentences": sentences,
        "chexpert": aggregate_labels(sentences),
        "hedged": hedged,
    }


def aggregate_labels(sentences: list[dict]) -> dict[str, int | None]:
    """Report-level CheXpert labels from sentence labels (see module docstring)."""
    out: dict[str, int | None] = {name: None for name in CHEXPERT_LABELS}
    for s in sentences:
        for name, v in s["labels"].items():
            cur = out[name]
            if cur is None or (v == 1) or (v == -1 and cur == 0):
                out[name] = v
    sick = any(
        out[n] in (1, -1) for n in CHEXPERT_LABELS if n not in ("No Finding", "Support Devices")
    )
    out["No Finding"] = None if sick else 1
    return out


def _wrap(text: str) -> list[str]:
    return [" " + line for line in textwrap.wrap(text, width=76)] or [" "]


def exam_name(views: tuple[str, ...]) -> str:
    """MIMIC-style examination name, e.g. ``CHEST (PA AND LAT)``."""
    if views[0] == "AP":
        return "CHEST (AP AND LAT)" if len(views) > 1 else "CHEST (PORTABLE AP)"
    return "CHEST (PA AND LAT)" if len(views) > 1 else "CHEST (PA)"


def _layout(rng, sentences, views, has_prior, numbered, only_impression) -> str:
    frontal = views[0]
    lateral = len(views) > 1
    exam = exam_name(views)
    if frontal == "AP" and not lateral:
        technique = _pick(
            rng,
            [
                "Portable AP chest radiograph.",
                "Single frontal view of the chest.",
                "Portable semi-upright AP view of the chest.",
            ],
        )
    elif frontal == "AP":
        technique = "AP and lateral views of the chest."
    elif lateral:
        technique = _pick(
            rng,
            [
                "Chest PA and lateral",
                "PA and lateral views of the chest.",
                "Chest, PA and lateral radiographs.",
            ],
        )
    else:
        technique = "Single PA view of the chest."
    comparison = (
        _pick(rng, ["___.", "Chest radiograph ___.", "Prior study from ___."])
        if has_prior
        else _pick(rng, ["None.", "None."])
    )
    lines = [
        " " * 33 + "FINAL REPORT",
        f" EXAMINATION:  {exam}",
        " ",
        f" INDICATION:  {_pick(rng, _INDICATIONS)}",
        " ",
        f" TECHNIQUE:  {technique}",
        " ",
        f" COMPARISON:  {comparison}",
        " ",
    ]
    body = [s["text"] for s in sentences if s["section"] == "findings"]
    imp = [s["text"] for s in sentences if s["section"] == "impression"]
    if body and not only_impression:
        lines += [" FINDINGS: ", " "] + _wrap(" ".join(body)) + [" "]
    lines += [" IMPRESSION: ", " "]
    if numbered:
        for i, t in enumerate(imp, 1):
            lines += _wrap(f"{i}. {t}")
    else:
        lines += _wrap(" ".join(imp))
    return "\n".join(lines) + "\n"
