"""Optimizer parameter groups and the learning-rate schedule.

Groups are (tower × decay): every tower (image, text, heads, objectives) gets the recipe's
``lr`` or its own ``group_lr`` entry, and within a tower, norms, biases, embeddings-free
scalars and the logit scale get no weight decay (as in CLIP/open_clip and BERT practice).
The schedule is linear warmup then cosine (or constant/linear) decay to
``min_lr_ratio × lr``, expressed as one multiplier so DeepSpeed's scheduler wrapper and
the per-group base rates compose.
"""

from __future__ import annotations

import math

import torch

from vlp.training.config import OptimConfig


def param_groups(model_groups: list[dict], cfg: OptimConfig) -> list[dict]:
    """Torch optimizer groups from ``vlp.models.model_param_groups`` buckets.

    Each bucket ``{"group": tower, "no_decay": bool, "params": [...]}`` gets its tower's
    learning rate (``group_lr`` or ``lr``) and the recipe's weight decay unless exempt. A
    tower with learning rate 0 is frozen (left out, ``requires_grad`` off).
    """
    groups = []
    for bucket in model_groups:
        lr = cfg.group_lr.get(bucket["group"])
        lr = cfg.lr if lr is None else lr
        if lr == 0:
            for param in bucket["params"]:
                param.requires_grad_(False)
            continue
        groups.append(
            {
                "params": list(bucket["params"]),
                "lr": lr,
                "weight_decay": 0.0 if bucket["no_decay"] else cfg.weight_decay,
                "name": f"{bucket['group']}/{'no_decay' if bucket['no_decay'] else 'decay'}",
            }
        )
    if not groups:
        raise ValueError("no trainable parameters: every tower is frozen (group_lr 0)")
    return groups


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of each group's base lr at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW, fused unless ``cfg.fused`` is false: torch's own kernels, so nothing is
    compiled on CPU (DeepSpeed's FusedAdam would JIT-build an extension)."""
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=cfg.fused or None
    )


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, cfg)
    )
