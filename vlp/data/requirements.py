"""What a component needs from the batch, and the check that the data section provides it.

Encoders and objectives declare a :class:`Requirements` (views, prior time steps, text
kinds, label fields). The recipe loader takes their union and checks it against the
recipe's ``data`` section before anything heavy starts, so a recipe whose objective needs
sentences or laterals that the loader would not produce fails at load time with the
dotted key to change, not with a KeyError at step 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

#: batch fields beyond images and text that a component may need.
LABEL_FIELDS = ("labels", "edema_severity")
TEXT_KINDS = ("report", "sentence")


@dataclass(frozen=True)
class Requirements:
    """Batch contents one component needs."""

    #: image views of the current study (``frontal``, ``lateral``).
    views: frozenset[str] = frozenset()
    #: number of prior studies (time steps before the current one).
    priors: int = 0
    #: text kinds: ``report`` (the tokenised report) and/or ``sentence`` (its sentences).
    text: frozenset[str] = frozenset()
    #: label fields from :data:`LABEL_FIELDS`.
    fields: frozenset[str] = frozenset()

    def __or__(self, other: Requirements) -> Requirements:
        return Requirements(
            views=self.views | other.views,
            priors=max(self.priors, other.priors),
            text=self.text | other.text,
            fields=self.fields | other.fields,
        )

    @staticmethod
    def union(items) -> Requirements:
        total = Requirements()
        for item in items:
            total = total | item
        return total


def unmet(need: Requirements, data, who: str) -> list[tuple[str, str]]:
    """``(dotted data key, message)`` for each need of ``who`` that ``data`` does not meet.

    ``data`` is the recipe's data section (a ``LoaderConfig``). Reports and label fields
    are always in a batch; views, priors and sentences are recipe settings.
    """
    problems = []
    missing = sorted(need.views - set(data.views))
    if missing:
        problems.append(
            (
                "data.views",
                f"{who} needs the view(s) {missing}, but data.views is {list(data.views)}; "
                f"add {missing} to data.views",
            )
        )
    if need.priors > data.priors:
        problems.append(
            (
                "data.priors",
                f"{who} needs {need.priors} prior study(ies), but data.priors is {data.priors}",
            )
        )
    if "sentence" in need.text and not data.sentences:
        problems.append(
            ("data.sentences", f"{who} needs report sentences, but data.sentences is false")
        )
    unknown = sorted(need.fields - set(LABEL_FIELDS))
    if unknown:
        problems.append(("data", f"{who} needs unknown batch field(s) {unknown}"))
    return problems


def narrowed(data, need: Requirements):
    """``data`` (a ``LoaderConfig``) decoding only what ``need`` asks for: the views in
    ``need`` (the frontal always), ``need.priors`` priors, reports and sentences only when
    some component reads them. ``need`` must be met (:func:`unmet` empty)."""
    return dataclasses.replace(
        data,
        views=[v for v in data.views if v == "frontal" or v in need.views],
        priors=min(data.priors, need.priors),
        sentences=data.sentences and "sentence" in need.text,
        reports="report" in need.text,
    )
