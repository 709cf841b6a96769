"""Local image-region ↔ report-word alignment (BioViL-L's local loss, GLoRIA-style).

Huang et al., "GLoRIA", ICCV 2021 (Eqs. 3-6), the local loss that BioViL-L (Boecking et al.,
ECCV 2022, §4) adds "in the LoVT/GLoRIA style" beside the global one. For a report i and an
image j, every word l attends over the image's regions r,

    a_ijlr = softmax_r(γ1 · cos(w_il, c_jr)),     v_ijl = Σ_r a_ijlr c_jr,

the word is compared with its region-attended context, and the words are aggregated with a
smooth maximum,

    R(i, j) = (1/γ2) · log Σ_l exp(γ2 · cos(w_il, v_ijl)),

which is contrasted across the batch in both directions: ``CE(γ3 · R)`` with the matching
pair as the target (images per report and reports per image, averaged). Defaults γ1 = 4,
γ2 = 5, γ3 = 10 are GLoRIA's.

Where paper and code differ, and what we follow:

* GLoRIA's released code applies a softmax over the words before the softmax over regions
  (``softmax_r(γ1 · softmax_l(c·wᵀ))``); we follow the paper's attention (one softmax over
  regions of the scaled cosine), which is also what BioViL-L describes.
* GLoRIA sums WordPiece pieces into words and keeps 97 words; we use the report's tokens
  (``report_words``: the text encoder's projected token states without special tokens),
  so a word split into pieces contributes each piece.
* Negatives are the other samples of the rank's own batch (GLoRIA trains on one GPU); the
  pairwise tensor is B×B×L×R per rank, so the loss is not gathered across ranks. The
  context norm ‖v‖ is computed as aᵀ(C Cᵀ)a, so nothing B×B×L×D is materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlp.objectives.base import Objective, ObjectiveOutput, zero_loss
from vlp.registry import register


@dataclass
class LocalAlignmentConfig:
    #: image feature with the regions: ``image_local`` (B×R×D).
    image_key: str = "image_local"
    #: γ1: sharpness of the word's attention over regions.
    attention_temperature: float = 4.0
    #: γ2: sharpness of the smooth maximum over words.
    word_temperature: float = 5.0
    #: γ3: scale of the region-word scores in the contrastive cross-entropy.
    logit_scale: float = 10.0

    def validate(self) -> None:
        for name in ("attention_temperature", "word_temperature", "logit_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def region_word_scores(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    regions: torch.Tensor,
    attention_temperature: float,
    word_temperature: float,
) -> torch.Tensor:
    """``R(i, j)`` of the module docstring for every report i and image j: ``Bt×Bi``.

    ``words`` Bt×L×D with ``word_mask`` Bt×L; ``regions`` Bi×R×D."""
    w = F.normalize(words.float(), dim=-1)
    c = F.normalize(regions.float(), dim=-1)
    similarity = torch.einsum("ild,jrd->ijlr", w, c)  # cos(w_il, c_jr)
    attention = torch.softmax(attention_temperature * similarity, dim=-1)
    # cos(w, v) = (Σ_r a_r w·c_r) / ‖Σ_r a_r c_r‖ with ‖w‖ = 1.
    numerator = (attention * similarity).sum(-1)
    gram = torch.einsum("jrd,jsd->jrs", c, c)
    norm_sq = torch.einsum("ijlr,jrs,ijls->ijl", attention, gram, attention)
    cosine = numerator / norm_sq.clamp_min(1e-12).sqrt()
    logits = (word_temperature * cosine).masked_fill(~word_mask[:, None, :], float("-inf"))
    return torch.logsumexp(logits, dim=-1) / word_temperature


@register("objective", "local_alignment", config=LocalAlignmentConfig)
class LocalAlignmentObjective(Objective):
    """Word ↔ region contrastive alignment (module docstring); needs ``model.word_dim``."""

    @classmethod
    def features_needed(cls, config: LocalAlignmentConfig) -> frozenset[str]:
        return frozenset({config.image_key, "report_words", "report_word_mask"})

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        regions = features[self.config.image_key]
        words, word_mask = features["report_words"], features["report_word_mask"]
        # A report without any word scores -inf against every image: it is left out as a
        # query; its image still serves as a negative for the other reports.
        queries = word_mask.any(1).nonzero().squeeze(1)
        if len(queries) == 0:
            return ObjectiveOutput({"local": zero_loss(words, regions)})
        scores = region_word_scores(
            words[queries],
            word_mask[queries],
            regions,
            self.config.attention_temperature,
            self.config.word_temperature,
        )
        logits = self.config.logit_scale * scores  # queries × all images
        report_to_image = F.cross_entropy(logits, queries)
        own = torch.arange(len(queries), device=logits.device)
        image_to_report = F.cross_entropy(logits[:, queries].T, own)
        loss = (report_to_image + image_to_report) / 2
        with torch.no_grad():
            metrics = {"t2i_top1": (logits.argmax(1) == queries).float().mean()}
        return ObjectiveOutput({"local": loss}, metrics)
