"""Med-ST's MoVE: one ViT over the frontal and lateral views, with a feed-forward expert per view.

Yang et al., "Unlocking the Power of Spatial and Temporal Information in Medical Multimodal
Pre-training" (Med-ST), ICML 2024, §3.2 (Mixture of View Experts). The frontal view gives
``[CLS] + patches`` with the ViT's position embedding, the lateral view its patches with the
same patch position embedding (no class token); the two sequences are concatenated and go
through the ViT's blocks with **shared self-attention**, while each block's feed-forward
network (and the norm before it) is **per view**: the ViT's own for the class token and the
frontal patches, a lateral copy for the lateral patches. A study without a lateral view
has its lateral keys masked out of the attention, so its frontal output is exactly that of
the frontal view alone. The global feature is the class token; the local tokens are the
frontal then the lateral patches (layout: two segments).

Where paper and code differ or are silent, and what we follow:

* MedST's ``vits.py`` initialises both experts from the same pretrained ViT; we build the
  lateral expert as a copy of each block's frontal expert at construction (so loading a
  pretrained ViT into ``tower`` and then copying is the user's step: ``lateral_from_frontal``).
* MedST feeds the lateral tokens to its local loss even when masked or zero; we keep them
  in ``local`` (the layout says which are lateral) and let objectives decide.
* Any timm VisionTransformer works (MedST: ViT-B/16 at 224), built for ``data.image_size``
  with one input channel.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from vlp.data.batch import batch_images, batch_view_mask
from vlp.data.requirements import Requirements
from vlp.models.encoders import (
    ImageEncoderBase,
    ImageEncoding,
    TokenSegment,
    check_image_tower,
    timm_vit,
    tower_grad_checkpointing,
)
from vlp.models.image import ImageTowerConfig, build_image_tower
from vlp.registry import register


@dataclass
class MoVEConfig:
    """MoVE over frontal + lateral (module docstring)."""

    #: a timm VisionTransformer (e.g. ``vit_base_patch16_224``, MedST's ViT-B/16).
    tower: ImageTowerConfig = field(
        default_factory=lambda: ImageTowerConfig(name="vit_base_patch16_224")
    )


@register("encoder", "move", config=MoVEConfig)
class MoVEEncoder(ImageEncoderBase):
    """Frontal + lateral through one ViT with per-view feed-forward experts."""

    def __init__(self, config: MoVEConfig, *, image_size: int, path: str = "model"):
        super().__init__()
        self.config = config
        self.tower = build_image_tower(config.tower, image_size, f"{path}.tower")
        vit = timm_vit(self.tower, config.tower.name, f"{path}.tower", "MoVE")
        self.lateral_experts = nn.ModuleList(
            nn.ModuleDict({"norm2": copy.deepcopy(b.norm2), "mlp": copy.deepcopy(b.mlp)})
            for b in vit.blocks
        )
        self.grid = tuple(vit.patch_embed.grid_size)
        self.global_dim = self.local_dim = int(vit.embed_dim)

    @classmethod
    def requirements(cls, config: MoVEConfig) -> Requirements:
        return Requirements(views=frozenset({"frontal", "lateral"}))

    @classmethod
    def check(cls, config: MoVEConfig, path: str, source, image_size: int) -> None:
        check_image_tower(config.tower, f"{path}.tower", source, image_size)

    def no_weight_decay(self) -> set[str]:
        return {f"tower.{n}" for n in self.tower.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        tower_grad_checkpointing(self.tower, enable, f"move encoder ({self.config.tower.name})")

    @torch.no_grad()
    def lateral_from_frontal(self) -> None:
        """Copy each block's frontal expert into its lateral one (after loading weights)."""
        for block, expert in zip(self.tower.model.blocks, self.lateral_experts):
            expert["norm2"].load_state_dict(block.norm2.state_dict())
            expert["mlp"].load_state_dict(block.mlp.state_dict())

    def _tokens(self, images: torch.Tensor, prefix: bool) -> torch.Tensor:
        vit = self.tower.model
        x = vit.patch_embed(self.tower.normalize(images))
        if prefix:
            x = vit._pos_embed(x)  # class (and register) tokens, position embedding
        else:
            start = 0 if vit.no_embed_class else vit.num_prefix_tokens
            x = vit.pos_drop(x + vit.pos_embed[:, start:])
        return vit.norm_pre(vit.patch_drop(x))

    def _encode(self, frontal: torch.Tensor, lateral, has_lateral) -> ImageEncoding:
        vit = self.tower.model
        x = self._tokens(frontal, prefix=True)
        split = x.shape[1]  # prefix + frontal patches
        mask = None
        if lateral is not None:
            x = torch.cat([x, self._tokens(lateral, prefix=False)], 1)
            keep = torch.ones(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
            keep[:, split:] = has_lateral[:, None]
            mask = keep[:, None, None, :]  # True = may be attended to
        for block, expert in zip(vit.blocks, self.lateral_experts):
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=mask)))
            own = x[:, :split]
            own = own + block.drop_path2(block.ls2(block.mlp(block.norm2(own))))
            if lateral is None:
                x = own
                continue
            side = x[:, split:]
            side = side + block.drop_path2(block.ls2(expert["mlp"](expert["norm2"](side))))
            x = torch.cat([own, side], 1)
        x = vit.norm(x)
        prefix = vit.num_prefix_tokens
        patches = self.grid[0] * self.grid[1]
        layout = [TokenSegment("frontal", 0, 0, self.grid)]
        if lateral is not None:
            layout.append(TokenSegment("lateral", 0, patches, self.grid))
        local = torch.cat([x[:, prefix:split], x[:, split:]], 1)
        return ImageEncoding(x[:, 0], local, tuple(layout))

    def encode_images(self, images: torch.Tensor) -> ImageEncoding:
        """Frontal images alone (no lateral tokens)."""
        return self._encode(images, None, None)

    def forward(self, batch: dict) -> ImageEncoding:
        return self._encode(
            batch_images(batch, "frontal", 0),
            batch_images(batch, "lateral", 0),
            batch_view_mask(batch, "lateral", 0),
        )
