"""Recipe sections owned by the trainer: optimisation, DeepSpeed, run length, checkpoints, logging.

Plain dataclasses without heavy imports, so a recipe validates before torch or DeepSpeed
is loaded (a bad recipe fails before any process group starts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class OptimConfig:
    """AdamW with per-tower learning rates and a warmup + cosine schedule.

    ``lr`` applies to every parameter group not named in ``group_lr``; a group named in
    ``group_lr`` (an encoder by name, ``heads``, ``objectives``) gets its own rate, and
    ``null`` removes an inherited entry (a recipe that drops the text encoder of the one
    it extends writes ``group_lr: {text: null}``), e.g. the lower rate
    Liao et al. (2021) and Chauhan et al. (2020) use for BERT (2e-5). Norms, biases and
    the logit scale never get weight decay.

    ``fused`` picks torch's fused AdamW kernel (one vectorised pass over each tensor, on
    CPU and CUDA): on one CPU thread it updates a resnet18's 11.7 M parameters in ~7 ms
    where the default for-loop kernel takes ~70 ms (``benchmarks/learning_efficiency.py``,
    where the optimizer was 13 % of a step). The two agree to float rounding, not bitwise;
    ``false`` keeps torch's default kernel.
    """

    lr: float = 5.0e-4
    group_lr: dict[str, float | None] = field(default_factory=dict)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1.0e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = 0.0
    fused: bool = True

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name, lr in self.group_lr.items():
            if lr is None:
                continue
            # Group names (the recipe's encoders, heads, objectives) are checked with the
            # whole recipe (vlp.config.components).
            if lr < 0:
                raise ValueError(f"group_lr.{name} must be >= 0 (0 freezes it), got {lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")


#: DeepSpeed config keys that vlp derives from the recipe (``trainer.deepspeed_config``).
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass
class DeepSpeedConfig:
    """What vlp passes to ``deepspeed.initialize``.

    ``gradient_clipping`` has no default on purpose: DeepSpeed changed its own default from
    0.0 to 1.0 in v0.19.3, so every recipe states it (0 disables clipping).
    """

    gradient_clipping: float
    zero_stage: int = 0
    bf16: bool = False
    gradient_accumulation_steps: int = 1
    #: recompute the encoders' activations in backward (timm and Hugging Face towers; an
    #: encoder that cannot fails at build time).
    activation_checkpointing: bool = False
    #: Extra keys merged verbatim into the DeepSpeed JSON config (advanced use).
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.gradient_clipping < 0:
            raise ValueError(f"gradient_clipping must be >= 0, got {self.gradient_clipping}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be >= 1")
        # The batch is vlp's: data.batch_size per rank × accumulation × ranks, divisible by
        # construction; a second statement of it here could only agree or contradict.
        for key in sorted(set(self.extra) & set(BATCH_KEYS)):
            raise ValueError(
                f"extra.{key}: vlp sets DeepSpeed's batch keys itself (train_batch_size = "
                "data.batch_size per rank x deepspeed.gradient_accumulation_steps x ranks); "
                "set data.batch_size and deepspeed.gradient_accumulation_steps instead"
            )


@dataclass
class TrainConfig:
    """Run length, seeds and logging cadence."""

    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    #: stop after this many minutes of training (checkpoint saved, ``--resume auto``
    #: continues); 0 = no limit. A guard for fixed budgets such as ``vlp demo``.
    time_limit_minutes: float = 0.0
    #: warm start: an export folder (``vlp export``: model.safetensors) or a run directory
    #: holding ``export/``, whose tensors initialise the model before training (a resumed
    #: checkpoint then overrides them). E.g. an MAE encoder for ``recipes/mae_llama.yaml``.
    init_from: str | None = None
    #: the parameter names loaded from ``init_from``: those under these prefixes of the
    #: training module (``model.encoders.image``, ``model.heads``); empty = every tensor
    #: both have. Each selected tensor must exist in both with the same shape.
    init_include: list[str] = field(default_factory=list)
    #: a step whose loss is not finite on some rank is skipped on every rank (no backward,
    #: no update; counted as ``train/nonfinite_skipped``), and so is a step whose loss is
    #: finite but whose gradients are not (no update); this many in a row stop the run
    #: with the last checkpoint kept. With gradient accumulation the first non-finite loss
    #: stops it (the micro-batches already reduced cannot be taken back).
    max_nonfinite_steps: int = 3
    #: how long a rank waits in a collective (all-reduce, all-gather, barrier) for the
    #: others before it fails; torch's own default for gloo. A rank that died fails the
    #: collective at once; this bounds the wait for one that hangs (stopped, deadlocked).
    #: Checkpoint writes are inside collectives too: keep it above the slowest save.
    collective_timeout_minutes: float = 30.0

    def validate(self) -> None:
        if self.collective_timeout_minutes <= 0:
            raise ValueError(
                f"collective_timeout_minutes must be > 0, got {self.collective_timeout_minutes}"
            )
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.time_limit_minutes < 0:
            raise ValueError(f"time_limit_minutes must be >= 0, got {self.time_limit_minutes}")


@dataclass
class CheckpointConfig:
    """``step-N/`` DeepSpeed checkpoints every ``every`` steps and at the end; keep the last ``keep``."""

    every: int = 500
    keep: int = 3

    def validate(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ValueError("every and keep must be >= 1")
