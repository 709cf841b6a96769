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


def _attended_contexts(words: torch.Tensor, regions: torch.Tensor, attention_temperature: float):
    """Words ``…×L×D`` and regions ``…×R×D`` (leading dimensions broadcast) →
    (attention ``a_lr`` …×L×R, ``cos(w_l, v_l)`` …×L) with ``v_l = Σ_r a_lr c_r``.

    ``cos(w, v) = (Σ_r a_r w·c_r) / ‖Σ_r a_r c_r‖`` with ‖w‖ = 1, and ``‖v‖² = aᵀ(C Cᵀ)a``,
    so no tensor of contexts (…×L×D) is materialised."""
    w = F.normalize(words.float(), dim=-1)
    c = F.normalize(regions.float(), dim=-1)
    similarity = w @ c.transpose(-1, -2)  # cos(w_l, c_r)
    attention = torch.softmax(attention_temperature * similarity, dim=-1)
    gram = c @ c.transpose(-1, -2)
    norm_sq = ((attention @ gram) * attention).sum(-1)
    cosine = (attention * similarity).sum(-1) / norm_sq.clamp_min(1e-12).sqrt()
    return attention, cosine


def region_word_scores(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    regions: torch.Tensor,
    attention_temperature: float,
    word_temperature: float,
) -> torch.Tensor:
    """``R(i, j)`` of the module docstring for every report i and image j: ``Bt×Bi``.

    ``words`` Bt×L×D with ``word_mask`` Bt×L; ``regions`` Bi×R×D."""
    _, cosine = _attended_contexts(words[:, None], regions[None], attention_temperature)
    logits = (word_temperature * cosine).masked_fill(~word_mask[:, None, :], float("-inf"))
    return torch.logsumexp(logits, dim=-1) / word_temperature


def word_region_maps(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    regions: torch.Tensor,
    attention_temperature: float,
    word_temperature: float,
) -> torch.Tensor:
    """Where text t looks in its own image t: ``T×R`` region weights (each row sums to 1).

    ``words`` T×L×D with ``word_mask`` T×L; ``regions`` T×R×D (the image of each text).
    The map is the attention ``a_tlr`` of the module docstring averaged over the words with
    the weights the smooth maximum gives them, ``softmax_l(γ2 · cos(w_tl, v_tl))`` (the
    gradient of ``R`` with respect to each word's term): the regions the score ``R(t, t)``
    is made of. GLoRIA localises with the same word-attention maps (Huang et al. 2021,
    §4.4); a text without words gives a uniform map."""
    attention, cosine = _attended_contexts(words, regions, attention_temperature)
    logits = (word_temperature * cosine).masked_fill(~word_mask, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row of -inf: no words
    maps = torch.einsum("tl,tlr->tr", weights, attention)
    empty = ~word_mask.any(1)
    return torch.where(empty[:, None], torch.full_like(maps, 1 / maps.shape[1]), maps)


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

    def scorer(self):
        from vlp.objectives.scoring import WordRegionScorer

        return WordRegionScorer(
            self.config.attention_temperature,
            self.config.word_temperature,
            self.config.logit_scale,
        )


# ---------------------------------------------------------------- Med-ST's weighted variant


@dataclass
class WeightedLocalAlignmentConfig:
    #: image feature with the patches: ``image_local`` (B×R×D, D = ``model.word_dim``).
    image_key: str = "image_local"
    #: τ of the token attention and of the token-level InfoNCE (MGCA / Med-ST: 0.1).
    temperature: float = 0.1
    #: leave out the patches of a view a study does not have (the layout's segments and the
    #: batch's ``view_mask``); Med-ST keeps them (see the docstring of this section).
    mask_absent_views: bool = True

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


def present_tokens(layout, batch: dict, n_tokens: int, device) -> torch.Tensor:
    """B×R bool: which local tokens belong to a view that the study has at that time step.

    ``layout`` is the encoding's tuple of ``TokenSegment``; tokens outside every segment
    count as present."""
    from vlp.data.batch import batch_view_mask  # the batch contract's accessor

    b = len(batch["keys"])
    present = torch.ones(b, n_tokens, dtype=torch.bool, device=device)
    for segment in layout or ():
        count = int(segment.grid[0]) * int(segment.grid[1])
        mask = batch_view_mask(batch, segment.view, segment.time).to(device)
        present[:, segment.start : segment.start + count] &= mask[:, None]
    return present


def weighted_token_infonce(
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    keys: torch.Tensor,
    key_mask: torch.Tensor,
    weighting: torch.nn.MultiheadAttention,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction of Med-ST's token loss, per sample: ``(loss B, weights B×Lq)``.

    Every query token attends over the same sample's key tokens (``softmax(q·kᵀ/τ)``), giving
    its attended context c; the queries and their contexts are contrasted within the sample
    (``q_l·c_mᵀ/τ``, target m = l, rows and columns), each query's term weighted by
    ``weighting``'s attention of the mean of ``a = norm(q ⊙ norm(c))`` over the ``a``."""
    q = F.normalize(queries.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    attention = (q @ k.transpose(1, 2)) / temperature
    attention = torch.softmax(attention.masked_fill(~key_mask[:, None, :], float("-inf")), -1)
    context = F.normalize(attention @ k, dim=-1)  # B×Lq×D
    a = F.normalize(q * context, dim=-1)
    counts = query_mask.sum(1, keepdim=True).clamp_min(1)
    mean = (a * query_mask[..., None]).sum(1, keepdim=True) / counts[..., None]
    _, weights = weighting(mean, a, a, key_padding_mask=~query_mask, need_weights=True)
    weights = weights.squeeze(1) * query_mask
    weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
    logits = (q @ context.transpose(1, 2)) / temperature  # B×Lq×Lq
    pair = query_mask[:, :, None] & query_mask[:, None, :]
    # A finite fill, not -inf: padded rows then stay finite (and get zero gradient) instead
    # of giving NaN gradients through the logsumexp of an all -inf row.
    logits = logits.masked_fill(~pair, torch.finfo(logits.dtype).min)
    diagonal = torch.diagonal(logits, dim1=1, dim2=2)
    # -log softmax at the diagonal, over each row (query → contexts) and each column.
    rows = torch.logsumexp(logits, 2) - diagonal
    cols = torch.logsumexp(logits, 1) - diagonal
    per_token = torch.where(query_mask, (rows + cols) / 2, torch.zeros_like(rows))
    return (weights * per_token).sum(1), weights


@register("objective", "weighted_local_alignment", config=WeightedLocalAlignmentConfig)
class WeightedLocalAlignmentObjective(Objective):
    """Med-ST's modality-weighted local alignment (Yang et al., ICML 2024, §3.2, after MGCA).

    Word → patch and patch → word, each a token-level InfoNCE *within* a sample (module
    function :func:`weighted_token_infonce`): a word is told apart from the sample's other
    words by the patches it attends to, a patch from the other patches by the words it
    attends to. Each token's term is weighted by a learned single-head attention (one
    ``nn.MultiheadAttention`` per modality) of the mean of ``norm(token ⊙ norm(context))``
    over the tokens, renormalised over the sample's real tokens, so the loss learns which
    words and patches carry the pairing. The two modalities' losses are averaged, as is the
    batch.

    Where paper and code differ or are silent, and what we follow:

    * MGCA weights words by the text encoder's [CLS] attention and patches by the ViT's,
      clipped to percentiles; Med-ST replaces both by the learned attention above, which we
      follow. The weights are trained by this loss itself (they are not detached), as in
      Med-ST: they may concentrate on the tokens that are easiest to pair.
    * MedST's code feeds a study's lateral patches to this loss even when the study has no
      lateral (zero image, masked keys); with ``mask_absent_views`` (default) we leave the
      patches of absent views out of both directions, so a frontal-only study is scored on
      its frontal patches alone. ``mask_absent_views: false`` follows the code.
    * Words are the text encoder's tokens (``report_words``: no [CLS], [SEP] or padding);
      MedST sums WordPiece pieces into words first.
    * Each direction averages its row (token → contexts) and column (context → tokens)
      cross-entropies.
    """

    def __init__(self, config: WeightedLocalAlignmentConfig, dims):
        super().__init__(config, dims)
        width = dims.local_dim
        self.word_weighting = torch.nn.MultiheadAttention(width, 1, batch_first=True)
        self.patch_weighting = torch.nn.MultiheadAttention(width, 1, batch_first=True)

    @classmethod
    def features_needed(cls, config: WeightedLocalAlignmentConfig) -> frozenset[str]:
        layout = config.image_key.removesuffix("_local") + "_layout"
        return frozenset({config.image_key, layout, "report_words", "report_word_mask"})

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        patches = features[self.config.image_key]
        words, word_mask = features["report_words"], features["report_word_mask"]
        if words.shape[-1] != patches.shape[-1]:
            raise ValueError(
                f"weighted_local_alignment: report words are {words.shape[-1]}-d but "
                f"{self.config.image_key} is {patches.shape[-1]}-d; set model.word_dim to "
                "model.local_dim"
            )
        patch_mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        if self.config.mask_absent_views:
            layout = features.get(self.config.image_key.removesuffix("_local") + "_layout")
            patch_mask = present_tokens(layout, batch, patches.shape[1], patches.device)
        keep = (word_mask.any(1) & patch_mask.any(1)).nonzero().squeeze(1)
        if len(keep) == 0:
            return ObjectiveOutput({"local": zero_loss(words, patches)})
        words, word_mask = words[keep], word_mask[keep]
        patches, patch_mask = patches[keep], patch_mask[keep]
        tau = self.config.temperature
        word_loss, word_weights = weighted_token_infonce(
            words, word_mask, patches, patch_mask, self.word_weighting, tau
        )
        patch_loss, _ = weighted_token_infonce(
            patches, patch_mask, words, word_mask, self.patch_weighting, tau
        )
        loss = (word_loss.mean() + patch_loss.mean()) / 2
        with torch.no_grad():
            # How concentrated the word weights are: 1 = uniform over the real words.
            entropy = -(word_weights * word_weights.clamp_min(1e-12).log()).sum(1)
            uniform = word_mask.sum(1).float().clamp_min(2).log()
            metrics = {
                "word_loss": word_loss.mean(),
                "patch_loss": patch_loss.mean(),
                "word_weight_entropy_ratio": (entropy / uniform).mean(),
            }
        return ObjectiveOutput({"local": loss}, metrics)
