"""The vision–language model: registered encoders and the heads that project them.

``VLPModel`` is encoders (``vlp.models.encoders``: each reads its inputs from the batch) and
projection heads into the joint space. ``VLPModel.encode(batch, need)`` turns a batch
(docs/architecture.md, "Batch") into the feature dictionary ("Features"), running only the
encoders whose features ``need`` names. The model knows nothing of objectives: the
training module (``vlp.training.module``) holds the model, the objectives and their
weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from vlp.data.batch import at_time, current_text
from vlp.data.requirements import Requirements
from vlp.models.encoders import Encoder, ImageEncoding, encoder_specs
from vlp.models.heads import AttentionPoolConfig, HeadConfig, ProjectionHead
from vlp.registry import build, get

__all__ = ["FeatureDims", "ModelConfig", "VLPModel", "build_model", "produced_features"]


@dataclass(frozen=True)
class FeatureDims:
    """Widths of the projected features, so objectives can size their own modules."""

    embed_dim: int  # image_global and report
    local_dim: int  # image_local
    sentence_dim: int | None  # sentence; None without a text encoder


@dataclass
class ModelConfig:
    """Encoders, heads and the joint space of a :class:`VLPModel`."""

    #: ``{name: {kind, ...params}}``, merged over the defaults ``image`` (kind ``image``, the
    #: frontal view) and ``text`` (kind ``text``); ``kind`` defaults to the name, and
    #: ``name: null`` drops a default (``text: null``: an image-only model).
    encoders: dict[str, dict | None] = field(default_factory=dict)
    #: width of ``<image encoder>_global`` and ``report``.
    embed_dim: int = 128
    #: width of ``<image encoder>_local``.
    local_dim: int = 128
    #: width of ``sentence``; None = embed_dim.
    sentence_dim: int | None = None
    #: head shape for global image, report and sentence features.
    projection: HeadConfig = field(default_factory=HeadConfig)
    #: head shape for local image features; None = ``projection``.
    local_projection: HeadConfig | None = None
    #: sentences go through the report head (same space, e.g. ConVIRT's random sentence).
    share_sentence_head: bool = False
    #: how an image encoder's global embedding is formed, a registered ``global_head``:
    #: ``pool`` (project the tower's pooled feature) or ``mean_local`` (mean of the projected
    #: local features, BioViL's; needs embed_dim == local_dim) or ``attention_pool``
    #: (learned queries over the projected local tokens).
    global_head: str = "pool"
    #: how the report embedding is formed: ``pool`` (project the text tower's pooled
    #: vector) or a ``global_head`` kind over the tower's token states, e.g.
    #: ``attention_pool`` (learned queries over a frozen LM's token states).
    text_head: str = "pool"
    #: queries and heads of every ``attention_pool`` head.
    attention_pool: AttentionPoolConfig = field(default_factory=AttentionPoolConfig)
    #: width of the projected report tokens (``report_words``, through the local head's
    #: shape), for word–region objectives; None builds no word head.
    word_dim: int | None = None


#: the reports of every time step, projected: B×T×D (rows of absent studies or undecoded
#: prior text are embeddings of empty text; ``batch["text_mask"]`` says which are real).
REPORT_SERIES = "report_series"


def series_key(name: str) -> str:
    """Feature key of image encoder ``name``'s global embedding at every time step, B×T×D:
    step t is the encoder run on the batch seen from t (``vlp.data.batch.at_time``); steps
    whose own priors are beyond the batch are zeros."""
    return f"{name}_global_series"


#: features of the report's words: projected token states B×L×Dw and their mask B×L.
TEXT_WORD_KEYS = ("report_words", "report_word_mask")
#: the text features computed from each tokenised text kind of the batch.
TEXT_FEATURES = {
    "report": ("report", REPORT_SERIES, *TEXT_WORD_KEYS),
    "sentence": ("sentence",),
}


def image_feature_keys(name: str) -> tuple[str, str, str, str]:
    """Feature keys of image encoder ``name``: global, local, grid, layout."""
    return f"{name}_global", f"{name}_local", f"{name}_grid", f"{name}_layout"


def extra_keys(name: str, extras: Iterable[str]) -> tuple[str, ...]:
    """Feature keys of image encoder ``name``'s extra outputs (``ImageEncoding.extras``)."""
    return tuple(f"{name}_{key}" for key in extras)


def produced_features(cfg: ModelConfig) -> dict[str, str]:
    """Feature key → the encoder that produces it, from the config alone (load-time checks)."""
    produced = {}
    for name, (kind, _) in encoder_specs(cfg.encoders).items():
        modality = get("encoder", kind).builder.modality
        if modality == "image":
            extras = get("encoder", kind).builder.extra_features
            keys = (*image_feature_keys(name), series_key(name), *extra_keys(name, extras))
        else:
            words = TEXT_WORD_KEYS if cfg.word_dim else ()
            keys = ("report", "sentence", REPORT_SERIES, *words)
        for key in keys:
            if key in produced:
                raise ValueError(
                    f"model.encoders: {produced[key]!r} and {name!r} both produce {key!r}"
                )
            produced[key] = name
    return produced


class VLPModel(nn.Module):
    """Encoders and projection heads."""

    def __init__(self, cfg: ModelConfig, encoders: dict[str, Encoder], image_size: int):
        super().__init__()
        self.cfg = cfg
        #: the square input side the image encoders were built for (``data.image_size``).
        self.image_size = image_size
        self.encoders = nn.ModuleDict(encoders)
        self.heads = nn.ModuleDict()
        local_cfg = cfg.local_projection or cfg.projection
        sentence_dim = cfg.sentence_dim or cfg.embed_dim
        self.image_encoders = [n for n, e in encoders.items() if e.modality == "image"]
        texts = [n for n, e in encoders.items() if e.modality == "text"]
        if len(texts) > 1:
            raise ValueError(f"model.encoders: at most one text encoder, got {texts}")
        self.text_encoder = texts[0] if texts else None
        for name in self.image_encoders:
            encoder = encoders[name]
            global_key, local_key, _, _ = image_feature_keys(name)
            local = ProjectionHead(
                encoder.local_dim, cfg.local_dim, local_cfg, "model.local_projection"
            )
            self.heads[local_key] = local
            self.heads[global_key] = build(
                "global_head",
                cfg.global_head,
                None,
                encoder.global_dim,
                local.out_dim,
                cfg.embed_dim,
                cfg.projection,
                "model.projection",
                cfg.attention_pool,
            )
        sentence_out = None
        if self.text_encoder is not None:
            width = encoders[self.text_encoder].hidden_size
            if cfg.text_head == "pool":
                self.heads["report"] = ProjectionHead(
                    width, cfg.embed_dim, cfg.projection, "model.projection"
                )
            else:
                if cfg.share_sentence_head:
                    raise ValueError(
                        f"model.share_sentence_head needs text_head: pool (got "
                        f"{cfg.text_head!r}): sentences are embedded from pooled vectors"
                    )
                self.heads["report"] = build(
                    "global_head",
                    cfg.text_head,
                    None,
                    width,
                    width,
                    cfg.embed_dim,
                    cfg.projection,
                    "model.text_head",
                    cfg.attention_pool,
                )
            if not cfg.share_sentence_head:
                self.heads["sentence"] = ProjectionHead(
                    width, sentence_dim, cfg.projection, "model.projection"
                )
            sentence_out = (
                self.heads["sentence"] if "sentence" in self.heads else self.heads["report"]
            ).out_dim
            if cfg.word_dim:
                self.heads["report_words"] = ProjectionHead(
                    width, cfg.word_dim, local_cfg, "model.local_projection"
                )
        # Objectives size their modules from the primary (first) image encoder's widths.
        first = image_feature_keys(self.image_encoders[0]) if self.image_encoders else None
        embed = self.heads[first[0]].out_dim if first else cfg.embed_dim
        self.dims = FeatureDims(
            embed_dim=embed,
            local_dim=self.heads[first[1]].out_dim if first else cfg.local_dim,
            sentence_dim=sentence_out,
        )
        if first and "report" in self.heads and self.heads["report"].out_dim != embed:
            raise ValueError(
                f"image_global ({embed}) and report ({self.heads['report'].out_dim}) "
                "embeddings must have the same width; with identity heads the towers' widths "
                "must match, with global_head: mean_local set embed_dim == local_dim"
            )

    # ------------------------------------------------------------------ parts

    @property
    def primary_image_encoder(self) -> str:
        """The image encoder the evaluators read: ``image`` if there is one, else the first."""
        if not self.image_encoders:
            raise ValueError("the model has no image encoder")
        return "image" if "image" in self.image_encoders else self.image_encoders[0]

    @property
    def text(self):
        """The text encoder, or None for an image-only model."""
        return None if self.text_encoder is None else self.encoders[self.text_encoder]

    @property
    def tokenizer(self):
        """The text encoder's tokenizer (the loader tokenises with it), or None."""
        return None if self.text is None else self.text.tokenizer

    # ------------------------------------------------------------------ encoding

    def _project_image(self, name: str, encoding: ImageEncoding) -> dict:
        global_key, local_key, grid_key, layout_key = image_feature_keys(name)
        local = self.heads[local_key](encoding.local)
        features = {
            global_key: self.heads[global_key](encoding.pooled, local),
            local_key: local,
            grid_key: encoding.grid,
            layout_key: encoding.layout,
        }
        for key, value in (encoding.extras or {}).items():
            features[f"{name}_{key}"] = value
        return features

    def _report_embeddings(self, input_ids, attention_mask) -> torch.Tensor:
        """Projected report embeddings: the report head over the tower's pooled vector
        (``text_head: pool``) or over its token states and mask (other kinds)."""
        head = self.heads["report"]
        if isinstance(head, ProjectionHead):
            return head(self.text.encode_reports(input_ids, attention_mask))
        states = self.text.encode_tokens(input_ids, attention_mask)
        return head(None, states, attention_mask.bool())

    def _sentence_embeddings(self, input_ids, attention_mask) -> torch.Tensor:
        pooled = self.text.encode_sentences(input_ids, attention_mask)
        return self.heads["sentence" if "sentence" in self.heads else "report"](pooled)

    def encode(self, batch: dict, need: Iterable[str] | None = None) -> dict:
        """Feature dictionary of ``batch``. ``need`` (feature keys) limits what is computed;
        None computes everything the batch allows. An image encoder's features come
        together."""
        need = None if need is None else set(need)
        features: dict = {}
        for name in self.image_encoders:
            keys = {
                *image_feature_keys(name),
                *extra_keys(name, self.encoders[name].extra_features),
            }
            if need is None or need & keys:
                features.update(self._project_image(name, self.encoders[name](batch)))
            if need is not None and series_key(name) in need:
                features[series_key(name)] = self._global_series(name, batch, features)
        if "study_id" in batch:
            study = batch["study_id"]
            features["study_id"] = study[:, 0] if study.dim() == 2 else study
        for kind in ("report", "sentence"):
            ids = f"{kind}_input_ids"
            if need is None:
                if self.text is None or ids not in batch:
                    continue
            elif not need & set(TEXT_FEATURES[kind]):
                continue
            elif self.text is None or ids not in batch:
                raise KeyError(
                    f"an objective needs {kind} features but the batch has no {ids} (or the "
                    "model has no text encoder)"
                )
            if kind == "report" and need is not None and REPORT_SERIES in need:
                rows = self._report_embeddings(batch[ids], batch["report_attention_mask"])
                steps = batch["study_mask"].shape[1]
                features[REPORT_SERIES] = rows.unflatten(0, (-1, steps))
            tokens, mask, index = current_text(batch, kind)
            if kind == "report":
                if REPORT_SERIES in features:  # the current reports are its first step
                    features["report"] = features[REPORT_SERIES][:, 0]
                elif need is None or "report" in need:
                    features["report"] = self._report_embeddings(tokens, mask)
                if "report_words" in self.heads and (need is None or "report_words" in need):
                    states, words = self.text.encode_words(tokens, mask)
                    features["report_words"] = self.heads["report_words"](states)
                    features["report_word_mask"] = words
            else:
                features["sentence"] = self._sentence_embeddings(tokens, mask)
                features["sentence_index"] = index
        return features

    def _global_series(self, name: str, batch: dict, features: dict) -> torch.Tensor:
        """``series_key(name)``: the encoder on the batch seen from each time step."""
        encoder = self.encoders[name]
        reach = type(encoder).requirements(encoder.config).priors
        global_key = image_feature_keys(name)[0]
        steps = []
        for t in range(batch["study_mask"].shape[1]):
            if t == 0 and global_key in features:
                steps.append(features[global_key])
            elif t + reach < batch["study_mask"].shape[1]:
                encoding = encoder(at_time(batch, t))
                steps.append(self._project_image(name, encoding)[global_key])
            else:
                steps.append(torch.zeros_like(steps[0]))
        return torch.stack(steps, 1)

    def encode_image(self, images, encoder: str | None = None) -> dict:
        """A batch dict (the encoder reads the views it declares) or uint8 ``B×1×H×W``
        images of the encoder's view, through image encoder ``encoder`` (default: the
        primary one) → its projected ``<name>_global``, ``_local``, ``_grid``,
        ``_layout``, and the same under ``image_*`` so evaluators read one set of keys."""
        name = encoder or self.primary_image_encoder
        module = self.encoders[name]
        encoding = module(images) if isinstance(images, dict) else module.encode_images(images)
        out = self._project_image(name, encoding)
        if name != "image":
            out.update(
                dict(zip(image_feature_keys("image"), (out[k] for k in image_feature_keys(name))))
            )
        return out

    def encode_text(self, texts: list[str], kind: str = "report") -> torch.Tensor:
        """Raw strings → projected embeddings in the ``report`` (default) or ``sentence``
        space (``P×D``), or ``words``: each text's projected word features ``P×L×D`` (the
        ``report_words`` of a forward) with every padding or special token a zero vector."""
        if self.text is None:
            raise ValueError("the model has no text encoder (model.encoders.text is null)")
        tokens = self.text.tokenize(texts)
        if kind == "report":
            return self._report_embeddings(tokens["input_ids"], tokens["attention_mask"])
        if kind == "sentence":
            return self._sentence_embeddings(tokens["input_ids"], tokens["attention_mask"])
        if kind == "words":
            if "report_words" not in self.heads:
                raise ValueError("the model has no word features (model.word_dim is not set)")
            states, words = self.text.encode_words(tokens["input_ids"], tokens["attention_mask"])
            return self.heads["report_words"](states) * words[..., None]
        raise ValueError(f"encode_text kind must be 'report', 'sentence' or 'words', got {kind!r}")

    def image_parameters(self, encoder: str | None = None) -> list[nn.Parameter]:
        """Parameters that form an image encoder's features: the encoder and its heads
        (what an end-to-end fine-tuning probe trains)."""
        name = encoder or self.primary_image_encoder
        heads = [self.heads[k] for k in image_feature_keys(name) if k in self.heads]
        return [*self.encoders[name].parameters(), *(p for h in heads for p in h.parameters())]

    def requirements(self) -> Requirements:
        """What the encoders read from a batch (views, priors), e.g. for evaluation loaders."""
        return Requirements.union(type(e).requirements(e.config) for e in self.encoders.values())

    def no_weight_decay(self) -> set[str]:
        return {
            f"encoders.{name}.{param}"
            for name, encoder in self.encoders.items()
            for param in encoder.no_weight_decay()
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for encoder in self.encoders.values():
            encoder.set_grad_checkpointing(enable)


def build_model(cfg: ModelConfig, image_size: int) -> VLPModel:
    """Build every encoder of ``cfg`` (in recipe order), then the heads."""
    encoders = {
        name: build("encoder", kind, params, image_size=image_size, path=f"model.encoders.{name}")
        for name, (kind, params) in encoder_specs(cfg.encoders).items()
    }
    return VLPModel(cfg, encoders, image_size)
