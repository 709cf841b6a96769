"""Report text: MIMIC-CXR style sectioning, sentence splitting and the training text.

Sectioning follows the behaviour of the official MIMIC-CXR section parser
(Johnson et al., "MIMIC-CXR, a de-identified publicly available database of chest
radiographs with free-text reports", Sci. Data 2019; ``txt/section_parser.py`` of
MIT-LCP/mimic-cxr), re-implemented here:

* a header is an upper-case name after a newline and one space, followed by a colon and
  whitespace (``\\n ([A-Z ()/,-]+):\\s``); text before the first header is ``preamble``;
* header names are lower-cased and normalised (``comparisons`` → ``comparison``,
  ``conclusion`` / ``findings and impression`` / ``findings/impression`` and typos →
  ``impression`` ...);
* the *last* occurrence of a section wins; empty ``findings``/``impression`` are dropped;
* when neither ``findings`` nor ``impression`` exists, the last blank-line separated
  paragraph becomes ``last_paragraph``.

Sentence splitting is a small rule-based splitter written for radiology prose: it joins
line-wrapped text, splits numbered lists (``1. … 2. …``), keeps decimals (``1.5 cm``),
titles and common abbreviations (``Dr.``, ``vs.``, ``approx.``, ``a.m.``) and
de-identification placeholders (MIMIC's ``___``, Open-i's ``XXXX``) inside sentences,
and drops fragments that carry no word (a bare list number, a lone placeholder).

The training text is impression + findings, the choice of Chauhan et al. (MICCAI 2020)
and Med-ST (Yang et al., ICML 2024), with ``last_paragraph`` as the fallback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: A MIMIC-CXR section header (see module docstring).
_HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s")

#: Normalised names for headers that are not already canonical. Keys are lower-cased.
_SECTION_ALIASES: dict[str, str] = {
    # comparison
    "comparisons": "comparison",
    "comparison exam": "comparison",
    "comparison film": "comparison",
    "comparison study": "comparison",
    "comparision": "comparison",
    "comparsion": "comparison",
    "reference exam": "comparison",
    "prior": "comparison",
    "priors": "comparison",
    # impression
    "conclusion": "impression",
    "conclusions": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "findings / impression": "impression",
    "findings/ impression": "impression",
    "impression and findings": "impression",
    "impressions": "impression",
    "impresson": "impression",
    "imprression": "impression",
    "imoression": "impression",
    "impressoin": "impression",
    "imprssion": "impression",
    "impresion": "impression",
    "imperssion": "impression",
    "mpression": "impression",
    "impession": "impression",
    "provisional findings impression": "impression",
    "summary": "impression",
    "opinion": "impression",
    # findings
    "finding": "findings",
    "finidngs": "findings",
    "findins": "findings",
    "findingss": "findings",
    "findng": "findings",
    "findinds": "findings",
    "findigns": "findings",
    "chest, two views": "findings",
    "chest two views": "findings",
    "chest, pa and lateral": "findings",
    "pa and lateral views of the chest": "findings",
    "frontal and lateral views of the chest": "findings",
    "portable chest": "findings",
    "report": "findings",
    # indication / history
    "reason for examination": "indication",
    "reason for exam": "indication",
    "clinical indication": "indication",
    "indications": "indication",
    "ndication": "indication",
    "clinical history": "history",
    "clinical information": "history",
    "patient history": "history",
    "history of present illness": "history",
    "pfi": "history",
    # examination / technique
    "exam": "examination",
    "type of examination": "examination",
    "examinations": "examination",
    "procedure": "examination",
    "techniques": "technique",
    # other
    "recommendation": "recommendations",
    "recommendation(s)": "recommendations",
    "comment": "comments",
    "wetread": "wet read",
    "note": "notification",
}

_IMPRESSION_FINDINGS = ("impression", "findings")


def normalize_section_name(name: str) -> str:
    """Lower-case a header name, collapse whitespace and map aliases to canonical names."""
    key = " ".join(name.lower().split())
    return _SECTION_ALIASES.get(key, key)


def _clean(text: str) -> str:
    return " ".join(text.split())


def sections_from_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Build a sections dict from already-labelled ``(header, text)`` pairs.

    Used for reports that come pre-sectioned (Open-i XML ``AbstractText`` labels).
    Applies the same rules as :func:`parse_sections`: normalised names, last
    occurrence wins, empty findings/impression dropped.
    """
    sections: dict[str, str] = {}
    for name, text in pairs:
        sections[normalize_section_name(name)] = _clean(text or "")
    for name in _IMPRESSION_FINDINGS:
        if name in sections and not sections[name]:
            del sections[name]
    return sections


def parse_sections(text: str) -> dict[str, str]:
    """Split a MIMIC-CXR style report into ``{section name: text}``.

    Section texts have their whitespace collapsed to single spaces. See the module
    docstring for the rules.
    """
    matches = list(_HEADER.finditer(text))
    pairs: list[tuple[str, str]] = []
    if matches:
        pairs.append(("preamble", text[: matches[0].start()]))
        for i, match in enumerate(matches):
            end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
            pairs.append((match.group(1), text[match.end() : end]))
    else:
        pairs.append(("preamble", text))
    sections = sections_from_pairs(pairs)
    if not any(name in sections for name in _IMPRESSION_FINDINGS):
        # The official parser falls back to the last paragraph (split on a blank line).
        paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
        if paragraphs:
            last = _clean(paragraphs[-1])
            if last:
                sections["last_paragraph"] = last
    return sections


def training_text(sections: dict[str, str]) -> str:
    """Impression followed by findings; ``last_paragraph`` when both are absent."""
    parts = [sections[name] for name in _IMPRESSION_FINDINGS if sections.get(name)]
    if not parts and sections.get("last_paragraph"):
        parts = [sections["last_paragraph"]]
    return " ".join(parts)


def training_sentences(sections: dict[str, str]) -> list[str]:
    """Sentences of impression then findings (each split separately), or of the fallback."""
    names = [name for name in _IMPRESSION_FINDINGS if sections.get(name)]
    if not names and sections.get("last_paragraph"):
        names = ["last_paragraph"]
    sentences: list[str] = []
    for name in names:
        sentences.extend(split_sentences(sections[name]))
    return sentences


# --------------------------------------------------------------------------- sentences

#: Words that end with a period but never end a sentence (compared lower-case, no dot).
_NEVER_FINAL = frozenset(
    {"dr", "mr", "mrs", "ms", "prof", "vs", "approx", "e.g", "i.e", "cf", "fig", "st", "ca"}
)
#: Abbreviations that may end a sentence: a boundary only when an upper-case word follows.
_MAYBE_FINAL = frozenset({"a.m", "p.m", "etc", "al", "resp", "incl", "min", "max", "cm", "mm"})
#: De-identification placeholders: MIMIC-CXR ``___`` and Open-i ``XXXX``.
_PLACEHOLDER = re.compile(r"_{2,}|\bX{2,}\b")
#: A candidate list marker: ``1.`` or ``2)`` standing alone before text.
_LIST_MARKER = re.compile(r"(?<!\S)(\d{1,2})[.)](?=\s+\S)")
#: Candidate sentence ends: terminal punctuation (runs allowed) followed by whitespace.
_TERMINAL = re.compile(r"[.!?]+(?=\s)")


def _word_before(text: str, end: int) -> str:
    """The whitespace-delimited token ending at ``end`` (without the final period)."""
    start = end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return text[start:end].strip("([\"'")


def _is_boundary(text: str, dot: int, after: int) -> bool:
    """Whether the terminal punctuation at ``text[dot]`` ends a sentence."""
    if text[dot] != ".":
        return True
    if text[dot - 1 : dot + 1] == "..":  # an ellipsis run ends the sentence
        return True
    raw = _word_before(text, dot)
    word = raw.lower()
    nxt = text[after : after + 1]
    if word in _NEVER_FINAL:
        return False
    if word in _MAYBE_FINAL:
        return nxt.isupper()
    if len(raw) == 1 and raw.isalpha():
        # An upper-case initial ("J. Smith") does not end a sentence; a lower-case
        # letter ends one only before an upper-case word.
        return raw.islower() and nxt.isupper()
    return True


def _list_marker_starts(text: str, original_breaks: set[int]) -> list[tuple[int, int]]:
    """Spans of numbered-list markers that start a new item.

    A marker counts when it opens the text, follows a line break or terminal punctuation
    in the original, or continues the numbering of the previous accepted marker (so
    ``1. No effusion 2. No pneumothorax`` splits while ``size 2. …`` in prose does not).
    """
    accepted: list[tuple[int, int]] = []
    last_number = None
    for match in _LIST_MARKER.finditer(text):
        start = match.start()
        before = text[:start].rstrip()
        number = int(match.group(1))
        opens = (
            not before
            or before[-1] in ".!?:;"
            or start in original_breaks
            or (last_number is not None and number == last_number + 1)
        )
        if opens:
            accepted.append((start, match.end()))
            last_number = number
    return accepted


def _has_word(fragment: str) -> bool:
    """A fragment worth keeping has a word of at least two letters that is no placeholder."""
    stripped = _PLACEHOLDER.sub(" ", fragment)
    return any(sum(ch.isalpha() for ch in token) >= 2 for token in re.findall(r"\w+", stripped))


def split_sentences(text: str) -> list[str]:
    """Split report prose into sentences.

    Line-wrapped text is joined first; numbered-list markers start a new sentence and are
    removed; fragments without a real word (a bare number, ``___.``) are dropped. The
    returned sentences keep their punctuation and have single spaces.
    """
    if not text or not text.strip():
        return []
    # Join wrapped lines, remembering where line breaks were (list items start there).
    joined_chars: list[str] = []
    breaks: set[int] = set()
    pending_break = False
    for ch in text.strip():
        if ch.isspace():
            if ch in "\n\r":
                pending_break = True
            if joined_chars and joined_chars[-1] != " ":
                joined_chars.append(" ")
            continue
        if pending_break:
            breaks.add(len(joined_chars))
            pending_break = False
        joined_chars.append(ch)
    joined = "".join(joined_chars)

    cuts: list[tuple[int, int]] = []  # (end of previous sentence, start of next)
    for start, end in _list_marker_starts(joined, breaks):
        cuts.append((start, end))
    for match in _TERMINAL.finditer(joined):
        after = match.end() + 1  # skip the single space that follows
        if _is_boundary(joined, match.end() - 1, after):
            cuts.append((match.end(), match.end()))
    cuts.sort()

    sentences: list[str] = []
    position = 0
    for end, next_start in cuts:
        if end < position:
            continue
        sentences.append(joined[position:end])
        position = next_start
    sentences.append(joined[position:])
    return [s.strip() for s in sentences if s.strip() and _has_word(s)]
