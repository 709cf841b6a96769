"""Global image–report losses: CLIP / ConVIRT / BioViL InfoNCE, label-aware margins and rankings.

Symmetric InfoNCE with a learnable temperature: Radford et al. 2021 (CLIP), Zhang et al.
2020 (ConVIRT), Boecking et al. 2022 (BioViL). The loss itself is open_clip's ``ClipLoss``
with ``local_loss=True, gather_with_grad=True``: each rank scores its own rows against the
gathered batch, and after DDP/DeepSpeed average the gradients over ranks, loss and
gradients equal those of one process holding the whole global batch
(``tests/test_distributed_loss.py``). Every rank must hold the same number of samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from vlp import distributed
from vlp.models.heads import LogitScale
from vlp.objectives.base import (
    FeatureDims,
    Objective,
    ObjectiveOutput,
    labelled_classes,
    valid_sentences,
)
from vlp.objectives.scoring import CosineScorer
from vlp.registry import register

TEXT_SOURCES = ("report", "random_sentence")


@dataclass
class ClipConfig:
    #: image feature: image_global
    image_key: str = "image_global"
    #: ``report`` (the report embedding) or ``random_sentence`` (ConVIRT: one sentence of the
    #: report drawn per sample and step; samples without sentences use the report).
    text: str = "report"
    #: L2-normalise both sides (cosine similarities), as CLIP does.
    normalize: bool = True
    #: initial log logit scale (CLIP: log 1/0.07) and its cap (log 100).
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)


def pick_random_sentence(features: dict) -> torch.Tensor:
    """One embedding per sample: a uniformly drawn sentence of it, else its report.

    Written into a copy of ``report`` by a random permutation, so that when a sample has
    several sentences the one written last (a random one) is kept.
    """
    report, sentence = features["report"], features["sentence"]
    if sentence.shape[-1] != report.shape[-1]:
        raise ValueError(
            "clip with text: random_sentence needs sentence and report embeddings of the "
            f"same width, got {sentence.shape[-1]} and {report.shape[-1]}"
        )
    valid = valid_sentences(features)
    index = features["sentence_index"][valid]
    sentence = sentence[valid]
    chosen = torch.full((report.shape[0],), -1, dtype=torch.long, device=report.device)
    order = torch.randperm(index.shape[0], device=report.device)
    chosen[index[order]] = order
    has_sentence = chosen >= 0
    picked = sentence[chosen.clamp_min(0)] if sentence.shape[0] else report
    return torch.where(has_sentence[:, None], picked, report)


@register("objective", "clip", config=ClipConfig)
class ClipObjective(Objective):
    """Symmetric image–text InfoNCE with its own learnable logit scale."""

    def __init__(self, config: ClipConfig, dims: FeatureDims):
        super().__init__(config, dims)
        if config.text not in TEXT_SOURCES:
            raise ValueError(f"clip.text must be one of {TEXT_SOURCES}, got {config.text!r}")
        if not config.image_key.endswith("_global"):
            raise ValueError(
                f"clip.image_key must be an image encoder's global feature (<name>_global), "
                f"got {config.image_key!r}"
            )
        self.logit_scale = LogitScale(config.logit_scale_init, config.logit_scale_max)

    @classmethod
    def features_needed(cls, config: ClipConfig) -> frozenset[str]:
        needed = {config.image_key, "report"}
        if config.text == "random_sentence":
            needed.add("sentence")
        return frozenset(needed)

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        image = features[self.config.image_key]
        text = features["report"]
        if self.config.text == "random_sentence":
            text = pick_random_sentence(features)
        if self.config.normalize:
            image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        scale = self.logit_scale()
        loss_fn = ClipLoss(
            local_loss=True,
            gather_with_grad=True,
            rank=distributed.rank(),
            world_size=distributed.world_size(),
        )
        loss = loss_fn(image, text, scale)
        with torch.no_grad():
            # Retrieval accuracy within this rank's batch (cheap; no extra gather).
            logits = image @ text.T
            target = torch.arange(image.shape[0], device=image.device)
            metrics = {
                "i2t_top1": (logits.argmax(1) == target).float().mean(),
                "t2i_top1": (logits.argmax(0) == target).float().mean(),
                "logit_scale": scale.detach(),
            }
        return ObjectiveOutput({"contrastive": loss}, metrics)

    def scorer(self) -> CosineScorer:
        # Trained on report embeddings; local features share that space when the global
        # embedding is their mean (BioViL) and the widths match.
        regions = "report" if self.dims.local_dim == self.dims.embed_dim else None
        with torch.no_grad():
            scale = float(self.logit_scale())
        return CosineScorer("report", region_text_kind=regions, logit_scale=scale)


UNCERTAIN_POLICIES = ("negative", "positive")


@dataclass
class LabelMarginConfig:
    #: image feature: an image encoder's global embedding.
    image_key: str = "image_global"
    #: ε: distance below which a pair with different labels is pushed apart. With
    #: ``normalize`` the embeddings are unit vectors, so distances lie in [0, 2].
    margin: float = 1.0
    #: CheXpert's uncertain label (-1) counts as ``negative`` (U-Zeros) or ``positive``
    #: (U-Ones, Irvin et al. 2019); blank counts as negative.
    uncertain: str = "negative"
    normalize: bool = True


def label_sets(labels: torch.Tensor, uncertain: str) -> torch.Tensor:
    """bool ``B×K``: which labels are positive, with the uncertain policy applied."""
    positive = labels == 1
    if uncertain == "positive":
        positive |= labels == -1
    return positive


@register("objective", "label_margin", config=LabelMarginConfig)
class LabelMarginObjective(Objective):
    """Label-aware margin loss between images and reports.

    For image i and report j at distance d_ij = ‖f(x_i) − g(t_j)‖: d_ij² when i and j have
    the same CheXpert label set (always for i = j), max(0, ε − d_ij)² otherwise (the
    contrastive loss of Hadsell, Chopra & LeCun 2006, between modalities), averaged over
    all pairs. The margin loss that the MAE + LLaMA attention-pooling study we follow
    offers beside InfoNCE (``recipes/mae_llama.yaml``). Each rank scores its own images
    against the reports of every rank (gathered with their gradient), so with equal
    per-rank batches the mean gradient equals one process's on the whole batch.
    """

    def __init__(self, config: LabelMarginConfig, dims: FeatureDims):
        super().__init__(config, dims)
        if config.uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(
                f"label_margin.uncertain must be one of {UNCERTAIN_POLICIES}, "
                f"got {config.uncertain!r}"
            )
        if config.margin <= 0:
            raise ValueError(f"label_margin.margin must be > 0, got {config.margin}")

    @classmethod
    def features_needed(cls, config: LabelMarginConfig) -> frozenset[str]:
        return frozenset({config.image_key, "report"})

    @classmethod
    def fields_needed(cls, config: LabelMarginConfig) -> frozenset[str]:
        return frozenset({"labels"})

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        image, text = features[self.config.image_key], features["report"]
        if self.config.normalize:
            image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        labels = batch["labels"]
        labels = labels[:, 0] if labels.dim() == 3 else labels
        sets = label_sets(labels, self.config.uncertain)
        all_text = distributed.gather_with_grad(text, equal_sizes=True)
        all_sets = distributed.gather_no_grad(sets.to(torch.uint8)).bool()
        same = (sets[:, None, :] == all_sets[None, :, :]).all(-1)
        image, all_text = image.float(), all_text.float()
        squared = (
            image.square().sum(-1, keepdim=True)
            + all_text.square().sum(-1)[None]
            - 2 * image @ all_text.T
        ).clamp_min(0)
        # sqrt has an infinite derivative at 0; the hinge only needs d away from 0.
        distance = (squared + 1e-12).sqrt()
        loss = torch.where(
            same, squared, (self.config.margin - distance).clamp_min(0).square()
        ).mean()
        with torch.no_grad():
            metrics = {
                "same_label_pairs": same.float().mean(),
                "distance_same": distance[same].mean() if same.any() else distance.new_zeros(()),
                "distance_other": distance[~same].mean()
                if (~same).any()
                else distance.new_zeros(()),
            }
        return ObjectiveOutput({"margin": loss}, metrics)

    def scorer(self) -> CosineScorer:
        return CosineScorer("report")


SIMILARITIES = ("dot", "cosine", "neg_l2")


@dataclass
class LabelRankingConfig:
    #: image feature: an image encoder's global embedding.
    image_key: str = "image_global"
    #: the categorical label whose differences set the margins (-1 = unlabeled).
    field: str = "edema_severity"
    #: s(image, text): ``dot`` (Chauhan et al.'s default), ``cosine`` or ``neg_l2``.
    similarity: str = "dot"
    #: margin when either study is unlabeled, and the least margin between labelled ones.
    unlabeled_margin: float = 0.5
    min_margin: float = 0.5


def ranking_margins(
    y: torch.Tensor, y_imposter: torch.Tensor, same: torch.Tensor, config: LabelRankingConfig
) -> torch.Tensor:
    """Chauhan et al.'s margins: 0 for the same study, ``unlabeled_margin`` when either
    label is unknown (< 0), else ``max(min_margin, |y_i − y_j|)``."""
    labelled = (y >= 0) & (y_imposter >= 0)
    gap = (y - y_imposter).abs().to(torch.float32).clamp_min(config.min_margin)
    margin = torch.where(labelled, gap, torch.full_like(gap, config.unlabeled_margin))
    return torch.where(same, torch.zeros_like(margin), margin)


@register("objective", "label_ranking", config=LabelRankingConfig)
class LabelRankingObjective(Objective):
    """Label-aware ranking loss of Chauhan et al., "Joint Modeling of Chest Radiographs and
    Radiology Reports for Pulmonary Edema Assessment", MICCAI 2020 (§2.2).

    Each image–report pair (i, i) is ranked above an imposter pair built from the next
    sample of the batch, j = i + 1 (cyclic), as their code does: the imposter image
    ``max(0, s(x_j, t_i) − s(x_i, t_i) + m_ij)`` plus the imposter text
    ``max(0, s(x_i, t_j) − s(x_i, t_i) + m_ij)``, averaged over the batch, with the margin
    ``m_ij`` of :func:`ranking_margins` (a wider gap between severities demands a wider
    margin; unlabeled studies use 0.5, so the loss uses unlabeled pairs as well). The
    imposter is taken within this rank's batch, as in their single-GPU code. Their
    similarity is the dot product of the unnormalised embeddings (``similarity: dot``);
    the paper's text calls it a similarity without fixing it.
    """

    def __init__(self, config: LabelRankingConfig, dims: FeatureDims):
        super().__init__(config, dims)
        if config.similarity not in SIMILARITIES:
            raise ValueError(
                f"label_ranking.similarity must be one of {SIMILARITIES}, got {config.similarity!r}"
            )

    @classmethod
    def features_needed(cls, config: LabelRankingConfig) -> frozenset[str]:
        return frozenset({config.image_key, "report"})

    @classmethod
    def fields_needed(cls, config: LabelRankingConfig) -> frozenset[str]:
        return frozenset({config.field})

    def similarity(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Row-wise s(image_b, text_b)."""
        if self.config.similarity == "cosine":
            return F.cosine_similarity(image, text, dim=-1)
        if self.config.similarity == "neg_l2":
            return -(image - text).norm(dim=-1)
        return (image * text).sum(-1)

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        image = features[self.config.image_key].float()
        text = features["report"].float()
        y, _ = labelled_classes(batch, self.config.field, 1 << 30)
        study = batch["study_id"][:, 0]
        imposter = torch.roll(torch.arange(image.shape[0], device=image.device), -1)
        margin = ranking_margins(y, y[imposter], study == study[imposter], self.config)
        true = self.similarity(image, text)
        image_hinge = (self.similarity(image[imposter], text) - true + margin).clamp_min(0)
        text_hinge = (self.similarity(image, text[imposter]) - true + margin).clamp_min(0)
        loss = (image_hinge + text_hinge).mean()
        with torch.no_grad():
            metrics = {
                "violated": ((image_hinge > 0) | (text_hinge > 0)).float().mean(),
                "mean_margin": margin.mean(),
            }
        return ObjectiveOutput({"ranking": loss}, metrics)

    def scorer(self) -> CosineScorer:
        return CosineScorer("report")
