"""Fault injection for tests, loaded through a recipe's ``imports``.

With ``VLP_TEST_KILL_IN_CHECKPOINT=N`` in the environment, the process SIGKILLs itself
while saving checkpoint ``step-N``: after DeepSpeed has written its files and before the
trainer state and the ``COMPLETE`` marker, the moment a preempted or crashed job leaves a
partial checkpoint behind. With ``VLP_TEST_DISK_FULL_AT_CHECKPOINT=N`` the disk fills at
the same moment (``OSError`` ENOSPC); with ``VLP_TEST_READ_ONLY_AT_CHECKPOINT=N`` the run
directory is made immutable (``chattr +i``) just before checkpoint ``step-N``. With ``VLP_TEST_KILL_RANK_AT_STEP=R:N`` rank R
SIGKILLs itself at the start of the training forward of step N (1-based), the other ranks
then waiting in that step's collectives; ``VLP_TEST_STOP_RANK_AT_STEP=R:N`` SIGSTOPs it
there instead (a hung rank: alive, never answering). Without the variables it changes
nothing.

The objective ``nan_at_steps`` makes the loss NaN on chosen training steps,
``nan_grad_at_steps`` keeps the loss finite and makes its gradients NaN.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from vlp.objectives.base import Objective, ObjectiveOutput
from vlp.registry import register
from vlp.training import checkpoint
from vlp.training.module import PretrainingModule

_save = checkpoint.save


def _save_or_die(engine, run_dir, step, trainer_state, keep):
    target = os.environ.get("VLP_TEST_KILL_IN_CHECKPOINT")
    if target and int(target) == step:
        engine.save_checkpoint(str(run_dir), tag=checkpoint.step_tag(step), save_latest=False)
        os.kill(os.getpid(), signal.SIGKILL)
    full = os.environ.get("VLP_TEST_DISK_FULL_AT_CHECKPOINT")
    if full and int(full) == step:
        _disk_full_after_deepspeed(engine)
    read_only = os.environ.get("VLP_TEST_READ_ONLY_AT_CHECKPOINT")
    if read_only and int(read_only) == step:
        # A real refusal by the file system, not an injected exception: the run directory
        # becomes immutable (no entry can be created, renamed or removed in it).
        subprocess.run(["chattr", "+i", str(run_dir)], check=True)
    return _save(engine, run_dir, step, trainer_state, keep)


def _disk_full_after_deepspeed(engine) -> None:
    """DeepSpeed writes its files, then the disk is full (the trainer state fails)."""
    import errno

    save_checkpoint = engine.save_checkpoint

    def full(*args, **kwargs):
        save_checkpoint(*args, **kwargs)
        engine.save_checkpoint = save_checkpoint
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    engine.save_checkpoint = full


checkpoint.save = _save_or_die


# ----------------------------------------------------------------- a rank dies mid-step

_forward = PretrainingModule.forward
#: printed on stderr with the Unix time just before a rank kills or stops itself.
FAULT_AT = "VLP_TEST_FAULT_AT"


def _target(variable: str, step: int) -> bool:
    """Whether ``variable`` (``RANK:STEP``) names this rank and the 1-based ``step``."""
    import torch.distributed as dist

    value = os.environ.get(variable)
    if not value:
        return False
    rank, at = (int(part) for part in value.split(":"))
    return dist.is_initialized() and dist.get_rank() == rank and at == step


def _forward_or_die(self, batch):
    if self.training:  # the trainer sets ``step`` (0-based) before each training forward
        for variable, sig in (
            ("VLP_TEST_KILL_RANK_AT_STEP", signal.SIGKILL),
            ("VLP_TEST_STOP_RANK_AT_STEP", signal.SIGSTOP),
        ):
            if _target(variable, self.step + 1):
                # The moment of the fault, for the tests to time the job's exit from it.
                print(f"{FAULT_AT} {time.time():.3f}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), sig)
    return _forward(self, batch)


PretrainingModule.forward = _forward_or_die


# ----------------------------------------------------------------- a non-finite loss


@dataclass
class NanAtStepsConfig:
    #: training forward passes (1-based) whose loss is NaN.
    steps: list[int] = field(default_factory=list)
    image_key: str = "image_global"


@register("objective", "nan_at_steps", config=NanAtStepsConfig)
class NanAtSteps(Objective):
    """Adds 0 to the loss, or NaN on the listed training forward passes."""

    def __init__(self, config: NanAtStepsConfig, dims):
        super().__init__(config, dims)
        self.calls = 0

    @classmethod
    def features_needed(cls, config: NanAtStepsConfig) -> frozenset[str]:
        return frozenset({config.image_key})

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        if self.training:
            self.calls += 1
        zero = 0.0 * features[self.config.image_key].sum()
        bad = self.training and self.calls in self.config.steps
        return ObjectiveOutput({"nan": zero + (float("nan") if bad else 0.0)}, {})


# ------------------------------------------------- a finite loss with non-finite gradients


class _NanBackward(torch.autograd.Function):
    """Identity forward; its backward returns NaN: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@register("objective", "nan_grad_at_steps", config=NanAtStepsConfig)
class NanGradAtSteps(Objective):
    """Adds 0 to the loss; on the listed training forward passes the gradient it sends to
    the image embedding (and so to the image tower and head) is NaN."""

    def __init__(self, config: NanAtStepsConfig, dims):
        super().__init__(config, dims)
        self.calls = 0

    @classmethod
    def features_needed(cls, config: NanAtStepsConfig) -> frozenset[str]:
        return frozenset({config.image_key})

    def forward(self, features: dict, batch: dict) -> ObjectiveOutput:
        if self.training:
            self.calls += 1
        image = features[self.config.image_key]
        if self.training and self.calls in self.config.steps:
            image = _NanBackward.apply(image)
        return ObjectiveOutput({"nan_grad": 0.0 * image.sum()}, {})
