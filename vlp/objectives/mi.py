"""Mutual-information objectives of Liao et al., MICCAI 2021, and the bounds they maximise.

Liao, Moyer, Cha, Quigley, Berkowitz, Horng, Golland, Wells: "Multimodal Representation
Learning via Maximization of Local Mutual Information", MICCAI 2021.

A critic ``T(x, y)`` scores an image feature ``x`` against a text feature ``y``. Two lower
bounds on I(X; Y) are built from its scores:

* :func:`dv_bound` — Donsker–Varadhan, as in MINE (Belghazi et al. 2018):
  ``E_P[T] − log E_Q[e^T]``; negatives of all rows are pooled into one expectation.
* :func:`infonce_bound` — the standard per-anchor InfoNCE / CPC bound (van den Oord et al.
  2018; Poole et al. 2019): ``mean_i [T_ii − log Σ_{j∈{i}∪neg(i)} e^{T_ij}] + log K_i``,
  with ``K_i`` the row's candidate count. It never exceeds ``log N``. The released code of
  Liao et al. uses instead one logsumexp pooled over all negatives of the batch, which is
  the DV bound shifted by the constant ``log N_neg``; we use the per-row form because it is
  a proper bound and decomposes over rows (and therefore over ranks).

Critics (:class:`CriticConfig`; Poole et al., ICML 2019, compare both families):

* ``concat`` — the paper's discriminator, an MLP on ``[x; y]`` (1280 → 1024 → 512 → 1).
* ``separable`` — ``<f(x), g(y)> / τ``, cosine of two linear projections over a learnt
  temperature. This is the default. On the phantom the concatenation critic collapses
  (positive and negative scores stay equal, half its ReLUs die, the region map ignores
  the sentence), while this one learns (README, "what pretraining learns").

Objectives:

``global_mi``
    image global feature vs report feature; positives are matched pairs, negatives every
    other report of the gathered batch whose ``study_id`` differs.
``local_mi``
    Eq. 5 of the paper: each sentence is scored against every region of each candidate
    image (its own and the negatives), and the region scores become one image score.
    The paper takes the max over regions (``region_pool: max``), and then only the picked
    region gets gradient. The default, ``logsumexp``, is a smooth max that also gives
    every region gradient while the features are still random. Either way the critic of
    the bound is ``T'(x, y) = pool_r T(x_r, y)``, one fixed function of (image, sentence),
    so both estimators remain valid lower bounds on I(image; sentence).

Both objectives log what tells learning from collapse (``metric/<objective>/...`` in
TensorBoard): ``score_gap`` (positive − negative score), ``top1`` against
``top1_chance``, the spread of scores across regions vs across sentences
(``spread_ratio``, large for a sentence-blind map) and, for the concatenation critic,
``critic_inactive_units`` (dead ReLUs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlp import distributed
from vlp.models.heads import LogitScale
from vlp.objectives.base import (
    FeatureDims,
    Objective,
    ObjectiveOutput,
    valid_sentences,
    zero_loss,
)
from vlp.objectives.scoring import GlobalCriticScorer, LocalCriticScorer
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


# --------------------------------------------------------------------------- critics

CRITICS = ("concat", "separable")
ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2)}


@dataclass
class CriticConfig:
    """The discriminator ``T(x, y)`` of an MI objective (Poole et al., ICML 2019, compare
    concatenation and separable critics for these bounds).

    ``separable`` (the default, what learns on the phantom) scores ``<f(x), g(y)> / τ``
    with ``f``, ``g`` linear maps (or MLPs through ``hidden_dims``) into ``dim``
    dimensions, L2-normalised when ``normalize`` (the score is then a cosine over a
    temperature, as in CLIP), ``τ`` learnable when ``learn_temperature``.
    ``concat`` is Liao et al.'s: an MLP on ``[x; y]`` through ``hidden_dims`` to one score
    (default ``[1024, 512]``, the paper's ``1280 → 1024 → 512 → 1``).
    """

    kind: Literal["concat", "separable"] = "separable"
    #: hidden widths; None = the kind's default ([1024, 512] concat, [] separable).
    hidden_dims: list[int] | None = None
    #: activation of the MLP layers: relu (Liao et al.) or leaky_relu (slope 0.2).
    activation: Literal["relu", "leaky_relu"] = "relu"
    #: separable: width of the space ``f`` and ``g`` map into.
    dim: int = 128
    #: separable: L2-normalise ``f(x)`` and ``g(y)``.
    normalize: bool = True
    #: separable: initial temperature of the dot product.
    temperature: float = 0.1
    learn_temperature: bool = True

    def widths(self) -> list[int]:
        if self.hidden_dims is not None:
            return list(self.hidden_dims)
        return [1024, 512] if self.kind == "concat" else []


def _mlp(widths: list[int], activation: str, final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if final_activation or i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class Critic(nn.Module):
    """``T(x, y)`` split into a per-image part, a per-text part and their combination.

    ``combine(embed_image(x), embed_text(y))`` broadcasts over leading dimensions, so an
    objective computes each part once per image (or region) and once per text and pairs
    them by indexing, never materialising concatenated pairs.
    """

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_text(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, image_part: torch.Tensor, text_part: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Scores of aligned pairs (broadcasting leading dimensions)."""
        return self.combine(self.embed_image(image), self.embed_text(text))

    def pair_scores(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``Ni×Dx`` and ``Nt×Dy`` → ``Ni×Nt`` scores of every pair."""
        return self.combine(self.embed_image(image)[:, None, :], self.embed_text(text)[None])

    def region_pair_scores(self, image_part, text_part, columns) -> torch.Tensor:
        """Parts ``B×R×H`` (images) and ``S×H`` (texts), candidate images ``S×C`` →
        ``S×C×R``: text s against every region of image ``columns[s, c]``."""
        return self.combine(image_part[columns], text_part[:, None, None])

    def metrics(self) -> dict[str, torch.Tensor]:
        """The critic's own scalars worth logging (a learnt temperature)."""
        return {}

    @torch.no_grad()
    def inactive_fraction(self, image_part, text_part) -> torch.Tensor | None:
        """Fraction of hidden units that are zero on every pair given (dead ReLUs), or None
        for critics without such units."""
        return None


class ConcatCritic(Critic):
    """Liao et al.'s discriminator: MLP on ``cat(x, y)`` (``[Dx+Dy] → 1024 → 512 → 1``).

    The first layer is split into an image and a text part, ``W [x; y] + c = (W_x x + c) +
    W_y y``, computed once per image or text and added per pair.
    """

    def __init__(self, image_dim: int, text_dim: int, hidden_dims=(1024, 512), activation="relu"):
        super().__init__()
        hidden_dims = list(hidden_dims)
        if not hidden_dims:
            raise ValueError("critic hidden_dims must list at least one width")
        if activation not in ACTIVATIONS:
            raise ValueError(f"critic activation must be one of {tuple(ACTIVATIONS)}")
        self.image_in = nn.Linear(image_dim, hidden_dims[0])
        self.text_in = nn.Linear(text_dim, hidden_dims[0], bias=False)
        self.rest = nn.Sequential(
            ACTIVATIONS[activation](), *_mlp([*hidden_dims, 1], activation, False)
        )

    def first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The equivalent unsplit first layer: weight ``H×(Dx+Dy)`` and bias."""
        return torch.cat([self.image_in.weight, self.text_in.weight], 1), self.image_in.bias

    def embed_image(self, x):
        return self.image_in(x)

    def embed_text(self, y):
        return self.text_in(y)

    def combine(self, image_part, text_part):
        return self.rest(image_part + text_part).squeeze(-1)

    @torch.no_grad()
    def inactive_fraction(self, image_part, text_part):
        hidden = (image_part + text_part).reshape(-1, image_part.shape[-1])
        dead, total = 0, 0
        for layer in self.rest:
            hidden = layer(hidden)
            if isinstance(layer, (nn.ReLU, nn.LeakyReLU)):
                dead += int((hidden <= 0).all(0).sum())
                total += hidden.shape[-1]
        return torch.tensor(dead / max(total, 1))


class SeparableCritic(Critic):
    """``T(x, y) = <f(x), g(y)> / τ`` (Poole et al. 2019's separable critic; with
    ``normalize`` a cosine over a temperature, as in CLIP, Radford et al. 2021)."""

    def __init__(self, image_dim: int, text_dim: int, cfg: CriticConfig):
        super().__init__()
        hidden = cfg.widths()
        self.image_net = _mlp([image_dim, *hidden, cfg.dim], cfg.activation, False)
        self.text_net = _mlp([text_dim, *hidden, cfg.dim], cfg.activation, False)
        self.normalize = cfg.normalize
        if cfg.temperature <= 0:
            raise ValueError("critic temperature must be positive")
        # A module, called for the scale, not a parameter read directly: under ZeRO-3 a
        # parameter is gathered only inside its owner's forward (and this one is also read
        # in the checkpointed recomputation during backward). Clamped at 100 as CLIP's
        # logit scale, so the scores stay finite.
        self.logit_scale = LogitScale(init=-math.log(cfg.temperature), max_log=math.log(100.0))
        self.logit_scale.log_scale.requires_grad_(cfg.learn_temperature)

    def _embed(self, net, v):
        v = net(v)
        return nn.functional.normalize(v, dim=-1) if self.normalize else v

    def embed_image(self, x):
        return self._embed(self.image_net, x)

    def embed_text(self, y):
        return self._embed(self.text_net, y)

    def scale(self) -> torch.Tensor:
        return self.logit_scale()

    def combine(self, image_part, text_part):
        return (image_part * text_part).sum(-1) * self.scale()

    def metrics(self):
        return {"critic_scale": self.scale().detach()}

    def region_pair_scores(self, image_part, text_part, columns):
        # One matmul for every (text, image, region), then the candidates picked: never
        # materialises the S×C×R×H products that the generic path builds.
        every = torch.einsum("sh,brh->sbr", text_part, image_part) * self.scale()
        return every.gather(1, columns[..., None].expand(-1, -1, every.shape[-1]))


def build_critic(cfg: CriticConfig, image_dim: int, text_dim: int, where: str) -> Critic:
    if cfg.kind == "concat":
        return ConcatCritic(image_dim, text_dim, cfg.widths(), cfg.activation)
    if cfg.kind == "separable":
        return SeparableCritic(image_dim, text_dim, cfg)
    raise ValueError(f"{where}.critic must be one of {CRITICS}, got {cfg.kind!r}")


# --------------------------------------------------------------------------- global MI


@dataclass
class GlobalMIConfig:
    estimator: Literal["cpc", "mine"] = "cpc"
    critic: CriticConfig = field(default_factory=CriticConfig)
    image_key: str = "image_global"
    text_key: str = "report"
    #: take negative reports from all ranks (with gradient).
    gather: bool = True


@register("objective", "global_mi", config=GlobalMIConfig)
class GlobalMIObjective(Objective):
    """Liao et al. 2021 global MI between image and report features."""

    def __init__(self, config: GlobalMIConfig, dims: FeatureDims):
        super().__init__(config, dims)
        if config.estimator not in ESTIMATORS:
            raise ValueError(f"global_mi.estimator must be one of {ESTIMATORS}")
        widths = {"image_global": dims.embed_dim, "report": dims.embed_dim}
        for key in (config.image_key, config.text_key):
            if key not in widths:
                raise ValueError(f"global_mi: feature {key!r} is not one of {sorted(widths)}")
        self.critic = build_critic(
            config.critic, widths[config.image_key], widths[config.text_key], "global_mi"
        )

    @classmethod
    def features_needed(cls, config: GlobalMIConfig) -> frozenset[str]:
        return frozenset({config.image_key, config.text_key})

    def scorer(self) -> GlobalCriticScorer:
        kind = "sentence" if self.config.text_key == "sentence" else "report"
        return GlobalCriticScorer(self.critic, self.config.image_key, kind)

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        image, text = features[self.config.image_key], features[self.config.text_key]
        study = features["study_id"]
        gather = self.config.gather and distributed.world_size() > 1
        texts = distributed.gather_with_grad(text) if gather else text
        studies = distributed.gather_no_grad(study) if gather else study
        offset = distributed.rank_offset(image.shape[0], image.device) if gather else 0
        # Rows are this rank's images against every (gathered) report.
        image_part, text_part = self.critic.embed_image(image), self.critic.embed_text(texts)
        scores = self.critic.combine(image_part[:, None], text_part[None])
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
            metrics.update(self.critic.metrics())
            inactive = self.critic.inactive_fraction(image_part[:, None], text_part[None])
            if inactive is not None:
                metrics["critic_inactive_units"] = inactive
            # Spread of a text's scores across images vs an image's scores across texts: a
            # critic that ignores one side has (near) zero spread along it.
            metrics["spread_across_images"] = scores.std(0).mean()
            metrics["spread_across_texts"] = scores.std(1).mean()
        return ObjectiveOutput({"mi": -bound}, metrics)


def _score_metrics(scores, positive, negative, bound) -> dict[str, torch.Tensor]:
    """What tells a user whether the critic learns (logged to TensorBoard every step).

    ``score_gap`` (mean positive − mean negative score) and ``top1`` (the positive scores
    highest among a row's candidates; chance is 1 / candidates) stay at 0 and chance when
    the critic has collapsed to a function of one side only.
    """
    candidates = scores.masked_fill(~(positive | negative), -math.inf)
    hit = (candidates.argmax(1)[:, None] == positive.nonzero()[:, 1].view(-1, 1)).float()
    positive_score, negative_score = scores[positive].mean(), scores[negative].mean()
    return {
        "bound": bound.detach(),
        "positive_score": positive_score.detach(),
        "negative_score": negative_score.detach(),
        "score_gap": (positive_score - negative_score).detach(),
        "top1": hit.mean(),
        "top1_chance": (1.0 / (positive | negative).sum(1).float()).mean(),
    }


# --------------------------------------------------------------------------- local MI


@dataclass
class LocalMIConfig:
    estimator: Literal["cpc", "mine"] = "cpc"
    critic: CriticConfig = field(default_factory=CriticConfig)
    #: negative images per sentence, drawn at random among images of other studies in the
    #: (gathered) batch; -1 uses all of them.
    num_negatives: int = -1
    #: how a sentence's region scores on one image become its image score: ``max`` (Liao
    #: et al. Eq. 5; only the best region gets gradient), ``mean``, or ``logsumexp`` (a
    #: smooth max, ``t · log mean_r exp(T_r / t)`` with ``t = region_temperature``; every
    #: region gets gradient in proportion to its softmax weight). Each is a fixed function
    #: of (image, sentence), so the bounds stay valid.
    region_pool: Literal["max", "mean", "logsumexp"] = "logsumexp"
    region_temperature: float = 1.0
    #: critic evaluations (sentence × image × region) held in memory at once.
    chunk_size: int = 8192
    #: take negative images from all ranks (with gradient).
    gather: bool = True


@register("objective", "local_mi", config=LocalMIConfig)
class LocalMIObjective(Objective):
    """Liao et al. 2021 local MI (Eq. 5): max-over-regions sentence–region critic."""

    def __init__(self, config: LocalMIConfig, dims: FeatureDims):
        super().__init__(config, dims)
        if config.estimator not in ESTIMATORS:
            raise ValueError(f"local_mi.estimator must be one of {ESTIMATORS}")
        if config.chunk_size < 1:
            raise ValueError("local_mi.chunk_size must be positive")
        self.critic = build_critic(config.critic, dims.local_dim, dims.sentence_dim, "local_mi")

    @classmethod
    def features_needed(cls, config: LocalMIConfig) -> frozenset[str]:
        return frozenset({"image_local", "sentence"})

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
        image_part = self.critic.embed_image(local)  # B×R×H
        text_part = self.critic.embed_text(sentence[valid])  # S×H
        rows = index[valid]
        step = self._sentences_per_chunk(local.shape[1])
        chunks = [
            self.critic.combine(image_part[rows[i : i + step]], text_part[i : i + step, None])
            for i in range(0, rows.shape[0], step)
        ]
        out[valid] = torch.cat(chunks, 0).to(out.dtype)
        return out

    def scorer(self) -> LocalCriticScorer:
        cfg = self.config
        return LocalCriticScorer(
            self.region_scores,
            lambda regions: pool_regions(regions, cfg.region_pool, cfg.region_temperature),
            f"local MI critic ({cfg.critic.kind}), {cfg.region_pool} over regions",
        )

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

    def _all_region_scores(self, image_part, text_part, columns) -> torch.Tensor:
        """Scores ``S×C×R`` of each sentence with every region of each candidate image,
        without autograd (the max-over-regions selection and the collapse metrics)."""
        regions = image_part.shape[1]
        step = self._sentences_per_chunk(columns.shape[1] * regions)
        out = []
        with torch.no_grad():
            for i in range(0, columns.shape[0], step):
                out.append(
                    self.critic.region_pair_scores(
                        image_part, text_part[i : i + step], columns[i : i + step]
                    )
                )
        return torch.cat(out, 0)

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

    def _pooled_scores(self, image_part, text_part, columns) -> torch.Tensor:
        """Scores ``S×C`` pooled over every region (``mean`` or ``logsumexp``), with
        autograd, chunked and checkpointed like :meth:`_selected_scores`."""
        step = self._sentences_per_chunk(columns.shape[1] * image_part.shape[1])
        chunks = []
        for i in range(0, columns.shape[0], step):
            args = (image_part, text_part[i : i + step], columns[i : i + step])
            if torch.is_grad_enabled():
                chunks.append(checkpoint(self._pool_chunk, *args, use_reentrant=False))
            else:
                chunks.append(self._pool_chunk(*args))
        return torch.cat(chunks, 0)

    def _pool_chunk(self, image_part, text_part, columns):
        regions = self.critic.region_pair_scores(image_part, text_part, columns)  # S×C×R
        return pool_regions(regions, self.config.region_pool, self.config.region_temperature)

    def _score_chunk(self, image_part, text_part, columns, best):
        return self.critic.combine(image_part[columns, best], text_part[:, None])

    # -- objective ------------------------------------------------------------------------

    def scores(self, features: dict, with_parts: bool = False):
        """Critic scores ``S×C`` of each valid sentence with its own image (column 0) and
        its candidate negative images, plus the masks and the chosen regions (and, with
        ``with_parts``, the critic's image and text parts and the candidate columns)."""
        valid = valid_sentences(features)
        local, study = features["image_local"], features["study_id"]
        sentence = features["sentence"][valid]
        index = features["sentence_index"][valid]
        gather = self.config.gather and distributed.world_size() > 1
        locals_all = distributed.gather_with_grad(local) if gather else local
        studies = distributed.gather_no_grad(study) if gather else study
        offset = distributed.rank_offset(local.shape[0], local.device) if gather else 0

        columns, negative = self._candidates(index + offset, study[index], studies)
        image_part = self.critic.embed_image(locals_all)  # B_all×R×H, computed once
        text_part = self.critic.embed_text(sentence)  # S×H, computed once
        best = self._all_region_scores(image_part, text_part, columns).argmax(-1)
        if self.config.region_pool == "max":
            scores = self._selected_scores(image_part, text_part, columns, best)
        else:
            scores = self._pooled_scores(image_part, text_part, columns)
        positive = torch.zeros_like(negative)
        positive[:, 0] = True
        if with_parts:
            return scores, positive, negative, best, (image_part, text_part, columns)
        return scores, positive, negative, best

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        valid = valid_sentences(features)
        anchors = (features["image_local"], features["sentence"])
        if not bool(valid.any()):
            return ObjectiveOutput({"mi": zero_loss(*anchors, *self.critic.parameters())}, {})
        scores, positive, negative, best, parts = self.scores(features, with_parts=True)
        if not bool(negative.any()):
            return ObjectiveOutput({"mi": zero_loss(scores, *anchors)}, {})
        bound = mi_bound(self.config.estimator, scores, positive, negative)
        with torch.no_grad():
            metrics = _score_metrics(scores, positive, negative, bound)
            metrics.update(self.critic.metrics())
            metrics.update(_local_collapse_metrics(self.critic, best, parts))
        return ObjectiveOutput({"mi": -bound}, metrics)


def pool_regions(scores: torch.Tensor, how: str, temperature: float = 1.0) -> torch.Tensor:
    """Region scores ``...×R`` → image scores ``...`` (see ``LocalMIConfig.region_pool``)."""
    if how == "max":
        return scores.amax(-1)
    if how == "mean":
        return scores.mean(-1)
    if how == "logsumexp":
        t = temperature
        return t * (torch.logsumexp(scores / t, -1) - math.log(scores.shape[-1]))
    raise ValueError(f"region_pool must be max, mean or logsumexp, got {how!r}")


def _local_collapse_metrics(critic, best, parts, probe_images: int = 4) -> dict:
    """Signs of a critic collapsed to an image-only saliency map (logged every step).

    On the first ``probe_images`` images, every sentence of the batch is scored on every
    region. ``spread_across_regions``: std over the regions, for one sentence and image;
    ``spread_across_sentences``: std over the sentences, for one image and region. A map
    that ignores the sentence has ``spread_ratio`` (regions / sentences) far above 1.
    ``critic_inactive_units``: hidden units of a concatenation critic that are zero on
    every pair the bound is built from (dead ReLUs).
    """
    image_part, text_part, columns = parts
    image_part, text_part = image_part.detach(), text_part.detach()
    probe = critic.combine(image_part[None, :probe_images], text_part[:, None, None])  # S×b×R
    zero = probe.new_zeros(())
    regions = probe.std(2).mean() if probe.shape[2] > 1 else zero
    sentences = probe.std(0).mean() if probe.shape[0] > 1 else zero
    metrics = {
        "spread_across_regions": regions,
        "spread_across_sentences": sentences,
        "spread_ratio": regions / sentences.clamp_min(1e-12),
    }
    picked = image_part[columns, best]  # S×C×H: the pairs the bound is built from
    inactive = critic.inactive_fraction(picked, text_part[:, None])
    if inactive is not None:
        metrics["critic_inactive_units"] = inactive
    return metrics
