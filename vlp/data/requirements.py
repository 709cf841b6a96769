"""What a component needs from the batch, and the check that the data section provides it.

Encoders and objectives declare a :class:`Requirements` (views and text kinds of the
current study and of its priors, how many priors, label fields). The recipe loader takes their union and checks it against the
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

    #: image views of the current study (``frontal``, ``lateral``; time step 0).
    views: frozenset[str] = frozenset()
    #: number of prior studies (time steps 1..priors before the current one).
    priors: int = 0
    #: image views read at the prior time steps.
    prior_views: frozenset[str] = frozenset()
    #: text kinds of the current study: ``report`` (the tokenised report) and/or
    #: ``sentence`` (its sentences).
    text: frozenset[str] = frozenset()
    #: text kinds read at the prior time steps.
    prior_text: frozenset[str] = frozenset()
    #: label fields from :data:`LABEL_FIELDS`.
    fields: frozenset[str] = frozenset()

    def __or__(self, other: Requirements) -> Requirements:
        return Requirements(
            views=self.views | other.views,
            priors=max(self.priors, other.priors),
            prior_views=self.prior_views | other.prior_views,
            text=self.text | other.text,
            prior_text=self.prior_text | other.prior_text,
            fields=self.fields | other.fields,
        )

    @staticmethod
    def union(items) -> Requirements:
        total = Requirements()
        for item in items:
            total = total | item
        return total


def beyond_generic(need: Requirements) -> list[str]:
    """What ``need`` reads that a generic image–text sample (one frontal image and its
    text, :mod:`vlp.data.decode`) cannot give: other views, priors, label fields."""
    wants = []
    views = sorted(need.views - {"frontal"})
    if views:
        wants.append(f"the view(s) {views}")
    if need.priors:
        wants.append(f"{need.priors} prior study(ies)")
    if need.fields:
        wants.append(f"the label field(s) {sorted(need.fields)}")
    return wants


def unmet(need: Requirements, data, who: str) -> list[tuple[str, str]]:
    """``(dotted data key, message)`` for each need of ``who`` that ``data`` does not meet.

    ``data`` is the recipe's data section (a ``LoaderConfig``). Reports and label fields
    are always in a batch; views, priors, the priors' views and text, and sentences are
    recipe settings. With ``data.shard_format: generic`` only what a generic image-text
    sample has can be read (:func:`beyond_generic`).
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
    prior_views = data.views if data.prior_views is None else data.prior_views
    missing = sorted(need.prior_views - set(prior_views))
    if need.priors and missing:
        key = "data.views" if data.prior_views is None else "data.prior_views"
        problems.append(
            (
                key,
                f"{who} needs the view(s) {missing} of the prior studies, but {key} is "
                f"{list(prior_views)}",
            )
        )
    if need.priors and need.prior_text and not data.prior_text:
        problems.append(
            (
                "data.prior_text",
                f"{who} needs the text of the prior studies, but data.prior_text is false",
            )
        )
    if "sentence" in (need.text | need.prior_text) and not data.sentences:
        problems.append(
            ("data.sentences", f"{who} needs report sentences, but data.sentences is false")
        )
    unknown = sorted(need.fields - set(LABEL_FIELDS))
    if unknown:
        problems.append(("data", f"{who} needs unknown batch field(s) {unknown}"))
    wants = beyond_generic(need) if data.shard_format == "generic" else []
    if wants:
        # With `auto` the layout is known only when a sample is read: the loader stops at
        # the first generic one instead (vlp.data.decode).
        problems.append(
            (
                "data.shard_format",
                f"{who} needs {', '.join(wants)}, which generic image-text shards do not "
                "have (one image and its text per sample); use shards in vlp's schema",
            )
        )
    return problems


def narrowed(data, need: Requirements):
    """``data`` (a ``LoaderConfig``) decoding only what ``need`` asks for: the views in
    ``need`` (the current frontal always), ``need.priors`` priors with only the views and
    text read at them, reports and sentences only when some component reads them, and the
    label fields read (so that generic samples, which have none, stop the loader). ``need``
    must be met (:func:`unmet` empty)."""
    priors = min(data.priors, need.priors)
    wanted = need.views | (need.prior_views if priors else frozenset())
    text = need.text | (need.prior_text if priors else frozenset())
    return dataclasses.replace(
        data,
        views=[v for v in data.views if v == "frontal" or v in wanted],
        priors=priors,
        prior_views=[v for v in data.views if v in need.prior_views],
        prior_text=bool(priors and need.prior_text),
        sentences=data.sentences and "sentence" in text,
        reports="report" in text,
        label_fields=sorted(need.fields),
    )
