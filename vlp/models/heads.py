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


class GlobalHead(nn.Module):
    """Forms an image encoder's ``B×D`` global embedding from its pooled feature and its
    projected local tokens. Kinds register as ``global_head`` (``model.global_head``)."""

    out_dim: int

    def forward(self, pooled: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register("global_head", "pool")
class PooledProjection(GlobalHead):
    """``pool``: the tower's pooled feature through a projection head (CLIP, ConVIRT)."""

    def __init__(self, pooled_dim: int, local_dim: int, embed_dim: int, projection, where):
        super().__init__()
        self.head = ProjectionHead(pooled_dim, embed_dim, projection, where)
        self.out_dim = self.head.out_dim

    def forward(self, pooled, local):
        return self.head(pooled)


@register("global_head", "mean_local")
class MeanOfLocal(GlobalHead):
    """``mean_local``: the mean of the projected local tokens (BioViL, Boecking et al. 2022),
    so global and local features share one space."""

    def __init__(self, pooled_dim: int, local_dim: int, embed_dim: int, projection, where):
        super().__init__()
        self.out_dim = local_dim

    def forward(self, pooled, local):
        return local.mean(dim=1)
