"""MoPoE: the generalized multimodal ELBO over frontal image, lateral image and report.

Sutter, Daunhawer & Vogt, "Generalized Multimodal ELBO", ICLR 2021 (MoPoE-VAE; code
thomassutter/MoPoE), applied to MIMIC-CXR by Klug, Sutter et al. (code Jimmy2027/MoPoE-MIMIC:
modalities ``PA``, ``Lateral``, ``text``). The model's encoders give one global feature per
modality (``image_global``, ``lateral_global``, ``report``); this objective owns the rest of
the VAE:

* **Experts.** Per modality m a Gaussian head maps the feature to ``(μ_m, log σ²_m)`` of a
  ``latent_dim`` latent (MoPoE's ``LinearFeatureCompressor``: two linear maps).
* **Subsets.** For each sample, every non-empty subset S of its *present* modalities
  (frontal and lateral from ``view_mask`` at t = 0, the report always): 7 subsets with a
  lateral, 3 without. A lateral-less study therefore never conditions on the zeros the
  lateral encoder saw, and is not asked to reconstruct them.
* **Product of experts** per subset, as MoPoE's ``poe`` (``joint_elbo`` mode, *no prior
  expert*): ``T_k = 1 / (exp(log σ²_k) + 1e-8)``, ``μ_S = Σ μ_k T_k / Σ T_k``,
  ``σ²_S = 1 / Σ T_k``.
* **Mixture** of the subset posteriors with uniform weights ``w_S = 1 / |subsets of the
  sample|``; its KL to N(0, I) is bounded, as in MoPoE's ``divergence_static_prior``, by
  ``Σ_S w_S KL(q_S ‖ N(0, I))`` (closed form per subset, summed over latent dimensions).
* **Reconstruction.** One subset is drawn per sample, uniformly among its present subsets,
  z is reparameterised from it, and every present modality is decoded from z:
  image decoders (linear → 4×4 → transposed convolutions doubling the side → one
  ``decoder_size``² channel; target = the input view at ``decoder_size``, in [0, 1]) scored
  by a **Laplace** likelihood, the text decoder (z plus learned position embeddings → an
  MLP per position → logits over the tokenizer's vocabulary) by a **categorical**
  likelihood on the first ``max_text_tokens`` report tokens where the attention mask is 1.
  Negative log-likelihoods are summed over pixels / tokens and latent dimensions, and
  averaged over the batch (MoPoE: ``log_prob(...).sum() / batch_size``).
* **Loss** ``Σ_m w_m NLL_m + β KL`` (MoPoE's ``calc_joint_elbo_loss`` with no style
  latents), returned as the losses ``rec_frontal``, ``rec_lateral``, ``rec_text`` (weighted)
  and ``kl`` (times β).

Where the papers, the code and this module differ, and what was followed:

* **Mixture sampling.** MoPoE's ``mixture_component_selection`` gives subset k a
  *contiguous block* of ⌊B·w_k⌋ batch rows (the same rows every step; MoPoE issue #3 asks
  why it is not sampled). Here each sample draws its subset uniformly among its *own*
  present subsets (``torch.multinomial`` on the trainer's RNG, so resume stays exact):
  an unbiased one-sample estimate of the mixture's expected log-likelihood, which also
  works when samples have different modality sets.
* **Missing modalities.** MoPoE's MIMIC data keeps only studies with all three; here a
  study without a lateral trains on its 3 subsets (F, T, F+T).
* **β.** The ELBO of the paper weighs the KL by 1; the code multiplies it by ``beta``,
  default 5 in ``BaseFlags`` — followed (``beta = 5.0``).
* **Laplace scale.** MoPoE's ``DecoderImg`` returns a *fixed* scale 0.75 ("consider
  learning scale param, too"). Default: fixed 0.75 (``image_scale``);
  ``learn_image_scale: true`` learns one log-scale per image modality instead, started
  at ``image_scale``. The decoder mean has no output activation, as MoPoE's last
  ``ConvTranspose2d``.
* **Reconstruction weights.** 1/3 each (the flags' defaults in ``BaseFlags``). The MIMIC
  experiment's ``set_rec_weights`` overrides them by data size (images 1, text
  128²/(1024·|alphabet|)); set ``rec_weights`` to reproduce that.
* **Decoders.** MoPoE-MIMIC's image decoder is a residual transposed-convolution stack with
  batch norm at 128 px; its text decoder a transposed 1-D convolution stack over 1024
  characters. Here: a plain transposed-convolution stack with *group* norm (per sample, so
  an absent lateral's decoded zeros cannot leak into other samples' gradients through batch
  statistics) and a word-piece text decoder over the text encoder's tokenizer.
* **Encoders** are the recipe's towers and projection heads (MoPoE trains its own
  convolutional encoders); latent ``latent_dim = 64`` is MoPoE-MIMIC's config
  (``class_dim``; ``BaseFlags`` says 20); there are no modality-specific style latents
  (MoPoE-MIMIC's style dims are 0).

The evaluator ``subset-probe`` (``vlp/evaluation/subset_probe.py``) reads the public
methods: :meth:`MoPoEObjective.experts`, :meth:`~MoPoEObjective.presence`,
:meth:`~MoPoEObjective.subset_posterior`, :meth:`~MoPoEObjective.decode_image`,
:meth:`~MoPoEObjective.decode_text` and :meth:`~MoPoEObjective.image_target`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlp.data.batch import batch_images, batch_view_mask, current_text
from vlp.data.requirements import Requirements
from vlp.data.schema import check_view
from vlp.models.decoders import ImageDecoder, image_target
from vlp.objectives.base import FeatureDims, Objective, ObjectiveOutput
from vlp.registry import register

#: the modalities, in the order of every per-modality tensor (``present`` columns).
MODALITIES = ("frontal", "lateral", "text")
#: one letter per modality for subset names (``F+L+T``).
INITIALS = {"frontal": "F", "lateral": "L", "text": "T"}
#: MoPoE's ``poe`` adds this to each expert's variance before inverting it.
POE_EPS = 1e-8


def all_subsets(modalities=MODALITIES) -> list[tuple[str, ...]]:
    """Every non-empty subset, by size then modality order: F, L, T, F+L, F+T, L+T, F+L+T."""
    return [
        combo
        for size in range(1, len(modalities) + 1)
        for combo in itertools.combinations(modalities, size)
    ]


#: the 7 subsets of the three modalities, in table order.
SUBSETS = tuple(all_subsets())


def subset_name(subset) -> str:
    """``("frontal", "text")`` → ``"F+T"``."""
    return "+".join(INITIALS[m] for m in subset)


def subset_mask(present: torch.Tensor, subsets=SUBSETS) -> torch.Tensor:
    """bool ``B×S``: subset s is one of sample b's subsets (all its members present).

    ``present`` is bool ``B×M`` over :data:`MODALITIES`."""
    columns = [
        torch.stack([present[:, MODALITIES.index(m)] for m in subset], 1).all(1)
        for subset in subsets
    ]
    return torch.stack(columns, 1)


def product_of_experts(
    mu: torch.Tensor, logvar: torch.Tensor, members: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PoE of the experts selected by ``members``, MoPoE's ``poe`` without a prior expert.

    ``mu``, ``logvar``: ``M×B×D`` experts; ``members``: bool ``M`` (one subset for all
    rows) or ``M×B`` (per row). Returns ``(μ, log σ²)`` ``B×D``. A row with no member gets
    a zero precision sum, i.e. an infinite variance: callers select rows that have one.
    """
    weight = members.to(mu.dtype)
    while weight.dim() < mu.dim():
        weight = weight[..., None]
    precision = weight / (torch.exp(logvar) + POE_EPS)
    total = precision.sum(0)
    mean = (mu * precision).sum(0) / total
    return mean, -torch.log(total)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) summed over the last dimension."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)


def mixture_kl(mu: torch.Tensor, logvar: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``B``: ``Σ_S w_S KL(q_S ‖ N(0, I))`` with ``w`` uniform over each row's valid subsets.

    ``mu``, ``logvar``: ``B×S×D`` subset posteriors; ``valid``: bool ``B×S``. Invalid
    subsets get weight 0 (their posteriors are finite, so they pass no gradient)."""
    weights = valid.to(mu.dtype)
    weights = weights / weights.sum(1, keepdim=True)
    return (weights * kl_standard_normal(mu, logvar)).sum(1)


@dataclass
class RecWeights:
    """Weight of each modality's negative log-likelihood in the loss."""

    frontal: float = 1.0 / 3.0
    lateral: float = 1.0 / 3.0
    text: float = 1.0 / 3.0

    def validate(self) -> None:
        for name in MODALITIES:
            if getattr(self, name) < 0:
                raise ValueError(f"rec_weights.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class MoPoEConfig:
    #: feature keys of the three experts' inputs (the encoders' projected globals).
    frontal_feature: str = "image_global"
    lateral_feature: str = "lateral_global"
    text_feature: str = "report"
    #: batch views of the two image modalities: presence (``view_mask``) and targets.
    frontal_view: str = "frontal"
    lateral_view: str = "lateral"
    #: width of the shared latent (MoPoE-MIMIC's ``class_dim`` 64).
    latent_dim: int = 64
    #: KL weight β (MoPoE's ``BaseFlags`` default 5).
    beta: float = 5.0
    rec_weights: RecWeights = field(default_factory=RecWeights)
    #: side of the decoded images (4·2^k); targets are the views resized to it (MoPoE 128).
    decoder_size: int = 128
    #: channels of the last transposed convolution; doubled per layer back to the 4×4 start,
    #: at most 8× this.
    decoder_width: int = 32
    #: Laplace scale of the image likelihoods (MoPoE: fixed 0.75) ...
    image_scale: float = 0.75
    #: ... or learned (one log-scale per image modality, started at ``image_scale``).
    learn_image_scale: bool = False
    #: report token positions the text decoder predicts (from the first, [CLS]).
    max_text_tokens: int = 128
    #: size of the token vocabulary the decoder predicts: the MiniLM tokenizer's.
    vocab_size: int = 30522
    #: hidden width of the text decoder.
    text_decoder_dim: int = 256
    #: samples of the last batch drawn in the checkpoint figure (0 = no figure).
    figure_samples: int = 4

    def validate(self) -> None:
        check_view(self.frontal_view)
        check_view(self.lateral_view)
        if self.frontal_view == self.lateral_view:
            raise ValueError("frontal_view and lateral_view must differ")
        side, doublings = self.decoder_size, 0
        while side > 4 and side % 2 == 0:
            side, doublings = side // 2, doublings + 1
        if side != 4 or doublings < 1:
            raise ValueError(
                f"decoder_size must be 4·2^k with k >= 1 (8, 16, 32, 64, 128, ...), got "
                f"{self.decoder_size}"
            )
        for name in ("latent_dim", "decoder_width", "max_text_tokens", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.text_decoder_dim < 1:
            raise ValueError(f"text_decoder_dim must be >= 1, got {self.text_decoder_dim}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.image_scale <= 0:
            raise ValueError(f"image_scale must be > 0, got {self.image_scale}")
        if self.figure_samples < 0:
            raise ValueError(f"figure_samples must be >= 0, got {self.figure_samples}")


class GaussianHead(nn.Module):
    """feature → (μ, log σ²) of the latent."""

    def __init__(self, in_dim: int, latent_dim: int):
        super().__init__()
        self.mu = nn.Linear(in_dim, latent_dim)
        self.logvar = nn.Linear(in_dim, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(x), self.logvar(x)


class TextDecoder(nn.Module):
    """z → ``L×V`` token logits: z projected, plus a learned embedding per position, through
    a residual MLP per position, then one linear map to the vocabulary."""

    def __init__(self, latent_dim: int, length: int, dim: int, vocab: int):
        super().__init__()
        self.project = nn.Linear(latent_dim, dim)
        self.position = nn.Embedding(length, dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.out_norm = nn.LayerNorm(dim)
        self.vocab = nn.Linear(dim, vocab)

    def hidden(self, z: torch.Tensor, length: int) -> torch.Tensor:
        """``B×length×dim`` states before the vocabulary map."""
        positions = torch.arange(length, device=z.device)
        h = self.norm(self.project(z)[:, None] + self.position(positions)[None])
        return self.out_norm(h + self.mlp(h))

    def forward(self, z: torch.Tensor, length: int) -> torch.Tensor:
        return self.vocab(self.hidden(z, length))


class LogScale(nn.Module):
    """A learned log Laplace scale, read by calling the module (ZeRO-3 gathers it then)."""

    def __init__(self, init: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> torch.Tensor:
        return self.value


@register("objective", "mopoe", config=MoPoEConfig)
class MoPoEObjective(Objective):
    """The MoPoE-VAE loss over frontal, lateral and report (module docstring)."""

    def __init__(self, config: MoPoEConfig, dims: FeatureDims):
        super().__init__(config, dims)
        width, latent = dims.embed_dim, config.latent_dim
        self.heads = nn.ModuleDict({m: GaussianHead(width, latent) for m in MODALITIES})
        self.image_decoders = nn.ModuleDict(
            {
                m: ImageDecoder(latent, config.decoder_size, config.decoder_width)
                for m in ("frontal", "lateral")
            }
        )
        self.text_decoder = TextDecoder(
            latent, config.max_text_tokens, config.text_decoder_dim, config.vocab_size
        )
        self.log_scales = (
            nn.ModuleDict({m: LogScale(config.image_scale) for m in ("frontal", "lateral")})
            if config.learn_image_scale
            else None
        )
        self._last: dict[str, torch.Tensor] | None = None  # for the figure; not state

    # ------------------------------------------------------------------ declarations

    @classmethod
    def features_needed(cls, config: MoPoEConfig) -> frozenset[str]:
        return frozenset({config.frontal_feature, config.lateral_feature, config.text_feature})

    @classmethod
    def requirements(cls, config: MoPoEConfig) -> Requirements:
        # The two views are read from the batch here too (presence and targets).
        views = frozenset({config.frontal_view, config.lateral_view})
        return super().requirements(config) | Requirements(views=views, text=frozenset({"report"}))

    # ------------------------------------------------------------------ public pieces

    def feature_keys(self) -> dict[str, str]:
        c = self.config
        return {"frontal": c.frontal_feature, "lateral": c.lateral_feature, "text": c.text_feature}

    def experts(self, features: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """modality → ``(μ, log σ²)`` ``B×latent_dim`` of its unimodal posterior (computed
        for every row, present or not; :meth:`presence` says which rows count)."""
        out = {}
        for modality, key in self.feature_keys().items():
            if key not in features:
                raise KeyError(
                    f"objective mopoe: feature {key!r} ({modality}) is missing; the model's "
                    f"encoders give {sorted(k for k in features if not k.startswith('_'))}"
                )
            mu, logvar = self.heads[modality](features[key].to(self._dtype()))
            # The PoE inverts variances: in float32 whatever the training precision.
            out[modality] = (mu.float(), logvar.float())
        return out

    def presence(self, batch: dict) -> torch.Tensor:
        """bool ``B×3`` over :data:`MODALITIES`: frontal and lateral from ``view_mask`` at
        t = 0, the report always (every current study has its text)."""
        c = self.config
        for view in (c.frontal_view, c.lateral_view):
            if view not in batch.get("view_mask", {}):
                raise KeyError(
                    f"objective mopoe: the batch has no view_mask[{view!r}]; data.views must "
                    f"list {view!r}"
                )
        frontal = batch_view_mask(batch, c.frontal_view, 0).bool()
        lateral = batch_view_mask(batch, c.lateral_view, 0).bool()
        return torch.stack([frontal, lateral, torch.ones_like(frontal)], 1)

    @staticmethod
    def subset_posterior(
        experts: dict, subset, present: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, log σ²)`` of the product of the experts of ``subset`` (modality names).

        With ``present`` (bool ``B×3``) a member absent from a row is left out of that
        row's product; a row with no member present gets NaN (no prior expert: undefined).
        """
        unknown = [m for m in subset if m not in experts]
        if not subset or unknown:
            raise ValueError(
                f"subset_posterior: subset {tuple(subset)} must be a non-empty subset of "
                f"{tuple(experts)}"
            )
        mu = torch.stack([experts[m][0] for m in subset])
        logvar = torch.stack([experts[m][1] for m in subset])
        if present is None:
            members = torch.ones(len(subset), dtype=torch.bool, device=mu.device)
        else:
            members = torch.stack([present[:, MODALITIES.index(m)] for m in subset]).bool()
        mean, out = product_of_experts(mu, logvar, members)
        if present is not None:
            empty = ~members.any(0)
            mean = mean.masked_fill(empty[:, None], float("nan"))
            out = out.masked_fill(empty[:, None], float("nan"))
        return mean, out

    def subset_posteriors(self, experts: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, log σ²)`` ``B×7×D`` of every subset of :data:`SUBSETS`, each over all its
        members (rows where a member is absent are not that row's subsets: weight them 0)."""
        mu = torch.stack([experts[m][0] for m in MODALITIES])
        logvar = torch.stack([experts[m][1] for m in MODALITIES])
        means, logvars = [], []
        for subset in SUBSETS:
            members = torch.tensor([m in subset for m in MODALITIES], device=mu.device)
            m, lv = product_of_experts(mu, logvar, members)
            means.append(m)
            logvars.append(lv)
        return torch.stack(means, 1), torch.stack(logvars, 1)

    def kl(self, experts: dict, present: torch.Tensor) -> torch.Tensor:
        """``B``: ``Σ_S w_S KL(q_S ‖ N(0, I))`` over each row's own subsets, w uniform."""
        mu, logvar = self.subset_posteriors(experts)
        return mixture_kl(mu, logvar, subset_mask(present))

    def decode_image(self, z: torch.Tensor, view: str) -> torch.Tensor:
        """``B×1×s×s`` Laplace mean of modality ``view`` (``frontal`` or ``lateral``: the
        modality, whatever batch view it reads) given latents ``z``."""
        if view not in self.image_decoders:
            raise ValueError(f"decode_image: view must be 'frontal' or 'lateral', got {view!r}")
        return self.image_decoders[view](z.to(self._dtype())).float()

    def decode_text(self, z: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """``B×L×V`` token logits (L = ``max_text_tokens`` unless shorter is asked)."""
        length = self.config.max_text_tokens if length is None else length
        if not 1 <= length <= self.config.max_text_tokens:
            raise ValueError(f"decode_text: length must be 1..{self.config.max_text_tokens}")
        return self.text_decoder(z.to(self._dtype()), length).float()

    def image_target(self, batch: dict, modality: str) -> torch.Tensor:
        """The modality's input view at t = 0, scaled to [0, 1] and resized (area) to
        ``decoder_size``: ``B×1×s×s`` float."""
        view = self.config.frontal_view if modality == "frontal" else self.config.lateral_view
        return image_target(batch_images(batch, view, 0), self.config.decoder_size)

    def scale(self, modality: str, like: torch.Tensor) -> torch.Tensor:
        if self.log_scales is None:
            return torch.full((), self.config.image_scale, dtype=like.dtype, device=like.device)
        return self.log_scales[modality]().exp().to(like.dtype)

    def image_nll(self, mean: torch.Tensor, target: torch.Tensor, modality: str) -> torch.Tensor:
        """``B``: ``−log Laplace(target | mean, b)`` summed over pixels."""
        b = self.scale(modality, mean)
        per_pixel = torch.log(2 * b) + (target - mean).abs() / b
        return per_pixel.flatten(1).sum(1)

    def text_tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The current reports' first ``max_text_tokens`` ids and bool mask, checked
        against ``vocab_size``."""
        ids, mask, _ = current_text(batch, "report")
        ids, mask = ids[:, : self.config.max_text_tokens], mask[:, : self.config.max_text_tokens]
        mask = mask.bool()
        if bool(mask.any()):
            top = int(ids[mask].max())
            if top >= self.config.vocab_size or int(ids[mask].min()) < 0:
                raise ValueError(
                    f"objective mopoe: report_input_ids holds token id {top} (min "
                    f"{int(ids[mask].min())}), outside 0..{self.config.vocab_size - 1}; set "
                    "the objective's vocab_size to the text tokenizer's size (len(tokenizer))"
                )
        return ids, mask

    def text_nll(self, z: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``B``: categorical NLL of the tokens where ``mask``, summed over positions
        (padding never reaches the vocabulary map: only real positions are scored)."""
        hidden = self.text_decoder.hidden(z.to(self._dtype()), ids.shape[1])
        rows = mask.nonzero(as_tuple=True)
        nll = torch.zeros(z.shape[0], dtype=torch.float32, device=z.device)
        if rows[0].numel() == 0:  # no token: a zero that keeps the decoder in the graph
            return nll + 0.0 * hidden.float().sum()
        logits = self.text_decoder.vocab(hidden[rows])
        per_token = F.cross_entropy(logits.float(), ids[rows], reduction="none")
        return nll.index_add(0, rows[0], per_token)

    def _dtype(self) -> torch.dtype:
        """The objective's parameter dtype (float32, or bf16 under DeepSpeed bf16)."""
        return self.text_decoder.vocab.weight.dtype

    # ------------------------------------------------------------------ the loss

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        experts = self.experts(features)
        present = self.presence(batch)
        weights = self.config.rec_weights
        size = present.shape[0]
        mu, logvar = self.subset_posteriors(experts)
        valid = subset_mask(present)
        kl = mixture_kl(mu, logvar, valid)
        # One subset per sample, uniformly among its own (the trainer's RNG: resume is exact).
        chosen = torch.multinomial(valid.float(), 1).squeeze(1)
        rows = torch.arange(size, device=mu.device)
        mean, lv = mu[rows, chosen], logvar[rows, chosen]
        z = mean + torch.exp(0.5 * lv) * torch.randn_like(mean)
        nll = {}
        for modality in ("frontal", "lateral"):
            decoded = self.decode_image(z, modality)
            nll[modality] = self.image_nll(decoded, self.image_target(batch, modality), modality)
        ids, mask = self.text_tokens(batch)
        nll["text"] = self.text_nll(z, ids, mask)
        present_f = present.to(mu.dtype)
        losses = {}
        metrics = {}
        for k, modality in enumerate(MODALITIES):
            # An absent modality's term is multiplied by 0: no gradient from that sample.
            term = (nll[modality] * present_f[:, k]).sum() / size
            losses[f"rec_{modality}"] = getattr(weights, modality) * term
            count = present_f[:, k].sum()
            metrics[f"nll_{modality}"] = (term * size / count.clamp_min(1.0)).detach()
        kl_mean = kl.mean()
        losses["kl"] = self.config.beta * kl_mean
        metrics["kl"] = kl_mean.detach()
        metrics["lateral_present"] = present_f[:, 1].mean().detach()
        metrics["subsets_per_sample"] = valid.float().sum(1).mean().detach()
        if self.config.figure_samples and self.record_figures:
            self._remember(batch, experts, present)
        return ObjectiveOutput(losses, metrics)

    @torch.no_grad()
    def _remember(self, batch: dict, experts: dict, present: torch.Tensor) -> None:
        """Decoded images of the first samples for the checkpoint figure (decoded here,
        inside forward, where ZeRO-3 has the decoders' parameters gathered)."""
        n = min(self.config.figure_samples, present.shape[0])
        cut = {m: (mu[:n], lv[:n]) for m, (mu, lv) in experts.items()}
        joint, _ = self.subset_posterior(cut, MODALITIES, present[:n])
        text, _ = self.subset_posterior(cut, ("text",))
        frontal, _ = self.subset_posterior(cut, ("frontal",))
        lateral = self.image_target(batch, "lateral")[:n].float()
        absent = ~present[:n, 1]
        self._last = {
            "real frontal": self.image_target(batch, "frontal")[:n].float().cpu(),
            "frontal from its subsets' joint": self.decode_image(joint, "frontal").float().cpu(),
            "frontal from text": self.decode_image(text, "frontal").float().cpu(),
            "lateral from frontal": self.decode_image(frontal, "lateral").float().cpu(),
            "real lateral (grey: absent)": lateral.masked_fill(
                absent[:, None, None, None], float("nan")
            ).cpu(),
        }

    def write_figures(self, folder, step: int) -> list:
        if self._last is None:
            return []
        from vlp.objectives.figures import image_rows

        rows = {name: value[:, 0].clamp(0, 1).numpy() for name, value in self._last.items()}
        path = Path(folder) / f"mopoe_samples_step-{step}.png"
        return [image_rows(rows, path, f"MoPoE at step {step}: posterior means decoded")]
