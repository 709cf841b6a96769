"""Faults during training, injected for real: a process SIGKILLed while writing a
checkpoint leaves a partial ``step-N/`` that ``--resume auto`` never picks, and the resumed
run continues exactly from the last complete checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.training import DEBUG, ENTRY, SMALL, env_for, run_training

FAULTS = "imports=[tests.plugins.faults]"


def test_killed_while_checkpointing_resume_auto_skips_the_partial_checkpoint(
    tmp_path, phantom_cache
):
    overrides = [*SMALL, FAULTS, "train.steps=6", "checkpoint.every=2"]
    full = run_training(tmp_path, "full", overrides=overrides, cache=phantom_cache)[0]

    run_dir = tmp_path / "killed"
    command = [sys.executable, ENTRY, DEBUG, "--run-dir", str(run_dir),
               "--out", str(tmp_path / "killed.json")]  # fmt: skip
    for item in overrides:
        command += ["--set", item]
    env = dict(env_for(phantom_cache), VLP_TEST_KILL_IN_CHECKPOINT="4")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL, mid-save
    partial = run_dir / "step-4"
    assert partial.is_dir() and any(partial.iterdir()), "DeepSpeed wrote nothing before the kill"
    assert not (partial / "COMPLETE").exists()
    assert (run_dir / "latest").read_text() == "step-2"

    resumed = run_training(
        tmp_path, "resumed", overrides=overrides, resume="auto", run_dir=run_dir,
        cache=phantom_cache,
    )[0]  # fmt: skip
    assert resumed["steps"] == [3, 4, 5, 6]
    assert resumed["losses"] == pytest.approx(full["losses"][2:], abs=1e-6)
    assert (partial / "COMPLETE").is_file()  # rewritten whole by the resumed run
