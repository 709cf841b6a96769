"""BioViL-T's multi-image encoder: the current image fused with its prior over the time axis.

Bannur et al., "Learning to Exploit Temporal Structure for Biomedical Vision-Language
Processing", CVPR 2023. A CNN encodes the current and the prior image (one pass, the two
concatenated on the batch axis); a 1×1 projection maps its patch map to ``dim``; a small
transformer attends over both grids' tokens with a 2-D sine position embedding and a learned
image-type embedding (current / prior) added to queries and keys only; its outputs at the
current image's positions (the "difference" tokens) are concatenated to the projected
current patches, so each local token is ``2·dim`` wide. When a study has no prior, a
learned "missing prior" embedding replaces the difference tokens. The model's heads then do
what hi-ml's projector does (local projection of the fused tokens; with ``global_head:
mean_local`` the global embedding is the mean of the projected tokens).

Where the paper and hi-ml's inference code (``MultiImageEncoder``,
``VisionTransformerPooler``; there is no public training code) differ or are silent, and
what we follow:

* hi-ml decides "prior missing" per batch (all rows or none); we decide per sample (rows
  without a prior get the missing embedding, the others attend), and the CNN runs only on
  the priors that exist.
* hi-ml's pooler is 3 blocks, 8 heads, MLP ratio 1, dropout 0.1, attention dropout 0.1 and
  stochastic depth 0.25 on a 256-wide token: our defaults. The CNN is any registered image
  tower (hi-ml: ResNet-50 layer 4), not only a ResNet-50.
* The position embedding is DETR-style (normalised coordinates times 2π, ``dim/2`` channels
  per axis, sine and cosine interleaved): hi-ml's choice; the paper says "2-D sine".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from vlp.data.batch import batch_images, batch_view_mask
from vlp.data.requirements import Requirements
from vlp.data.schema import check_view
from vlp.models.encoders import (
    ImageEncoderBase,
    ImageEncoding,
    TokenSegment,
    check_image_tower,
    tower_grad_checkpointing,
)
from vlp.models.image import ImageTower, ImageTowerConfig, build_image_tower
from vlp.registry import register


def sine_position_embedding(grid: tuple[int, int], dim: int, temperature: float = 10000.0):
    """``(gh·gw)×dim`` 2-D sine embedding: ``dim/2`` channels encode the row, ``dim/2`` the
    column, each as interleaved sin/cos of the normalised coordinate (times 2π) at
    geometrically spaced frequencies (Carion et al. 2020, DETR)."""
    if dim % 4:
        raise ValueError(f"the sine position embedding needs dim divisible by 4, got {dim}")
    gh, gw = grid
    half = dim // 2
    rows = (torch.arange(gh, dtype=torch.float32) + 1) / gh * 2 * math.pi
    cols = (torch.arange(gw, dtype=torch.float32) + 1) / gw * 2 * math.pi
    freq = temperature ** (2 * (torch.arange(half) // 2).float() / half)

    def encode(coords: torch.Tensor) -> torch.Tensor:  # n -> n×half
        angles = coords[:, None] / freq
        return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], -1).flatten(1)

    y = encode(rows)[:, None].expand(gh, gw, half)
    x = encode(cols)[None].expand(gh, gw, half)
    return torch.cat([y, x], -1).reshape(gh * gw, dim)


class _FusionBlock(nn.Module):
    """Pre-norm transformer block whose position and type embeddings enter the queries and
    keys, not the values (hi-ml's ``Block.with_pos_and_type_embed``)."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, drop: float, attn_drop: float, path: float
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=attn_drop, batch_first=True)
        self.drop1 = nn.Dropout(drop)
        self.drop_path = DropPath(path) if path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, pos_type: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        qk = h + pos_type
        x = x + self.drop_path(self.drop1(self.attn(qk, qk, h, need_weights=False)[0]))
        return x + self.drop_path(self.mlp(self.norm2(x)))


@dataclass
class BioViLTConfig:
    """BioViL-T's multi-image encoder (module docstring); defaults are hi-ml's pooler."""

    tower: ImageTowerConfig = field(default_factory=lambda: ImageTowerConfig(name="resnet50"))
    #: the view encoded at both time steps.
    view: str = "frontal"
    #: which prior is the "previous image" (1 = the most recent).
    prior: int = 1
    #: token width of the fusion transformer (hi-ml: 256); local tokens are 2·dim wide.
    dim: int = 256
    depth: int = 3
    heads: int = 8
    mlp_ratio: float = 1.0
    dropout: float = 0.1
    attention_dropout: float = 0.1
    drop_path: float = 0.25

    def validate(self) -> None:
        check_view(self.view)
        if self.prior < 1:
            raise ValueError(f"prior must be >= 1 (a prior time step), got {self.prior}")
        if self.dim % 4 or self.dim % self.heads:
            raise ValueError(
                f"dim must be divisible by 4 and by heads ({self.heads}), got {self.dim}"
            )
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")


@register("encoder", "biovil_t", config=BioViLTConfig)
class BioViLTEncoder(ImageEncoderBase):
    """Current image + one prior → fused local tokens of the current image (``2·dim``)."""

    def __init__(self, config: BioViLTConfig, *, image_size: int, path: str = "model"):
        super().__init__()
        self.config = config
        self.tower: ImageTower = build_image_tower(config.tower, image_size, f"{path}.tower")
        dim = config.dim
        self.to_tokens = nn.Linear(self.tower.local_dim, dim)  # hi-ml: a 1×1 convolution
        self.type_embed = nn.Parameter(torch.zeros(2, 1, dim))
        self.missing_prior = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            _FusionBlock(
                dim,
                config.heads,
                config.mlp_ratio,
                config.dropout,
                config.attention_dropout,
                config.drop_path * i / max(config.depth - 1, 1),  # linearly growing
            )
            for i in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim)
        trunc_normal_(self.type_embed, std=0.02)
        trunc_normal_(self.missing_prior, std=0.02)
        grid = self.tower.probe_grid
        self.register_buffer("position", sine_position_embedding(grid, dim), persistent=False)
        self.grid = grid
        self.global_dim = self.local_dim = 2 * dim

    @classmethod
    def requirements(cls, config: BioViLTConfig) -> Requirements:
        view = frozenset({config.view})
        return Requirements(views=view, priors=config.prior, prior_views=view)

    @classmethod
    def check(cls, config: BioViLTConfig, path: str, source, image_size: int) -> None:
        check_image_tower(config.tower, f"{path}.tower", source, image_size)

    def no_weight_decay(self) -> set[str]:
        own = {"type_embed", "missing_prior"}
        return own | {f"tower.{n}" for n in self.tower.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        tower_grad_checkpointing(self.tower, enable, f"biovil_t encoder ({self.config.tower.name})")

    def _fuse(self, current: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """N×R×dim current and prior tokens → N×R×dim difference tokens."""
        regions = current.shape[1]
        pos_type = torch.cat(
            [self.position + self.type_embed[0], self.position + self.type_embed[1]]
        )
        x = torch.cat([current, prior], 1)
        for block in self.blocks:
            x = block(x, pos_type)
        return self.norm(x)[:, :regions]

    def _encode(
        self, current: torch.Tensor, prior: torch.Tensor | None, has_prior
    ) -> ImageEncoding:
        size = current.shape[0]
        images = current if prior is None else torch.cat([current, prior])
        out = self.tower(images)
        if out.grid != self.grid:
            raise ValueError(f"biovil_t: tower grid {out.grid}, built for {self.grid}")
        tokens = self.to_tokens(out.local_features)
        patches = tokens[:size]
        difference = self.missing_prior.expand(size, patches.shape[1], -1)
        if prior is not None:
            fused = self._fuse(patches[has_prior], tokens[size:])
            difference = difference.clone()
            difference[has_prior] = fused.to(difference.dtype)
        local = torch.cat([patches, difference], -1)
        segment = TokenSegment(self.config.view, 0, 0, out.grid)
        return ImageEncoding(local.mean(1), local, (segment,))

    def encode_images(self, images: torch.Tensor) -> ImageEncoding:
        """Images alone (no prior): every difference token is the missing-prior embedding."""
        return self._encode(images, None, None)

    def forward(self, batch: dict) -> ImageEncoding:
        # The fusion runs even when no sample of the batch has a prior (on zero rows), so
        # every rank uses the same parameters each step, as DeepSpeed's reductions expect.
        view, step = self.config.view, self.config.prior
        has_prior = batch_view_mask(batch, view, step)
        prior = batch_images(batch, view, step)[has_prior]
        return self._encode(batch_images(batch, view, 0), prior, has_prior)
