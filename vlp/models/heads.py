"""Projection heads that map tower features into the joint space, and the logit scale.

A head acts on the last dimension, so the same module projects ``B×C`` global features
and ``B×R×C`` region features. ``identity`` keeps raw tower features (Liao et al. 2021 feed
the raw 512-d regions and 768-d [CLS] sentences to their discriminator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vlp.registry import register

HEAD_KINDS = ("linear", "mlp", "identity")


@dataclass
class HeadConfig:
    """Shape of a projection head."""

    kind: str = "linear"  # linear | mlp | identity
    #: hidden width of an MLP; 0 means the output width.
    hidden_dim: int = 0
    #: number of Linear layers of an MLP (>= 2).
    num_layers: int = 2
    #: normalisation after each hidden Linear: none | layernorm | batchnorm
    norm: str = "none"
    activation: str = "gelu"  # gelu | relu
    dropout: float = 0.0
    bias: bool = True


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
_NORMS = ("none", "layernorm", "batchnorm")


class _LastDimBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the last dimension of a tensor with any leading dimensions."""

    def forward(self, x):
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


class ProjectionHead(nn.Module):
    """``in_dim → out_dim`` on the last dimension: linear, MLP or identity."""

    def __init__(self, in_dim: int, out_dim: int, cfg: HeadConfig, where: str = "head"):
        super().__init__()
        if cfg.kind not in HEAD_KINDS:
            raise ValueError(f"{where}.kind must be one of {HEAD_KINDS}, got {cfg.kind!r}")
        if cfg.norm not in _NORMS:
            raise ValueError(f"{where}.norm must be one of {_NORMS}, got {cfg.norm!r}")
        if cfg.activation not in _ACTIVATIONS:
            raise ValueError(
                f"{where}.activation must be one of {tuple(_ACTIVATIONS)}, got {cfg.activation!r}"
            )
        self.in_dim = in_dim
        if cfg.kind == "identity":
            self.out_dim = in_dim
            self.net = nn.Identity()
            return
        self.out_dim = out_dim
        if cfg.kind == "linear":
            self.net = nn.Linear(in_dim, out_dim, bias=cfg.bias)
            return
        if cfg.num_layers < 2:
            raise ValueError(f"{where}.num_layers must be >= 2 for an mlp, got {cfg.num_layers}")
        hidden = cfg.hidden_dim or out_dim
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(cfg.num_layers - 1):
            layers.append(nn.Linear(width, hidden, bias=cfg.bias))
            if cfg.norm == "layernorm":
                layers.append(nn.LayerNorm(hidden))
            elif cfg.norm == "batchnorm":
                layers.append(_LastDimBatchNorm(hidden))
            layers.append(_ACTIVATIONS[cfg.activation]())
            if cfg.dropout:
                layers.append(nn.Dropout(cfg.dropout))
            width = hidden
        layers.append(nn.Linear(width, out_dim, bias=cfg.bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LogitScale(nn.Module):
    """Learnable temperature kept in log space (CLIP, Radford et al. 2021).

    ``forward`` returns ``exp(min(log_scale, log_max))``: the clamp at log(100) that
    open_clip applies after each optimiser step is applied here in the forward pass, so it
    holds without the trainer's help (a value above the cap gets no gradient).
    """

    def __init__(self, init: float = math.log(1 / 0.07), max_log: float = math.log(100.0)):
        super().__init__()
        # Shape (1,), not a 0-d scalar: DeepSpeed's parameter broadcast views every
        # parameter as bytes, which a 0-d tensor cannot do.
        self.log_scale = nn.Parameter(torch.tensor([float(init)]))
        self.max_log = float(max_log)

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log).exp().squeeze(0)


# ------------------------------------------------------------------ global heads


@dataclass
class AttentionPoolConfig:
    """Shape of the ``attention_pool`` heads (``model.attention_pool``)."""

    #: learned queries; their outputs are averaged into one vector.
    queries: int = 1
    heads: int = 4


class GlobalHead(nn.Module):
    """Forms a ``B×D`` embedding from a pooled feature and a set of tokens: an image
    encoder's global embedding from its projected local tokens (``model.global_head``), or
    the report embedding from the text tower's token states (``model.text_head``). ``mask``
    (bool ``B×N``) marks real tokens; None means all are. Kinds register as ``global_head``
    and are built with ``(pooled_dim, local_dim, embed_dim, projection, where, pool)``."""

    out_dim: int

    def forward(
        self, pooled: torch.Tensor, local: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError


@register("global_head", "pool")
class PooledProjection(GlobalHead):
    """``pool``: the tower's pooled feature through a projection head (CLIP, ConVIRT)."""

    def __init__(self, pooled_dim, local_dim, embed_dim, projection, where, pool=None):
        super().__init__()
        self.head = ProjectionHead(pooled_dim, embed_dim, projection, where)
        self.out_dim = self.head.out_dim

    def forward(self, pooled, local, mask=None):
        return self.head(pooled)


@register("global_head", "mean_local")
class MeanOfLocal(GlobalHead):
    """``mean_local``: the mean of the projected local tokens (BioViL, Boecking et al. 2022),
    so global and local features share one space."""

    def __init__(self, pooled_dim, local_dim, embed_dim, projection, where, pool=None):
        super().__init__()
        self.out_dim = local_dim

    def forward(self, pooled, local, mask=None):
        if mask is None:
            return local.mean(dim=1)
        weight = mask.unsqueeze(-1).to(local.dtype)
        return (local * weight).sum(1) / weight.sum(1).clamp_min(1.0)


@register("global_head", "attention_pool")
class AttentionPool(GlobalHead):
    """``attention_pool``: learned queries attend over the tokens (multi-head
    cross-attention over layer-normalised tokens, padding masked), their outputs averaged
    and projected. Lee et al. 2019's pooling by multi-head attention, as in CoCa's
    attentional pooler (Yu et al. 2022); what pools a frozen decoder-only LM's token states
    and MAE's patch tokens in ``recipes/mae_llama.yaml``."""

    def __init__(self, pooled_dim, local_dim, embed_dim, projection, where, pool=None):
        super().__init__()
        pool = pool or AttentionPoolConfig()
        if pool.queries < 1:
            raise ValueError(f"model.attention_pool.queries must be >= 1, got {pool.queries}")
        if local_dim % pool.heads:
            raise ValueError(
                f"model.attention_pool.heads ({pool.heads}) must divide the token width "
                f"{local_dim} ({where})"
            )
        self.query = nn.Parameter(torch.randn(pool.queries, local_dim) * 0.02)
        self.norm = nn.LayerNorm(local_dim)
        self.attention = nn.MultiheadAttention(local_dim, pool.heads, batch_first=True)
        self.head = ProjectionHead(local_dim, embed_dim, projection, where)
        self.out_dim = self.head.out_dim

    def attention_weights(self, local, mask=None) -> torch.Tensor:
        """``B×Q×N`` attention of each query over the tokens (averaged over heads)."""
        return self._attend(local, mask)[1]

    def _attend(self, local, mask):
        tokens = self.norm(local)
        query = self.query.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        ignore = None
        if mask is not None:
            # A row without tokens attends to its first (padding) token rather than to
            # nothing, which would be NaN; such rows are empty texts, masked downstream.
            ignore = ~mask.bool()
            ignore[:, 0] &= mask.bool().any(1)
        return self.attention(query, tokens, tokens, key_padding_mask=ignore)

    def forward(self, pooled, local, mask=None):
        pooled_tokens, _ = self._attend(local, mask)
        return self.head(pooled_tokens.mean(dim=1))
