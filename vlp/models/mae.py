"""Masked autoencoder image encoder (He et al., "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022): a ViT on a random subset of its patches, and the decoder with it.

In training with ``mask_ratio`` > 0 every sample keeps its own random ``int(N·(1 − r))`` of
the N patches (argsort of uniform noise, as MAE's ``random_masking``); the ViT encodes the
class token and the visible patches only. A light decoder (``MAEDecoder``: a linear map to
its width, a learned mask token in place of each hidden patch, fixed 2-D sine positions,
transformer blocks, a linear head to ``p²`` gray pixels) predicts every patch. The encoding
carries the prediction, the patchified input and the mask as ``extras``
(``mae_prediction`` B×N×p², ``mae_target`` B×N×p², ``mae_mask`` B×N, 1 = hidden) for the
``mae`` objective (``vlp/objectives/reconstruction.py``). Outside training, or with
``mask_ratio: 0``, the encoder sees every patch and the decoder does not run: evaluators
and later fine-tuning read the full encoding.

The decoder is a submodule of the encoder, so it is saved and exported with it (the public
MAE checkpoints lack it, and their users ask for it: facebookresearch/mae #174, #156).

Where paper and code differ from us, and what we follow:

* MAE's encoder uses fixed sin-cos position embeddings; we keep the timm ViT's own (learned)
  embedding, so any timm ViT and its pretrained weights load unchanged. The decoder's are
  fixed sine embeddings (``vlp.models.multi_image.sine_position_embedding``, DETR's
  variant of the 2-D sin-cos), the class token's position zero, as MAE's.
* Radiographs are one channel: the head predicts ``p²`` values per patch (MAE: ``3p²``),
  in the tower's normalised intensity space.
* The pooled feature is the class token (``pool: cls``, MAE's linear probe) or the mean of
  the patch tokens (``pool: mean``, MAE's fine-tuning ``--global_pool``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn

from vlp.data.batch import batch_images
from vlp.data.requirements import Requirements
from vlp.data.schema import check_view
from vlp.models.encoders import (
    ImageEncoderBase,
    ImageEncoding,
    TokenSegment,
    check_image_tower,
    timm_vit,
    tower_grad_checkpointing,
)
from vlp.models.image import ImageTowerConfig, build_image_tower
from vlp.models.multi_image import sine_position_embedding
from vlp.registry import register


@dataclass
class MAEDecoderConfig:
    """MAE's decoder: 512 wide, 8 blocks, 16 heads."""

    dim: int = 512
    depth: int = 8
    heads: int = 16
    mlp_ratio: float = 4.0

    def validate(self) -> None:
        if self.dim % 4 or self.dim % self.heads:
            raise ValueError(
                f"dim must be divisible by 4 and by heads ({self.heads}), got {self.dim}"
            )
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")


@dataclass
class MAEConfig:
    """A masked autoencoder on one view (module docstring)."""

    #: a timm VisionTransformer with a class token (MAE: ViT-B/16, ViT-L/16, ViT-H/14).
    tower: ImageTowerConfig = field(
        default_factory=lambda: ImageTowerConfig(name="vit_base_patch16_224")
    )
    view: str = "frontal"
    #: fraction of patches hidden from the encoder in training (MAE: 0.75); 0 = none.
    mask_ratio: float = 0.75
    decoder: MAEDecoderConfig = field(default_factory=MAEDecoderConfig)
    #: pooled feature: ``cls`` (the class token) or ``mean`` (of the patch tokens).
    pool: str = "cls"

    def validate(self) -> None:
        check_view(self.view)
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``B×C×H×W`` → ``B×N×(p·p·C)``, patches in row-major grid order (the ViT's tokens)."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify` for ``grid`` = (rows, columns) of patches."""
    return rearrange(
        patches, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=patch, q=patch
    )


def random_masking(batch: int, patches: int, keep: int, device) -> tuple[torch.Tensor, ...]:
    """Per-sample random subsets: ``(kept ids B×keep, restore ids B×N, mask B×N)``.

    ``restore`` undoes the shuffle (``gather(shuffled, restore)`` is the original order);
    ``mask`` is 1 where a patch is hidden, in the original order."""
    noise = torch.rand(batch, patches, device=device)
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(batch, patches, device=device)
    mask[:, :keep] = 0
    return shuffle[:, :keep], restore, torch.gather(mask, 1, restore)


class MAEDecoder(nn.Module):
    """Visible tokens + mask tokens → per-patch pixel predictions (module docstring).

    The mask token is this module's own parameter, read in its own forward (what ZeRO-3
    needs to gather it; docs/architecture.md, Known limits)."""

    def __init__(self, in_dim: int, grid: tuple[int, int], patch: int, cfg: MAEDecoderConfig):
        super().__init__()
        self.embed = nn.Linear(in_dim, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        nn.init.normal_(self.mask_token, std=0.02)
        position = torch.cat([torch.zeros(1, cfg.dim), sine_position_embedding(grid, cfg.dim)])
        self.register_buffer("position", position[None], persistent=False)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio, qkv_bias=True) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, patch * patch)

    def forward(self, tokens: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """``tokens`` B×(1 + kept)×C (class token first), ``restore`` B×N → B×N×p²."""
        x = self.embed(tokens)
        hidden = restore.shape[1] + 1 - x.shape[1]
        patches = torch.cat([x[:, 1:], self.mask_token.expand(x.shape[0], hidden, -1)], 1)
        index = restore[..., None].expand(-1, -1, x.shape[-1])
        x = torch.cat([x[:, :1], torch.gather(patches, 1, index)], 1) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))[:, 1:]


@register("encoder", "mae", config=MAEConfig)
class MAEEncoder(ImageEncoderBase):
    """A timm ViT that encodes a random subset of patches in training, with its decoder."""

    extra_features = ("mae_prediction", "mae_target", "mae_mask")

    def __init__(self, config: MAEConfig, *, image_size: int, path: str = "model"):
        super().__init__()
        self.config = config
        self.tower = build_image_tower(config.tower, image_size, f"{path}.tower")
        vit = timm_vit(self.tower, config.tower.name, f"{path}.tower", "MAE")
        if vit.cls_token is None or vit.num_prefix_tokens != 1:
            raise ValueError(
                f"{path}.tower: MAE needs a ViT with a class token and no register tokens; "
                f"{config.tower.name!r} is not one"
            )
        self.grid = tuple(vit.patch_embed.grid_size)
        self.patch = int(vit.patch_embed.patch_size[0])
        self.patches = self.grid[0] * self.grid[1]
        self.keep = max(1, int(self.patches * (1.0 - config.mask_ratio)))
        self.decoder = MAEDecoder(vit.embed_dim, self.grid, self.patch, config.decoder)
        self.global_dim = self.local_dim = int(vit.embed_dim)

    @classmethod
    def requirements(cls, config: MAEConfig) -> Requirements:
        return Requirements(views=frozenset({config.view}))

    @classmethod
    def check(cls, config: MAEConfig, path: str, source, image_size: int) -> None:
        check_image_tower(config.tower, f"{path}.tower", source, image_size)

    def no_weight_decay(self) -> set[str]:
        return {f"tower.{n}" for n in self.tower.no_weight_decay()} | {"decoder.mask_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        tower_grad_checkpointing(self.tower, enable, f"mae encoder ({self.config.tower.name})")

    @property
    def masking(self) -> bool:
        return self.training and self.config.mask_ratio > 0

    def _encode(self, normalized: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
        """Class token + the ``kept`` patches (all when None) through the ViT: B×(1+K)×C."""
        vit = self.tower.model
        x = vit.patch_embed(normalized)
        start = 0 if vit.no_embed_class else 1
        x = x + vit.pos_embed[:, start:]
        if kept is not None:
            x = torch.gather(x, 1, kept[..., None].expand(-1, -1, x.shape[-1]))
        cls = vit.cls_token if vit.no_embed_class else vit.cls_token + vit.pos_embed[:, :1]
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], 1)
        x = vit.norm_pre(vit.pos_drop(x))
        for block in vit.blocks:
            x = block(x)
        return vit.norm(x)

    def _pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.config.pool == "cls" else tokens[:, 1:].mean(1)

    def encode_images(self, images: torch.Tensor) -> ImageEncoding:
        """Every patch, no decoder: the encoding evaluators and fine-tuning read."""
        tokens = self._encode(self.tower.normalize(images), None)
        segment = TokenSegment(self.config.view, 0, 0, self.grid)
        return ImageEncoding(self._pooled(tokens), tokens[:, 1:], (segment,))

    def forward(self, batch: dict) -> ImageEncoding:
        images = batch_images(batch, self.config.view, 0)
        if not self.masking:
            return self.encode_images(images)
        normalized = self.tower.normalize(images)
        kept, restore, mask = random_masking(
            normalized.shape[0], self.patches, self.keep, normalized.device
        )
        tokens = self._encode(normalized, kept)
        extras = {
            "mae_prediction": self.decoder(tokens, restore),
            "mae_target": patchify(normalized, self.patch),
            "mae_mask": mask,
        }
        # The visible tokens are not a grid: one segment of 1 × kept tokens.
        segment = TokenSegment(self.config.view, 0, 0, (1, self.keep))
        return ImageEncoding(self._pooled(tokens), tokens[:, 1:], (segment,), extras)
