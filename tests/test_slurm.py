"""`sbatch slurm/pretrain.sh recipes/debug.yaml` on a real one-node Slurm with 2 tasks.

The cluster (Debian's slurmctld, slurmd, munge) is installed when absent and started by
the test, and stopped afterwards. If this machine cannot run Slurm, the test is skipped
with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.slurm_cluster import SlurmUnavailable, start_cluster

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as err:
        pytest.skip(f"no Slurm on this machine: {err}")
    yield cluster
    cluster.stop()


@pytest.mark.slurm
def test_sbatch_pretrain_two_tasks_leaves_checkpoint(cluster, tmp_path):
    run_dir = tmp_path / "run"
    cluster.env.update(
        {"VLP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        cluster.env.pop(key, None)
    job = cluster.sbatch(
        [
            "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={tmp_path / 'job.out'}",
            "slurm/pretrain.sh", "recipes/debug.yaml", "--run-dir", str(run_dir),
            "--set", "train.steps=3", "--set", "checkpoint.every=3",
        ],
        cwd=ROOT,
    )  # fmt: skip
    state = cluster.wait(job, timeout=600)
    output = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert state == "COMPLETED", f"job {job} ended {state}\n{output[-4000:]}\n{cluster.logs()}"
    assert "run debug: 2 rank(s)" in output
    assert (run_dir / "step-3" / "COMPLETE").is_file()
    assert (run_dir / "latest").read_text() == "step-3"
    # Both ranks wrote their own trainer state (loader position and RNG).
    assert sorted(p.name for p in (run_dir / "step-3").glob("trainer_state_rank*.pt")) == [
        "trainer_state_rank0.pt",
        "trainer_state_rank1.pt",
    ]
    assert os.path.getsize(run_dir / "config.yaml") > 0


@pytest.mark.slurm
def test_vlp_submit_through_submitit_runs_on_slurm(cluster, tmp_path):
    """`vlp submit` (the README's submitit path) on the same cluster, one CPU task."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    env = dict(
        cluster.env, VLP_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"
    )
    proc = subprocess.run(
        [
            sys.executable, "-m", "vlp.cli", "submit", "recipes/debug.yaml", "--gpus-per-node", "0", "--cpus-per-task", "1",
            "--time", "10", "--run-dir", str(run_dir), "--set", "train.steps=2", "--set", "checkpoint.every=2",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split("submitted job ")[1].split(":")[0]
    state = cluster.wait(job, timeout=600)
    logs = "\n".join(p.read_text()[-3000:] for p in (run_dir / "submitit").rglob("*.err"))
    assert state == "COMPLETED", f"{state}\n{logs}\n{cluster.logs()}"
    assert (run_dir / "step-2" / "COMPLETE").is_file()
