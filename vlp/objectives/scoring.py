"""How a trained model compares an image with a text: one interface for every evaluator.

An objective that defines an image–text score exposes it as a :class:`Scorer`
(``Objective.scorer()``); zero-shot classification, retrieval and phrase grounding call
only this interface and never name an objective. Four scorers cover today's objectives:

* :class:`CosineScorer` — cosine of projected embeddings (CLIP, Radford et al. 2021;
  BioViL, Boecking et al. 2022): global image vs text for image-level scores, each local
  feature vs the text for region maps (BioViL's grounding).
* :class:`GlobalCriticScorer` — a global MI critic ``T(image, text)`` (Liao et al. 2021).
* :class:`LocalCriticScorer` — a sentence–region critic pooled over regions as the
  objective pools it (Liao et al. 2021, Eq. 5); its region scores are the grounding map.
* :class:`WordRegionScorer` — the report's words attending over the image's regions
  (GLoRIA, Huang et al. 2021; BioViL-L's local loss): the smooth maximum over words of
  each word's agreement with its attended context; its region map is that attention.

A scorer also says which text space it reads (``text_kind``: ``report`` or ``sentence``
embeddings, or ``words``: projected word features padded with zero vectors) and how a
class's prompts are ensembled (``prompt_ensemble``: ``embedding``, the mean of the
embeddings as BioViL does, for scores linear in the text embedding; ``score``, the mean of
the per-prompt scores, for critics and attention that are not).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

TEXT_KINDS = ("report", "sentence", "words")


class Scorer:
    """Image-level scores ``B×P`` and, where defined, region maps of texts on images."""

    #: which projected text embedding the scorer reads: ``report`` or ``sentence``.
    text_kind: str = "report"
    #: ``embedding``: ensemble prompts by averaging embeddings; ``score``: average scores.
    prompt_ensemble: str = "score"
    #: one line for results files: what the score is.
    description: str = ""
    #: image feature keys ``scores`` reads (``image_global`` alone: cached features do).
    image_keys: tuple[str, ...] = ("image_global",)
    #: multiplies scores into logits for a softmax over prompts (``vlp zero-shot``): the
    #: learned temperature of a cosine, 1 for critics whose scores are logits already.
    logit_scale: float = 1.0

    def scores(self, image: dict, text: torch.Tensor) -> torch.Tensor:
        """``image``: the model's image features of B images; ``text``: ``P×D`` embeddings
        in the ``text_kind`` space → ``B×P`` scores (higher = more alike)."""
        raise NotImplementedError

    @property
    def has_regions(self) -> bool:
        return False

    def region_scores(self, image: dict, text: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Map ``T×R`` of text ``t`` over the regions of image ``index[t]``."""
        raise NotImplementedError(f"{type(self).__name__} has no region scores")


class CosineScorer(Scorer):
    prompt_ensemble = "embedding"

    def __init__(
        self,
        text_kind: str = "report",
        region_text_kind: str | None = None,
        logit_scale: float = 1 / 0.07,
    ):
        if text_kind not in TEXT_KINDS:
            raise ValueError(f"text_kind must be one of {TEXT_KINDS}, got {text_kind!r}")
        self.text_kind = text_kind
        #: local features share a space with this text kind (None: no region maps).
        self.region_text_kind = region_text_kind
        #: CLIP's initial temperature unless the objective passes its learned one.
        self.logit_scale = float(logit_scale)
        self.description = f"cosine(image_global, {text_kind} embedding)"

    def scores(self, image, text):
        return (
            F.normalize(image["image_global"].float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
        )

    @property
    def has_regions(self) -> bool:
        return self.region_text_kind == self.text_kind

    def region_scores(self, image, text, index):
        if not self.has_regions:
            raise NotImplementedError("local features share no space with the texts scored")
        local = F.normalize(image["image_local"].float(), dim=-1)[index]  # T×R×D
        return torch.einsum("trd,td->tr", local, F.normalize(text.float(), dim=-1))


class GlobalCriticScorer(Scorer):
    def __init__(self, critic, image_key: str = "image_global", text_kind: str = "report"):
        self.critic = critic
        self.image_key = image_key
        self.image_keys = (image_key,)
        self.text_kind = text_kind
        self.description = f"global MI critic T({image_key}, {text_kind})"

    def scores(self, image, text):
        return self.critic.pair_scores(image[self.image_key], text)


class LocalCriticScorer(Scorer):
    """Region scores from ``region_fn`` (``S×R`` for sentence s on image ``index[s]``),
    pooled over regions by ``pool`` into image scores."""

    text_kind = "sentence"
    image_keys = ("image_local",)

    def __init__(self, region_fn: Callable, pool: Callable, description: str):
        self.region_fn = region_fn
        self.pool = pool
        self.description = description

    @property
    def has_regions(self) -> bool:
        return True

    def region_scores(self, image, text, index):
        return self.region_fn(
            {"image_local": image["image_local"], "sentence": text, "sentence_index": index}
        )

    def scores(self, image, text):
        batch, prompts = image["image_local"].shape[0], text.shape[0]
        index = torch.arange(batch, device=text.device).repeat_interleave(prompts)
        regions = self.region_scores(
            {"image_local": image["image_local"]}, text.repeat(batch, 1), index
        )
        return self.pool(regions.view(batch, prompts, -1))


def unpack_words(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``words``-kind texts ``P×L×D`` → (words, mask ``P×L``): padding is a zero vector
    (``VLPModel.encode_text(kind="words")``), a projected real word never is."""
    return text, text.abs().amax(-1) > 0


class WordRegionScorer(Scorer):
    """The local alignment's score (``vlp.objectives.local_alignment``): ``R(text, image)``,
    word features attending over the image's regions; region maps are that attention
    weighted over the words (:func:`~vlp.objectives.local_alignment.word_region_maps`)."""

    text_kind = "words"
    image_keys = ("image_local",)

    def __init__(self, attention_temperature: float, word_temperature: float, logit_scale: float):
        self.attention_temperature = float(attention_temperature)
        self.word_temperature = float(word_temperature)
        self.logit_scale = float(logit_scale)
        self.description = (
            "word-region attention (local alignment: smooth maximum over the words of each "
            "word's cosine with its region-attended context)"
        )

    @property
    def has_regions(self) -> bool:
        return True

    def scores(self, image, text):
        from vlp.objectives.local_alignment import region_word_scores

        words, mask = unpack_words(text)
        scores = region_word_scores(
            words, mask, image["image_local"], self.attention_temperature, self.word_temperature
        )
        return scores.T  # B images × P texts

    def region_scores(self, image, text, index):
        from vlp.objectives.local_alignment import word_region_maps

        words, mask = unpack_words(text)
        return word_region_maps(
            words,
            mask,
            image["image_local"][index],
            self.attention_temperature,
            self.word_temperature,
        )
