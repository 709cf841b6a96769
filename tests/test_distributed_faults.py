"""A rank lost mid-step, and ranks on two nodes: real torchrun jobs of 2 gloo ranks.

A rank SIGKILLed (or SIGSTOPped: alive, never answering) inside a training step must end
the job in bounded time with the last completed checkpoint intact, and ``--resume auto``
must continue from it exactly. Two torchrun launches of one rank each (two "nodes" on this
host, one shared run directory) must train what one launch of 2 ranks trains.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.helpers.training import (
    DEBUG,
    SMALL,
    env_for,
    free_port,
    run_nodes,
    run_training,
    torchrun,
)
from tests.plugins.faults import FAULT_AT

FAULTS = "imports=[tests.plugins.faults]"
#: 4 steps, checkpoints at 2 and 4: a fault at step 3 leaves step-2 as the last one.
OVERRIDES = [*SMALL, FAULTS, "train.steps=4", "checkpoint.every=2"]
#: generous: a lost rank must end the job, not that it ends fast on 2 shared cores.
JOB_BOUND_S = 180


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, phantom_cache):
    """The uninterrupted reference: one torchrun launch of 2 ranks, 4 steps."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    return run_training(tmp, "straight", ranks=2, overrides=OVERRIDES, cache=phantom_cache)


def _faulted_job(run_dir, cache, fault: dict, extra=()):
    """``vlp pretrain`` as 2 torchrun ranks with ``fault`` in the environment; the
    finished process, its wall time, and the seconds from the fault to the job's exit."""
    command = [*torchrun(2, free_port()), "-m", "vlp.cli", "pretrain", DEBUG,
               "--run-dir", str(run_dir)]  # fmt: skip
    for item in [*OVERRIDES, *extra]:
        command += ["--set", item]
    start = time.time()
    proc = subprocess.run(
        command, env=dict(env_for(cache), **fault), capture_output=True, text=True,
        timeout=2 * JOB_BOUND_S,
    )  # fmt: skip
    end = time.time()
    fault_at = re.search(rf"^{FAULT_AT} ([0-9.]+)$", proc.stderr, re.MULTILINE)
    assert fault_at, f"the fault never happened:\n{proc.stderr[-5000:]}"
    return proc, end - start, end - float(fault_at.group(1))


def _survivor_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("vlp pretrain: error:")]
    assert len(lines) == 1, stderr[-5000:]
    return lines[0]


def test_a_rank_killed_mid_step_ends_the_job_and_resume_auto_continues_exactly(
    tmp_path, phantom_cache, two_ranks
):
    run_dir = tmp_path / "killed"
    proc, wall, after_fault = _faulted_job(
        run_dir, phantom_cache, {"VLP_TEST_KILL_RANK_AT_STEP": "1:3"}
    )
    assert proc.returncode != 0
    assert wall < JOB_BOUND_S and after_fault < 60, (wall, after_fault)
    line = _survivor_line(proc.stderr)
    assert "rank 0: a collective failed at step 3 (" in line, line
    assert "another rank died or stopped answering" in line
    assert "step-2 is intact and --resume auto continues from it" in line
    assert not re.search(r'File ".*/vlp/', proc.stderr), "a traceback from vlp"
    assert (run_dir / "latest").read_text() == "step-2"
    assert (run_dir / "step-2" / "COMPLETE").is_file()

    resumed = run_training(
        tmp_path, "resumed", ranks=2, overrides=OVERRIDES, resume="auto", run_dir=run_dir,
        cache=phantom_cache,
    )  # fmt: skip
    for rank, history in enumerate(resumed):
        assert history["steps"] == [3, 4], rank
        assert history["losses"] == pytest.approx(two_ranks[rank]["losses"][2:], abs=1e-6)


def test_a_rank_that_hangs_mid_step_ends_the_job_at_the_collective_timeout(
    tmp_path, phantom_cache, two_ranks
):
    run_dir = tmp_path / "stopped"
    timeout_min = 0.3
    proc, wall, after_fault = _faulted_job(
        run_dir,
        phantom_cache,
        {"VLP_TEST_STOP_RANK_AT_STEP": "1:3"},
        extra=[f"train.collective_timeout_minutes={timeout_min}"],
    )
    assert proc.returncode != 0
    # The survivor fails at the timeout; torchrun then SIGTERMs the stopped rank, which a
    # stopped process does not act on, and SIGKILLs it after its 30 s grace period.
    assert wall < JOB_BOUND_S and after_fault < 60 * timeout_min + 30 + 60, (wall, after_fault)
    assert after_fault > 60 * timeout_min - 1, "the survivor did not wait for the timeout"
    line = _survivor_line(proc.stderr)
    assert "rank 0: a collective failed at step 3 (" in line and "Timed out" in line, line
    assert "step-2 is intact" in line
    assert (run_dir / "latest").read_text() == "step-2"
    assert (run_dir / "step-2" / "COMPLETE").is_file()


def test_two_nodes_of_one_rank_train_as_one_node_of_two_and_resume(
    tmp_path, phantom_cache, two_ranks
):
    run_dir = tmp_path / "nodes"
    first = run_nodes(
        tmp_path, "first", nodes=2, overrides=[*SMALL, FAULTS, "train.steps=2", "checkpoint.every=2"],
        run_dir=run_dir, cache=phantom_cache,
    )  # fmt: skip
    assert (run_dir / "latest").read_text() == "step-2"
    second = run_nodes(
        tmp_path, "second", nodes=2, overrides=OVERRIDES, resume="auto", run_dir=run_dir,
        cache=phantom_cache,
    )  # fmt: skip
    for rank in range(2):
        assert first[rank]["steps"] == [1, 2] and second[rank]["steps"] == [3, 4]
        # The same 2 ranks and global batches as one launch: the nodes change nothing,
        # and the resumed steps continue the 4-step run exactly.
        losses = first[rank]["losses"] + second[rank]["losses"]
        assert losses == pytest.approx(two_ranks[rank]["losses"], abs=1e-6)
    assert len(set(two_ranks[0]["losses"])) == 4, "training did not move"
    assert (run_dir / "step-4" / "COMPLETE").is_file()
    assert sorted(p.name for p in (run_dir / "step-4").glob("trainer_state_rank*.pt")) == [
        "trainer_state_rank0.pt",
        "trainer_state_rank1.pt",
    ]


def test_only_collective_errors_about_a_lost_peer_are_reworded():
    import torch.distributed as dist

    from vlp.training.trainer import is_peer_failure

    def raised(err):
        try:
            raise err
        except BaseException as caught:
            return caught

    # Raised by torch.distributed's own classes, saying a peer is gone: reworded.
    assert is_peer_failure(raised(dist.DistBackendError("Connection closed by peer")))
    assert is_peer_failure(raised(dist.DistNetworkError("Timed out waiting 18000ms for recv")))
    # Our own code (not a torch.distributed frame), even with the same words: a bug.
    assert not is_peer_failure(raised(RuntimeError("Connection reset by peer")))
    # torch.distributed, but a misuse, not a lost peer.
    assert not is_peer_failure(raised(dist.DistBackendError("Tensors must be contiguous")))
    assert not is_peer_failure(raised(ValueError("timed out")))
