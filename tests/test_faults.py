"""Faults during training, injected for real: a process SIGKILLed while writing a
checkpoint leaves a partial ``step-N/`` that ``--resume auto`` never picks, and the resumed
run continues exactly from the last complete checkpoint; a full disk, non-finite losses; a
checkpoint resumed on another number of ranks (refused, or continued with ``--reshard``
and compared with an uninterrupted single process); ranks that see different shards."""

from __future__ import annotations

import math
import shlex
import subprocess
import sys

import pytest
import torch

from tests.helpers.training import DEBUG, ENTRY, SMALL, env_for, free_port, run_training
from tests.test_trainer import NO_BN

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


def test_a_full_disk_at_a_checkpoint_stops_in_one_line_and_keeps_the_last_one(
    tmp_path, phantom_cache
):
    overrides = [*SMALL, FAULTS, "train.steps=6", "checkpoint.every=2"]
    run_dir = tmp_path / "full-disk"
    command = [sys.executable, "-m", "vlp.cli", "pretrain", DEBUG, "--run-dir", str(run_dir)]
    for item in overrides:
        command += ["--set", item]
    env = dict(env_for(phantom_cache), VLP_TEST_DISK_FULL_AT_CHECKPOINT="4")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    _assert_step_4_failed_in_one_line(proc, run_dir, "No space left")
    _assert_resume_auto_continues_from_step_2(tmp_path, overrides, run_dir, phantom_cache)


def _assert_step_4_failed_in_one_line(proc, run_dir, reason: str) -> None:
    """The run stopped at checkpoint step-4 with exit 2 and one line naming ``reason`` and
    the intact step-2; the partial folder is gone and ``latest`` still names step-2."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "checkpoint step-4 could not be written" in last and reason in last, last
    assert "step-2 is intact" in last and "Traceback" not in proc.stderr
    assert not (run_dir / "step-4").exists()
    assert (run_dir / "latest").read_text() == "step-2"


def _assert_resume_auto_continues_from_step_2(tmp_path, overrides, run_dir, cache) -> None:
    resumed = run_training(
        tmp_path, "after", overrides=overrides, resume="auto", run_dir=run_dir, cache=cache
    )[0]
    assert resumed["steps"] == [3, 4, 5, 6]
    assert (run_dir / "latest").read_text() == "step-6"


def _immutable_directories_supported(folder) -> bool:
    probe = folder / "chattr-probe"
    probe.mkdir()
    try:
        if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode:
            return False
        try:
            (probe / "x").touch()
            return False  # chattr accepted but not enforced
        except OSError:
            return True
    except FileNotFoundError:  # no chattr on this machine
        return False
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)


def test_a_read_only_run_directory_at_a_checkpoint_stops_in_one_line_and_keeps_the_last_one(
    tmp_path, phantom_cache
):
    if not _immutable_directories_supported(tmp_path):
        pytest.skip("chattr +i is not available or not enforced on this file system")
    overrides = [*SMALL, FAULTS, "train.steps=6", "checkpoint.every=2"]
    run_dir = tmp_path / "read-only"
    command = [sys.executable, "-m", "vlp.cli", "pretrain", DEBUG, "--run-dir", str(run_dir)]
    for item in overrides:
        command += ["--set", item]
    env = dict(env_for(phantom_cache), VLP_TEST_READ_ONLY_AT_CHECKPOINT="4")
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["chattr", "-i", str(run_dir)], capture_output=True)
    _assert_step_4_failed_in_one_line(proc, run_dir, "PermissionError")
    _assert_resume_auto_continues_from_step_2(tmp_path, overrides, run_dir, phantom_cache)


def _bytes_under(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_a_disk_that_really_fills_during_a_checkpoint_stops_in_one_line(tmp_path, phantom_cache):
    """A real full disk, not an injected error: the run directory lies on a tmpfs sized to
    hold the run up to its first checkpoint and half of the second, so the second fails in
    the middle of DeepSpeed's own files (torch.save reports that as a RuntimeError)."""
    overrides = [*SMALL, "checkpoint.every=2"]
    sizing = run_training(
        tmp_path, "sizing", overrides=[*overrides, "train.steps=2"], cache=phantom_cache
    )
    assert sizing[0]["steps"] == [1, 2]
    run_bytes = _bytes_under(tmp_path / "sizing")
    checkpoint_bytes = _bytes_under(tmp_path / "sizing" / "step-2")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    size = run_bytes + checkpoint_bytes // 2
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        run_dir = mount / "run"
        command = [sys.executable, "-m", "vlp.cli", "pretrain", DEBUG, "--run-dir", str(run_dir)]
        for item in [*overrides, "train.steps=6"]:
            command += ["--set", item]
        proc = subprocess.run(
            command, env=env_for(phantom_cache), capture_output=True, text=True, timeout=600
        )
        _assert_step_4_failed_in_one_line(proc, run_dir, "most likely a full disk")
        # Room again: --resume auto continues from step-2.
        grown = subprocess.run(
            ["mount", "-o", f"remount,size={run_bytes + 4 * checkpoint_bytes}", str(mount)],
            capture_output=True,
        )
        assert grown.returncode == 0, grown.stderr
        _assert_resume_auto_continues_from_step_2(
            tmp_path, [*overrides, "train.steps=6"], run_dir, phantom_cache
        )
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def _tensorboard(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


NAN = (
    "objectives=[{name: local_mi, weight: 1.0, estimator: cpc, critic: {kind: separable, "
    "dim: 32}}, {name: nan_at_steps, weight: 1.0, steps: [3]}]"
)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_non_finite_loss_skips_the_step_and_keeps_the_weights_finite(
    tmp_path, phantom_cache, stage
):
    from safetensors.torch import load_file

    from vlp.training.export import export

    base = [*SMALL, FAULTS, "train.steps=5", f"deepspeed.zero_stage={stage}"]
    never = NAN.replace("steps: [3]", "steps: []")  # the same objectives, never NaN
    clean = run_training(tmp_path, "clean", overrides=[*base, never], cache=phantom_cache)[0]
    hit = run_training(tmp_path, "nan", overrides=[*base, NAN], cache=phantom_cache)[0]
    assert hit["steps"] == [1, 2, 3, 4, 5]
    assert hit["losses"][:2] == pytest.approx(clean["losses"][:2], abs=1e-7)
    assert math.isnan(hit["losses"][2]) and all(math.isfinite(v) for v in hit["losses"][3:])
    assert _tensorboard(tmp_path / "nan", "train/nonfinite_skipped")[5] == 1.0
    # The schedule is a function of the step, skipped or not (what resume re-derives).
    assert _tensorboard(tmp_path / "nan", "lr/image/decay") == _tensorboard(
        tmp_path / "clean", "lr/image/decay"
    )
    # Without the skip a NaN loss would have made every updated weight NaN.
    weights = load_file(export(tmp_path / "nan") / "model.safetensors")
    assert all(bool(torch.isfinite(v).all()) for v in weights.values())


def test_non_finite_losses_in_a_row_stop_the_run_in_one_line(tmp_path, phantom_cache):
    nan = NAN.replace("steps: [3]", "steps: [2, 3, 4]")
    command = [sys.executable, "-m", "vlp.cli", "pretrain", DEBUG,
               "--run-dir", str(tmp_path / "run")]  # fmt: skip
    for item in [*SMALL, FAULTS, nan, "train.steps=6", "train.max_nonfinite_steps=2"]:
        command += ["--set", item]
    proc = subprocess.run(
        command, env=env_for(phantom_cache), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "train.max_nonfinite_steps" in last and "2 step(s) in a row up to step 3" in last
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "step-2" / "COMPLETE").is_file()  # from before the bad steps


BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
NAN_GRAD = NAN.replace("nan_at_steps", "nan_grad_at_steps")


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_non_finite_gradients_with_a_finite_loss_skip_the_step(tmp_path, phantom_cache, stage):
    """ZeRO-0 in fp32 is skipped by the trainer (DeepSpeed would clip by a NaN norm and
    apply it); ZeRO-2/3 by DeepSpeed, whose skip the trainer counts and whose schedule it
    keeps in step."""
    from safetensors.torch import load_file

    from vlp.training.export import export

    base = [*SMALL, FAULTS, "train.steps=4", "checkpoint.every=1", "checkpoint.keep=5",
            f"deepspeed.zero_stage={stage}"]  # fmt: skip
    never = NAN_GRAD.replace("steps: [3]", "steps: []")
    clean = run_training(tmp_path, "clean", overrides=[*base, never], cache=phantom_cache)[0]
    hit = run_training(tmp_path, "nan", overrides=[*base, NAN_GRAD], cache=phantom_cache)[0]
    assert hit["losses"][:3] == pytest.approx(clean["losses"][:3], abs=1e-7)  # all finite
    assert _tensorboard(tmp_path / "nan", "train/nonfinite_skipped")[4] == 1.0
    assert _tensorboard(tmp_path / "nan", "lr/image/decay") == _tensorboard(
        tmp_path / "clean", "lr/image/decay"
    )
    weights = {
        step: load_file(export(tmp_path / "nan", tmp_path / f"w{step}", step) / "model.safetensors")
        for step in (2, 3, 4)
    }
    # Step 3 changed no weight (its forward still counted batches in BatchNorm's buffers);
    # step 4 trained again, and nothing became NaN.
    params = [k for k in weights[2] if not k.endswith(BATCHNORM_BUFFERS)]
    assert len(params) > 50
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in params)
    assert any(not torch.equal(weights[3][k], weights[4][k]) for k in weights[3])
    assert all(bool(torch.isfinite(v).all()) for v in weights[4].values())


def test_non_finite_gradients_in_a_row_stop_the_run_in_one_line(tmp_path, phantom_cache):
    nan = NAN_GRAD.replace("steps: [3]", "steps: [3, 4]")
    command = [sys.executable, "-m", "vlp.cli", "pretrain", DEBUG,
               "--run-dir", str(tmp_path / "run")]  # fmt: skip
    for item in [*SMALL, FAULTS, nan, "train.steps=6", "train.max_nonfinite_steps=2",
                 "deepspeed.zero_stage=2"]:  # fmt: skip
        command += ["--set", item]
    proc = subprocess.run(
        command, env=env_for(phantom_cache), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "train.max_nonfinite_steps" in last and "2 step(s) in a row up to step 4" in last
    assert "gradients are not finite" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "step-2" / "COMPLETE").is_file()


# ------------------------------------------------------------- another world size
# The model of tests/test_trainer.py without batch norm or dropout, on the synthetic global
# batches (the same rows at any world size): 1 process and N ranks compute the same losses.
RESHARD = [*NO_BN, "checkpoint.every=2", "train.log_every=1"]


@pytest.mark.parametrize(
    ("before", "after", "stage"),
    [(2, 1, 2), (1, 2, 2), (2, 1, 3), (1, 2, 3), (2, 1, 0)],
    ids=["2to1-zero2", "1to2-zero2", "2to1-zero3", "1to2-zero3", "2to1-zero0"],
)
def test_reshard_resumes_a_checkpoint_on_another_world_size_exactly(
    tmp_path, phantom_cache, before, after, stage
):
    overrides = [*RESHARD, f"deepspeed.zero_stage={stage}"]
    kw = dict(synthetic=8, cache=phantom_cache)
    # The reference: one process, never interrupted, on the same global batches.
    full = run_training(tmp_path, "full", overrides=[*overrides, "train.steps=4"], **kw)[0]
    run_dir = tmp_path / "run"
    first = run_training(
        tmp_path, "first", ranks=before, overrides=[*overrides, "train.steps=2"],
        run_dir=run_dir, **kw,
    )  # fmt: skip
    second = run_training(
        tmp_path, "second", ranks=after, overrides=[*overrides, "train.steps=4"],
        run_dir=run_dir, resume="auto", reshard=True, **kw,
    )  # fmt: skip
    assert first[0]["losses"] == pytest.approx(full["losses"][:2], abs=1e-5)
    for history in second:
        # Step 3 reads the loaded weights; step 4 the weights updated with the loaded
        # Adam moments, step count and learning rate.
        assert history["steps"] == [3, 4]
        assert history["losses"] == pytest.approx(full["losses"][2:], abs=1e-5)
    assert abs(full["losses"][3] - full["losses"][2]) > 1e-3, "training did not move"
    assert (run_dir / "step-2" / "universal" / "COMPLETE").is_file() == (stage > 0)
    log = (run_dir / "log.txt").read_text()
    assert f"was written by {before} rank(s), this job has {after}" in log
    assert (run_dir / "latest").read_text() == "step-4"


def test_another_world_size_without_reshard_is_refused_in_one_line_naming_the_command(
    tmp_path, phantom_cache
):
    sets = [*RESHARD, "deepspeed.zero_stage=2"]
    run_dir = tmp_path / "run"
    run_training(
        tmp_path, "two", ranks=2, overrides=[*sets, "train.steps=2"], synthetic=8,
        run_dir=run_dir, cache=phantom_cache,
    )  # fmt: skip
    log_before = (run_dir / "log.txt").read_text()
    args = ["pretrain", DEBUG, "--run-dir", str(run_dir), "--resume", "auto"]
    for item in [*sets, "train.steps=3"]:
        args += ["--set", item]
    env = env_for(phantom_cache)
    proc = subprocess.run(
        [sys.executable, "-m", "vlp.cli", *args], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("vlp pretrain: error: ")
    assert (
        f"checkpoint {run_dir / 'step-2'} was written by 2 rank(s) and this job has 1" in lines[0]
    )
    command = lines[0].split("with: ", 1)[1]
    assert shlex.split(command) == ["vlp", *args, "--reshard"]
    # Refused before anything started: no process group, no log line, nothing converted.
    assert (run_dir / "log.txt").read_text() == log_before
    assert not (run_dir / "step-2" / "universal").exists()
    # The command it names continues the run (on the phantom shards; 1 step).
    proc = subprocess.run(
        [sys.executable, "-m", "vlp.cli", *shlex.split(command)[1:]], env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "latest").read_text() == "step-3"


# ------------------------------------------------------ shard lists that differ by rank


def test_ranks_that_resolve_different_shard_lists_stop_in_one_line(tmp_path, phantom_cache):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(4):  # never read: the check comes before any loader
        (shards / f"shard-{i:03d}.tar").write_bytes(b"")
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        f"--log-dir={logs}", "--redirects=3", "-m", "vlp.cli",
        "pretrain", DEBUG, "--run-dir", str(run_dir),
        "--set", "imports=[tests.plugins.shard_view]", "--set", f"data.shards={shards}",
    ]  # fmt: skip
    env = dict(env_for(phantom_cache), VLP_TEST_HIDE_LAST_SHARD_ON_RANK="1")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    stderr = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(stderr) == [0, 1], (proc.stderr[-3000:], list(logs.rglob("*")))
    for rank, text in stderr.items():
        # torch warns once at import under torchrun (no CUDA runtime); vlp's is one line.
        errors = [line for line in text.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "Traceback" not in text, (rank, text)
        assert errors[0].startswith("vlp pretrain: error: "), errors
        assert "data.shards: the ranks resolved" in errors[0]
        assert "rank 0: 4 shard(s); rank 1: 3 shard(s)" in errors[0]
        assert f"rank 0 has {shards / 'shard-003.tar'}, rank 1 has (none)" in errors[0]
    assert "exitcode  : 2" in proc.stderr  # torchrun's summary: every rank exited with 2
    assert not run_dir.exists()  # before the run directory, the model and DeepSpeed
