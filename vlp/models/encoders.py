"""Encoders: registered components that read their inputs from the batch and run a tower.

The model holds ``model.encoders``, a dict built from the recipe's ``model.encoders``
(``{name: {kind, ...params}}``; ``kind`` defaults to the name). Each encoder declares

* its **inputs** (:meth:`Encoder.requirements`: views of the current study, prior time
  steps and their views; read with ``vlp.data.batch.batch_images`` / ``batch_view_mask``) — the recipe
  loader checks them against the ``data`` section before anything is built;
* its **outputs**: an image encoder (``modality = "image"``) returns an
  :class:`ImageEncoding` (a pooled vector, local tokens, and the token layout that says
  which tokens belong to which view, time step and grid); a text encoder (``modality =
  "text"``) embeds reports and sentences.

The model's heads (``vlp.models.model``) project these raw outputs into the joint space,
under feature keys derived from the encoder's name: image encoder ``N`` gives ``N_global``,
``N_local``, ``N_grid``, ``N_layout``; the text encoder gives ``report`` and ``sentence``.

Built-in kinds: ``image`` (one tower on one view at one time step) and ``text`` (a text
tower). A new encoder is one class plus ``@register("encoder", name, config=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from vlp.data.batch import batch_images
from vlp.data.requirements import Requirements
from vlp.data.schema import check_view
from vlp.models.image import ImageTower, ImageTowerConfig, build_image_tower, image_tower_config
from vlp.models.text import TextTower, TextTowerConfig, build_text_tower, text_tower_config
from vlp.registry import register

#: tower parameters that size the input image; they must equal data.image_size.
IMAGE_SIZE_PARAMS = ("img_size", "image_size")

#: the encoders of a recipe that does not list any.
DEFAULT_ENCODERS = {"image": {"kind": "image"}, "text": {"kind": "text"}}


class TokenSegment(NamedTuple):
    """A run of local tokens that come from one view at one time step, on one grid."""

    view: str
    #: 0 = the current study, k = the k-th prior.
    time: int
    start: int
    grid: tuple[int, int]

    @property
    def stop(self) -> int:
        return self.start + self.grid[0] * self.grid[1]


class ImageEncoding(NamedTuple):
    """Raw output of an image encoder (before the model's projection heads). Named tuples
    (this and :class:`TokenSegment`), so that ZeRO-3 finds the output tensors it hooks
    for backward (see ``vlp.models.image.ImageTowerOutput``)."""

    pooled: torch.Tensor  # B×Cg
    local: torch.Tensor  # B×R×Cl, R = sum of the segments' grid sizes
    layout: tuple[TokenSegment, ...]
    #: raw outputs beyond pooled/local, named by the encoder class's ``extra_features``
    #: (MAE's reconstruction, target and mask); they reach objectives unprojected as
    #: ``<encoder name>_<key>``. None or a subset when the encoder did not compute them.
    extras: dict[str, torch.Tensor] | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """The grid of a single-segment encoding (what grounding maps are drawn on)."""
        return self.layout[0].grid


class Encoder(nn.Module):
    """Base class of encoders (see the module docstring)."""

    #: ``image`` or ``text``: which heads project the output.
    modality: ClassVar[str]

    @classmethod
    def requirements(cls, config) -> Requirements:
        """What this encoder reads from the batch (a function of its config only, so the
        recipe loader can check it without building anything)."""
        return Requirements()

    @classmethod
    def check(cls, config, path: str, source: str | None, image_size: int) -> None:
        """Load-time validation beyond the config's types (e.g. the tower's parameters);
        raises ``vlp.config.loader.ConfigError`` naming the dotted key under ``path``."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to the encoder) exempt from weight decay."""
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward (``deepspeed.activation_checkpointing``)."""
        raise ValueError(f"encoder {type(self).__name__} does not support activation checkpointing")


class ImageEncoderBase(Encoder):
    """An image encoder: ``forward(batch) -> ImageEncoding``; ``global_dim``/``local_dim``."""

    modality = "image"
    global_dim: int
    local_dim: int
    #: keys of ``ImageEncoding.extras`` this encoder can give (features ``<name>_<key>``).
    extra_features: ClassVar[tuple[str, ...]] = ()

    def forward(self, batch: dict) -> ImageEncoding:
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> ImageEncoding:
        """uint8 ``B×1×H×W`` images of this encoder's view → its encoding (evaluators)."""
        raise NotImplementedError


def tower_grad_checkpointing(tower: nn.Module, enable: bool, what: str) -> None:
    """Turn on a tower's own activation checkpointing (timm and Hugging Face models)."""
    inner = getattr(tower, "model", tower)
    if hasattr(inner, "set_grad_checkpointing"):  # timm
        inner.set_grad_checkpointing(enable)
    elif hasattr(inner, "gradient_checkpointing_enable"):  # transformers
        # transformers >= 5 names it activation_checkpointing_* (the old name warns).
        prefix = (
            "activation_checkpointing"
            if hasattr(inner, "activation_checkpointing_enable")
            else "gradient_checkpointing"
        )
        getattr(inner, f"{prefix}_{'enable' if enable else 'disable'}")()
    else:
        raise ValueError(
            f"{what}: {type(inner).__name__} has no activation checkpointing; set "
            "deepspeed.activation_checkpointing: false"
        )


def timm_vit(tower: nn.Module, name: str, path: str, what: str):
    """The timm VisionTransformer inside ``tower``, or a ``ValueError`` naming ``path``
    (encoders that reach into a ViT's tokens: MoVE, MAE)."""
    from vlp.models.image import TimmTower

    vit = getattr(tower, "model", None)
    if not isinstance(tower, TimmTower) or not hasattr(vit, "blocks"):
        raise ValueError(f"{path}: {what} needs a timm VisionTransformer, got {name!r}")
    if getattr(vit, "dynamic_img_size", False) or vit.pos_embed is None:
        raise ValueError(f"{path}: {what} needs a fixed absolute position embedding")
    return vit


def check_image_tower(tower: ImageTowerConfig, path: str, source, image_size: int) -> None:
    """Load-time check of an image tower's config at ``path``: its parameters are valid
    and none that sizes the input disagrees with ``data.image_size``."""
    from vlp.config.loader import ConfigError

    _, params = image_tower_config(tower, path, source)
    for key in IMAGE_SIZE_PARAMS:
        value = getattr(params, key, None)
        if value is not None and value != image_size:
            raise ConfigError(
                source,
                f"{path}.params.{key}",
                f"{value} disagrees with data.image_size ({image_size}): a recipe has one "
                "image size; set data.image_size only",
            )


@dataclass
class ImageEncoderConfig:
    """One image tower on one view at one time step."""

    tower: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    #: batch view the tower reads: ``frontal`` or ``lateral``.
    view: str = "frontal"
    #: 0 = the current study, k = the k-th prior study (``data.priors`` >= k).
    time: int = 0

    def validate(self) -> None:
        check_view(self.view)
        if self.time < 0:
            raise ValueError(f"time must be >= 0, got {self.time}")


@register("encoder", "image", config=ImageEncoderConfig)
class ImageEncoder(ImageEncoderBase):
    """A registered image tower (``vlp.models.image``) reading one view of the batch."""

    def __init__(self, config: ImageEncoderConfig, *, image_size: int, path: str = "model"):
        super().__init__()
        self.config = config
        self.tower: ImageTower = build_image_tower(config.tower, image_size, f"{path}.tower")
        self.global_dim = self.tower.global_dim
        self.local_dim = self.tower.local_dim

    @classmethod
    def requirements(cls, config: ImageEncoderConfig) -> Requirements:
        if config.time == 0:
            return Requirements(views=frozenset({config.view}))
        return Requirements(priors=config.time, prior_views=frozenset({config.view}))

    @classmethod
    def check(cls, config: ImageEncoderConfig, path: str, source, image_size: int) -> None:
        check_image_tower(config.tower, f"{path}.tower", source, image_size)

    def no_weight_decay(self) -> set[str]:
        return {f"tower.{n}" for n in self.tower.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        tower_grad_checkpointing(self.tower, enable, f"image encoder ({self.config.tower.name})")

    def encode_images(self, images: torch.Tensor) -> ImageEncoding:
        out = self.tower(images)
        segment = TokenSegment(self.config.view, self.config.time, 0, out.grid)
        return ImageEncoding(out.global_features, out.local_features, (segment,))

    def forward(self, batch: dict) -> ImageEncoding:
        return self.encode_images(batch_images(batch, self.config.view, self.config.time))


@dataclass
class TextEncoderConfig:
    tower: TextTowerConfig = field(default_factory=TextTowerConfig)


@register("encoder", "text", config=TextEncoderConfig)
class TextEncoder(Encoder):
    """A text tower (``vlp.models.text``): pooled report and sentence embeddings."""

    modality = "text"

    def __init__(self, config: TextEncoderConfig, *, image_size: int, path: str = "model"):
        super().__init__()
        self.config = config
        self.tower: TextTower = build_text_tower(config.tower, f"{path}.tower")
        self.hidden_size = self.tower.hidden_size

    @classmethod
    def check(cls, config: TextEncoderConfig, path: str, source, image_size: int) -> None:
        text_tower_config(config.tower, f"{path}.tower", source)

    @property
    def tokenizer(self):
        return self.tower.tokenizer

    def no_weight_decay(self) -> set[str]:
        return {f"tower.{n}" for n in self.tower.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        tower_grad_checkpointing(self.tower, enable, f"text encoder ({self.config.tower.name})")

    def encode_reports(self, input_ids, attention_mask) -> torch.Tensor:
        return self.tower.encode_reports(input_ids, attention_mask)

    def encode_sentences(self, input_ids, attention_mask) -> torch.Tensor:
        return self.tower.encode_sentences(input_ids, attention_mask)

    def encode_tokens(self, input_ids, attention_mask) -> torch.Tensor:
        """``N×L×H`` token states (for a ``model.text_head`` that pools them itself)."""
        return self.tower.encode_tokens(input_ids, attention_mask)

    def encode_words(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states ``N×L×H`` and the mask of real words ``N×L`` (no special tokens)."""
        states = self.tower.encode_tokens(input_ids, attention_mask)
        return states, self.tower.word_mask(input_ids, attention_mask)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tower.tokenize(texts)


def encoder_specs(raw: dict) -> dict[str, tuple[str, dict]]:
    """``model.encoders`` (defaults merged, ``null`` entries dropped) → ``{name: (kind,
    params)}`` in build order."""
    merged = {**DEFAULT_ENCODERS, **raw}
    specs = {}
    for name, entry in merged.items():
        if entry is None:
            continue
        params = dict(entry)
        kind = params.pop("kind", name)
        specs[name] = (kind, params)
    return specs
