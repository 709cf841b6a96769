"""Mutual-information objectives of Liao et al., MICCAI 2021, and the bounds they maximise.

Liao, Moyer, Cha, Quigley, Berkowitz, Horng, Golland, Wells: "Multimodal Representation
Learning via Maximization of Local Mutual Information", MICCAI 2021.

A discriminator (critic) ``T(x, y)`` scores an image feature ``x`` and a text feature ``y``
from their concatenation (MLP ``[Dx+Dy] → 1024 → 512 → 1``). Two lower bounds on I(X; Y):

* :func:`dv_bound` — Donsker–Varadhan, as in MINE (Belghazi et al. 2018):
  ``E_P[T] − log E_Q[e^T]``; negatives of all rows are pooled into one expectation.
* :func:`infonce_bound` — the standard per-anchor InfoNCE / CPC bound (van den Oord et al.
  2018; Poole et al. 2019): ``mean_i [T_ii − log Σ_{j∈{i}∪neg(i)} e^{T_ij}] + log K_i``,
  with ``K_i`` the row's candidate count. It never exceeds ``log N``. The released code of
  Liao et al. uses instead one logsumexp pooled over all negatives of the batch, which is
  the DV bound shifted by the constant ``log N_neg``; we use the per-row form because it is
  a proper bound and decomposes over rows (and therefore over ranks).

Objectives:

``global_mi``
    image global feature vs report feature; positives are matched pairs, negatives every
    other report of the gathered batch whose ``study_id`` differs.
``local_mi``
    Eq. 5 of the paper: each sentence is scored against every region of its own image, the
    region with the highest critic score is taken and the bound is maximised for that
    region–sentence pair. The same statistic, ``max_r T(x_{b,r}, y_s)``, scores a sentence
    against a negative image ``b``: the critic of the bound is then ``T'(x, y) = max_r T(x_r,
    y)``, one fixed function of (image, sentence), so both estimators remain valid lower
    bounds on I(image; sentence). Only the selected region's score receives gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlp import distributed
from vlp.objectives.base import (
    FeatureDims,
    Objective,
    ObjectiveOutput,
    valid_sentences,
    zero_loss,
)
from vlp.registry import register

#: CPC (InfoNCE, van den Oord et al. 2018) and MINE (Donsker-Varadhan, Belghazi et al. 2018).
ESTIMATORS = ("cpc", "mine")


# --------------------------------------------------------------------------- bounds


def _masks(scores: torch.Tensor, positive_mask, negative_mask):
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D matrix, got shape {tuple(scores.shape)}")
    if positive_mask is None:
        positive_mask = torch.eye(*scores.shape, dtype=torch.bool, device=scores.device)
    if negative_mask is None:
        negative_mask = ~positive_mask
    for name, mask in (("positive_mask", positive_mask), ("negative_mask", negative_mask)):
        if mask.shape != scores.shape or mask.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor of shape {tuple(scores.shape)}")
    return positive_mask, negative_mask & ~positive_mask


def dv_bound(scores: torch.Tensor, positive_mask=None, negative_mask=None) -> torch.Tensor:
    """Donsker–Varadhan lower bound (nats) from critic scores.

    ``scores[i, j]`` is the critic's score for image i with text j. Positives are
    ``positive_mask`` (default: the diagonal), negatives ``negative_mask`` (default: every
    other entry); excluded pairs (same study) are in neither. Returns
    ``mean(T[pos]) − (logsumexp(T[neg]) − log |neg|)``; the loss is its negative.
    """
    pos, neg = _masks(scores, positive_mask, negative_mask)
    num_pos, num_neg = int(pos.sum()), int(neg.sum())
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"dv_bound needs positives and negatives, got {num_pos} and {num_neg}")
    positive_term = scores.masked_fill(~pos, 0.0).sum() / num_pos
    negative_term = torch.logsumexp(scores.masked_fill(~neg, -math.inf).flatten(), 0)
    return positive_term - (negative_term - math.log(num_neg))


def infonce_bound(
    scores: torch.Tensor, positive_mask=None, negative_mask=None, reduction: str = "mean"
) -> torch.Tensor:
    """Per-row InfoNCE (CPC) lower bound (nats), at most ``log`` of the row's candidates.

    Every row needs exactly one positive (default: the diagonal). Row i contributes
    ``T_i+ − logsumexp_{j ∈ {+} ∪ neg(i)} T_ij + log K_i`` with ``K_i = 1 + |neg(i)|``.
    ``reduction``: ``mean`` over rows or ``none`` (per-row values).
    """
    pos, neg = _masks(scores, positive_mask, negative_mask)
    per_row_pos = pos.sum(1)
    if not bool((per_row_pos == 1).all()):
        bad = (per_row_pos != 1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"infonce_bound needs exactly one positive per row; rows {bad} differ")
    candidates = pos | neg
    positive_score = scores.masked_fill(~pos, 0.0).sum(1)
    normaliser = torch.logsumexp(scores.masked_fill(~candidates, -math.inf), dim=1)
    per_row = positive_score - normaliser + candidates.sum(1).to(scores.dtype).log()
    if reduction == "none":
        return per_row
    if reduction == "mean":
        return per_row.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def mi_bound(estimator: str, scores, positive_mask=None, negative_mask=None) -> torch.Tensor:
    if estimator == "cpc":
        return infonce_bound(scores, positive_mask, negative_mask)
    if estimator == "mine":
        return dv_bound(scores, positive_mask, negative_mask)
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


# --------------------------------------------------------------------------- critic


class ConcatCritic(nn.Module):
    """MLP on ``cat(x, y)`` whose first layer is split into an image and a text part.

    ``W [x; y] + c = (W_x x + c) + W_y y``: the two parts are computed once per image or
    text and broadcast over pairs, so no concatenated pair is ever materialised.
    """

    def __init__(self, image_dim: int, text_dim: int, hidden_dims=(1024, 512)):
        super().__init__()
        hidden_dims = list(hidden_dims)
        if not hidden_dims:
            raise ValueError("critic hidden_dims must list at least one width")
        self.image_in = nn.Linear(image_dim, hidden_dims[0])
        self.text_in = nn.Linear(text_dim, hidden_dims[0], bias=False)
        layers: list[nn.Module] = [nn.ReLU()]
        for width_in, width_out in zip(hidden_dims[:-1], hidden_dims[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        layers.append(nn.Linear(hidden_dims[-1], 1))
        self.rest = nn.Sequential(*layers)

    def first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The equivalent unsplit first layer: weight ``H×(Dx+Dy)`` and bias."""
        return torch.cat([self.image_in.weight, self.text_in.weight], 1), self.image_in.bias

    def from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores from first-layer pre-activations ``...×H`` → ``...``."""
        return self.rest(hidden).squeeze(-1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Scores of aligned pairs (broadcasting leading dimensions)."""
        return self.from_hidden(self.image_in(image) + self.text_in(text))

    def pair_scores(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``Ni×Dx`` and ``Nt×Dy`` → ``Ni×Nt`` scores of every pair."""
        return self.from_hidden(self.image_in(image)[:, None, :] + self.text_in(text)[None, :, :])


# --------------------------------------------------------------------------- global MI


@dataclass
class GlobalMIConfig:
    estimator: Literal["cpc", "mine"] = "cpc"
    hidden_dims: list = field(default_factory=lambda: [1024, 512])
    image_key: str = "image_global"
    text_key: str = "report"
    #: take negative reports from all ranks (with gradient).
    gather: bool = True


@register("objective", "global_mi", config=GlobalMIConfig)
class GlobalMIObjective(Objective):
    """Liao et al. 2021 global MI between image and report features."""

    Config = GlobalMIConfig

    def __init__(self, config: GlobalMIConfig, dims: FeatureDims):
        super().__init__(config, dims)
        if config.estimator not in ESTIMATORS:
            raise ValueError(f"global_mi.estimator must be one of {ESTIMATORS}")
        widths = {"image_global": dims.embed_dim, "report": dims.embed_dim}
        for key in (config.image_key, config.text_key):
            if key not in widths:
                raise ValueError(f"global_mi: feature {key!r} is not one of {sorted(widths)}")
        self.required_features = frozenset({config.image_key, config.text_key})
        self.critic = ConcatCritic(
            widths[config.image_key], widths[config.text_key], config.hidden_dims
        )

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        image, text = features[self.config.image_key], features[self.config.text_key]
        study = features["study_id"]
        gather = self.config.gather and distributed.world_size() > 1
        texts = distributed.gather_with_grad(text) if gather else text
        studies = distributed.gather_no_grad(study) if gather else study
        offset = distributed.rank_offset(image.shape[0], image.device) if gather else 0
        # Rows are this rank's images against every (gathered) report.
        scores = self.critic.pair_scores(image, texts)
        columns = torch.arange(texts.shape[0], device=image.device)
        own = torch.arange(image.shape[0], device=image.device) + offset
        positive = columns[None, :] == own[:, None]
        negative = studies[None, :] != study[:, None]
        if not bool(negative.any()):
            # One study in the whole batch: nothing to contrast against.
            return ObjectiveOutput({"mi": zero_loss(scores)}, {})
        bound = mi_bound(self.config.estimator, scores, positive, negative)
        with torch.no_grad():
            metrics = _score_metrics(scores, positive, negative, bound)
        return ObjectiveOutput({"mi": -bound}, metrics)


def _score_metrics(scores, positive, negative, bound) -> dict[str, torch.Tensor]:
    candidates = scores.masked_fill(~(positive | negative), -math.inf)
    hit = (candidates.argmax(1)[:, None] == positive.nonzero()[:, 1].view(-1, 1)).float()
    return {
        "bound": bound.detach(),
        "positive_score": scores[positive].mean().detach(),
        "negative_score": scores[negative].mean().detach(),
        "top1": hit.mean(),
    }


# --------------------------------------------------------------------------- local MI


@dataclass
class LocalMIConfig:
    estimator: Literal["cpc", "mine"] = "cpc"
    hidden_dims: list = field(default_factory=lambda: [1024, 512])
    #: negative images per sentence, drawn at random among images of other studies in the
    #: (gathered) batch; -1 uses all of them.
    num_negatives: int = -1
    #: critic evaluations (sentence × image × region) held in memory at once.
    chunk_size: int = 8192
    #: take negative images from all ranks (with gradient).
    gather: bool = True


@register("objective", "local_mi", config=LocalMIConfig)
class LocalMIObjective(Objective):
    """Liao et al. 2021 local MI (Eq. 5): max-over-regions sentence–region critic."""

    Config = LocalMIConfig
    required_features = frozenset({"image_local", "sentence"})

    def __init__(self, config: LocalMIConfig, dims: FeatureDims):
        super().__init__(config, dims)
        if config.estimator not in ESTIMATORS:
            raise ValueError(f"local_mi.estimator must be one of {ESTIMATORS}")
        if config.chunk_size < 1:
            raise ValueError("local_mi.chunk_size must be positive")
        self.critic = ConcatCritic(dims.local_dim, dims.sentence_dim, config.hidden_dims)

    # -- pieces -------------------------------------------------------------------------

    def _sentences_per_chunk(self, evaluations_per_sentence: int) -> int:
        return max(1, self.config.chunk_size // max(1, evaluations_per_sentence))

    def region_scores(self, features: dict) -> torch.Tensor:
        """Critic score of every sentence with every region of its own image: ``S×R``.

        This is the grounding map (rows of padding sentences are NaN). It runs under the
        caller's grad mode; wrap in ``torch.no_grad()`` for evaluation.
        """
        local, sentence = features["image_local"], features["sentence"]
        index = features["sentence_index"]
        out = local.new_full((sentence.shape[0], local.shape[1]), math.nan)
        valid = index >= 0
        if not bool(valid.any()):
            return out
        image_part = self.critic.image_in(local)  # B×R×H
        text_part = self.critic.text_in(sentence[valid])  # S×H
        rows = index[valid]
        step = self._sentences_per_chunk(local.shape[1])
        chunks = [
            self.critic.from_hidden(image_part[rows[i : i + step]] + text_part[i : i + step, None])
            for i in range(0, rows.shape[0], step)
        ]
        out[valid] = torch.cat(chunks, 0).to(out.dtype)
        return out

    def _candidates(self, own, sentence_study, studies):
        """Columns (S×C, own image first) and the negative mask over them."""
        negatives = studies[None, :] != sentence_study[:, None]  # S×B_all
        count = self.config.num_negatives
        if 0 <= count < studies.shape[0]:
            # Random draw without replacement among valid negatives; rows with fewer valid
            # negatives than ``count`` keep invalid picks masked out.
            keys = torch.rand(negatives.shape, device=own.device).masked_fill(~negatives, -1.0)
            columns = keys.topk(count, dim=1).indices if count else keys[:, :0].long()
            valid = negatives.gather(1, columns)
        else:
            columns = torch.arange(studies.shape[0], device=own.device).expand_as(negatives)
            valid = negatives
        columns = torch.cat([own[:, None], columns], 1)
        negative_mask = torch.cat([torch.zeros_like(valid[:, :1]), valid], 1)
        return columns, negative_mask

    def _best_regions(self, image_part, text_part, columns) -> torch.Tensor:
        """argmax over regions of each (sentence, candidate image) score, without autograd."""
        regions = image_part.shape[1]
        step = self._sentences_per_chunk(columns.shape[1] * regions)
        best = []
        with torch.no_grad():
            for i in range(0, columns.shape[0], step):
                hidden = image_part[columns[i : i + step]] + text_part[i : i + step, None, None]
                best.append(self.critic.from_hidden(hidden).argmax(-1))
        return torch.cat(best, 0)

    def _selected_scores(self, image_part, text_part, columns, best) -> torch.Tensor:
        """Scores of the selected region of each candidate image, with autograd, chunked.

        Each chunk is checkpointed: only its inputs are kept and the critic is recomputed
        in the backward pass, which bounds memory by ``chunk_size``.
        """
        step = self._sentences_per_chunk(columns.shape[1])
        chunks = []
        for i in range(0, columns.shape[0], step):
            sl = slice(i, i + step)
            args = (image_part, text_part[sl], columns[sl], best[sl])
            if torch.is_grad_enabled():
                chunks.append(checkpoint(self._score_chunk, *args, use_reentrant=False))
            else:
                chunks.append(self._score_chunk(*args))
        return torch.cat(chunks, 0)

    def _score_chunk(self, image_part, text_part, columns, best):
        return self.critic.from_hidden(image_part[columns, best] + text_part[:, None])

    # -- objective ------------------------------------------------------------------------

    def scores(self, features: dict):
        """Critic scores ``S×C`` of each valid sentence with its own image (column 0) and
        its candidate negative images, plus the masks and the chosen regions."""
        valid = valid_sentences(features)
        local, study = features["image_local"], features["study_id"]
        sentence = features["sentence"][valid]
        index = features["sentence_index"][valid]
        gather = self.config.gather and distributed.world_size() > 1
        locals_all = distributed.gather_with_grad(local) if gather else local
        studies = distributed.gather_no_grad(study) if gather else study
        offset = distributed.rank_offset(local.shape[0], local.device) if gather else 0

        columns, negative = self._candidates(index + offset, study[index], studies)
        image_part = self.critic.image_in(locals_all)  # B_all×R×H, computed once
        text_part = self.critic.text_in(sentence)  # S×H, computed once
        best = self._best_regions(image_part, text_part, columns)
        scores = self._selected_scores(image_part, text_part, columns, best)
        positive = torch.zeros_like(negative)
        positive[:, 0] = True
        return scores, positive, negative, best

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        valid = valid_sentences(features)
        anchors = (features["image_local"], features["sentence"])
        if not bool(valid.any()):
            return ObjectiveOutput({"mi": zero_loss(*anchors, *self.critic.parameters())}, {})
        scores, positive, negative, _ = self.scores(features)
        if not bool(negative.any()):
            return ObjectiveOutput({"mi": zero_loss(scores, *anchors)}, {})
        bound = mi_bound(self.config.estimator, scores, positive, negative)
        with torch.no_grad():
            metrics = _score_metrics(scores, positive, negative, bound)
        return ObjectiveOutput({"mi": -bound}, metrics)
