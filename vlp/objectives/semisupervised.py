"""Semi-supervised severity grading with a generative image model (``m2``).

Liao et al., "Semi-supervised learning for quantification of pulmonary edema in chest
x-ray images", arXiv:1902.10785 (2019): a variational autoencoder of the radiograph in
which the edema severity is a partly observed latent variable, trained on every image
(log p(x)) and on the few with a severity label (log p(x, y)), in the manner of Kingma,
Rezende, Mohamed & Welling, "Semi-supervised Learning with Deep Generative Models",
NeurIPS 2014 (model M2):

* generative model ``p(y) = Cat(1/K)``, ``p(z) = N(0, I)``, ``p(x | y, z)`` a decoder;
* inference ``q(y | x)`` (the classifier) and ``q(z | x, y)``, both over the image
  encoder's global embedding (the model's CNN, so the reconstruction shapes its features);
* for a study with a known severity, ``L(x, y) = −log p(x | y, z) + KL(q(z|x,y) ‖ p(z))
  − log p(y)`` (one reparameterised z);
* for one without, ``U(x) = Σ_y q(y|x) L(x, y) − H(q(y|x))``, every class enumerated;
* ``J = [Σ_labelled L + w_u Σ_unlabelled U] / B + α Σ_labelled −log q(y|x) / B``, Kingma's
  ``J^α`` per batch. With every label observed it is the supervised M2 loss
  ``mean L + α mean CE`` (``tests/test_semisupervised.py``).

The image ``x`` is the encoder's view (after the loader's augmentation) resized to
``decoder_size`` pixels in [0, 1], with a Gaussian likelihood of fixed scale
``pixel_scale``. Liao et al. do not publish code; their encoder and decoder are deeper
CNNs on full-size images. Where Kingma et al. weight the classification term by
α = 0.1·N, the weight here is the recipe's ``alpha`` (the scale of a summed-pixel NLL
differs from theirs). The classifier ``q(y|x)`` is the objective's :meth:`predictor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlp.data.batch import batch_images
from vlp.data.requirements import Requirements
from vlp.models.decoders import ImageDecoder, image_target
from vlp.objectives.base import (
    FeatureDims,
    LabelPredictor,
    Objective,
    ObjectiveOutput,
    labelled_classes,
)
from vlp.registry import register


@dataclass
class M2Config:
    #: the image encoder whose global embedding represents x (``<encoder>_global``).
    encoder: str = "image"
    #: the view it reads, reconstructed by the decoder.
    view: str = "frontal"
    #: the partly observed categorical latent: a batch label field (-1 = unobserved).
    field: str = "edema_severity"
    classes: int = 4
    latent_dim: int = 16
    hidden_dim: int = 256
    #: side of the reconstructed image (4 times a power of 2) and the decoder's width.
    decoder_size: int = 32
    decoder_width: int = 16
    #: σ of the Gaussian likelihood of a [0, 1] pixel.
    pixel_scale: float = 0.1
    #: α: weight of −log q(y|x) on the labelled studies.
    alpha: float = 100.0
    #: w_u: weight of the unlabelled bound U(x); 0 trains on the labelled studies only.
    unlabeled_weight: float = 1.0


def gaussian_nll(target: torch.Tensor, mean: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-sample −log N(target; mean, scale²), summed over the pixels."""
    z = (target - mean) / scale
    per_pixel = 0.5 * z.square() + math.log(scale) + 0.5 * math.log(2 * math.pi)
    return per_pixel.flatten(1).sum(1)


@register("objective", "m2", config=M2Config)
class M2Objective(Objective):
    """Kingma et al.'s M2 with the severity as the partly observed class (module docstring)."""

    def __init__(self, config: M2Config, dims: FeatureDims):
        super().__init__(config, dims)
        if config.classes < 2:
            raise ValueError(f"m2.classes must be >= 2, got {config.classes}")
        if config.pixel_scale <= 0:
            raise ValueError(f"m2.pixel_scale must be > 0, got {config.pixel_scale}")
        width, k, latent = dims.embed_dim, config.classes, config.latent_dim
        self.classifier = nn.Linear(width, k)
        self.posterior = nn.Sequential(
            nn.Linear(width + k, config.hidden_dim),
            nn.ReLU(),
            nn.Linear(config.hidden_dim, 2 * latent),
        )
        self.decoder = ImageDecoder(latent + k, config.decoder_size, config.decoder_width)
        self._last: dict | None = None  # for the checkpoint figure; not state

    @classmethod
    def features_needed(cls, config: M2Config) -> frozenset[str]:
        return frozenset({f"{config.encoder}_global"})

    @classmethod
    def fields_needed(cls, config: M2Config) -> frozenset[str]:
        return frozenset({config.field})

    @classmethod
    def requirements(cls, config: M2Config) -> Requirements:
        return super().requirements(config) | Requirements(views=frozenset({config.view}))

    def bound(
        self, h: torch.Tensor, y: torch.Tensor, target: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-sample ``L(x, y)`` and its parts for embeddings ``h``, classes ``y`` and the
        reparameterisation noise: ``{"bound", "nll", "kl", "mean"}``."""
        onehot = F.one_hot(y, self.config.classes).to(h.dtype)
        mu, logvar = self.posterior(torch.cat([h, onehot], -1)).chunk(2, -1)
        z = mu + (0.5 * logvar).exp() * noise
        mean = self.decoder(torch.cat([z, onehot], -1))
        nll = gaussian_nll(target, mean, self.config.pixel_scale)
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)
        return {
            "bound": nll + kl + math.log(self.config.classes),
            "nll": nll,
            "kl": kl,
            "mean": mean,
        }

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        cfg = self.config
        h = features[f"{cfg.encoder}_global"].float()
        y, known = labelled_classes(batch, cfg.field, cfg.classes)
        target = image_target(batch_images(batch, cfg.view, 0), cfg.decoder_size).to(h.dtype)
        b, latent = h.shape[0], cfg.latent_dim
        logits = self.classifier(h)

        # Labelled studies: one z per study. (Computed on empty selections too, so every
        # parameter stays in the graph whatever the batch holds.)
        lab = self.bound(h[known], y[known], target[known], torch.randn_like(h[known][:, :latent]))
        ce = F.cross_entropy(logits[known], y[known], reduction="sum")

        # Unlabelled studies: L(x, y) for every class y, weighted by q(y|x), minus H(q).
        free = ~known
        n_free = int(free.sum())
        h_free, t_free = h[free], target[free]
        per_class = []
        for c in range(cfg.classes):
            cls = torch.full((n_free,), c, dtype=torch.long, device=h.device)
            per_class.append(
                self.bound(h_free, cls, t_free, torch.randn_like(h_free[:, :latent]))["bound"]
            )
        bounds = torch.stack(per_class, -1) if per_class else h_free.new_zeros(n_free, 0)
        log_q = logits[free].log_softmax(-1)
        q = log_q.exp()
        unlabelled = (q * bounds).sum(-1) + (q * log_q).sum(-1)

        elbo = (lab["bound"].sum() + cfg.unlabeled_weight * unlabelled.sum()) / b
        classification = cfg.alpha * ce / b
        with torch.no_grad():
            metrics = {
                "labelled_fraction": known.float().mean(),
                "nll_labelled": lab["nll"].mean() if len(lab["nll"]) else h.new_zeros(()),
                "kl_labelled": lab["kl"].mean() if len(lab["kl"]) else h.new_zeros(()),
                "accuracy_labelled": (logits[known].argmax(-1) == y[known]).float().mean()
                if bool(known.any())
                else h.new_zeros(()),
                "q_entropy_unlabelled": -(q * log_q).sum(-1).mean() if n_free else h.new_zeros(()),
            }
            if len(lab["mean"]) and self.record_figures:
                self._last = {
                    "target": target[known][:4].detach().cpu(),
                    "mean": lab["mean"][:4].detach().cpu(),
                }
        return ObjectiveOutput({"elbo": elbo, "classification": classification}, metrics)

    def predictor(self) -> LabelPredictor:
        key = f"{self.config.encoder}_global"

        def probabilities(image_features: dict) -> torch.Tensor:
            return self.classifier(image_features[key].float()).softmax(-1)

        return LabelPredictor(self.config.field, self.config.classes, (key,), probabilities)

    @torch.no_grad()
    def generate(self, n: int = 4, seed: int = 0) -> torch.Tensor:
        """``classes × n`` images decoded from z ~ N(0, I) (the same n codes in every row)
        for each class: what the model draws for each severity."""
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.config.latent_dim, generator=generator)
        weight = self.decoder.project.weight
        rows = []
        for c in range(self.config.classes):
            onehot = F.one_hot(torch.full((n,), c), self.config.classes).float()
            code = torch.cat([z, onehot], -1).to(weight.device, weight.dtype)
            rows.append(self.decoder(code)[:, 0].float().cpu())
        return torch.stack(rows)

    def write_figures(self, folder, step: int) -> list:
        from pathlib import Path

        from vlp.objectives.figures import image_rows

        # Under ZeRO-3 the decoder's weights are partitioned and gathering them would need
        # every rank, while figures are drawn on rank 0 alone: no generations then.
        partitioned = any(hasattr(p, "ds_id") for p in self.decoder.parameters())
        generated = [] if partitioned else self.generate()
        rows = {f"severity {c}": img.numpy() for c, img in enumerate(generated)}
        if not rows and self._last is None:
            return []
        if self._last is not None:
            rows = {
                "labelled input": self._last["target"][:, 0].numpy(),
                "reconstruction": self._last["mean"][:, 0].float().numpy(),
                **rows,
            }
        path = Path(folder) / f"m2_step-{step}.png"
        return [
            image_rows(
                rows, path, f"M2 at step {step}: reconstructions, then z ~ N(0, I) per class"
            )
        ]
