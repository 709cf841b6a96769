"""Fault injection for tests, loaded through a recipe's ``imports``.

With ``VLP_TEST_KILL_IN_CHECKPOINT=N`` in the environment, the process SIGKILLs itself
while saving checkpoint ``step-N``: after DeepSpeed has written its files and before the
trainer state and the ``COMPLETE`` marker, the moment a preempted or crashed job leaves a
partial checkpoint behind. Without the variable it changes nothing.
"""

from __future__ import annotations

import os
import signal

from vlp.training import checkpoint

_save = checkpoint.save


def _save_or_die(engine, run_dir, step, trainer_state, keep):
    target = os.environ.get("VLP_TEST_KILL_IN_CHECKPOINT")
    if target and int(target) == step:
        engine.save_checkpoint(str(run_dir), tag=checkpoint.step_tag(step), save_latest=False)
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(engine, run_dir, step, trainer_state, keep)


checkpoint.save = _save_or_die
