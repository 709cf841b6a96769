"""``vlp submit``: send ``vlp pretrain`` to Slurm through submitit, one task per GPU.

The submitted callable runs :func:`vlp.training.trainer.pretrain` with ``--resume auto``
in every task; the process group is formed from Slurm's variables
(``vlp.distributed``). On timeout or preemption submitit calls :meth:`PretrainJob.checkpoint`,
which requeues the same job: training continues from the newest completed checkpoint
(the trainer itself also checkpoints on the SIGUSR1 that precedes it).
"""

from __future__ import annotations

from pathlib import Path

from vlp.config import load_recipe


class PretrainJob:
    def __init__(self, recipe: str, overrides: list[str], run_dir: str):
        self.recipe = recipe
        self.overrides = overrides
        self.run_dir = run_dir

    def __call__(self) -> dict:
        from vlp.training.trainer import pretrain

        return pretrain(self.recipe, overrides=self.overrides, run_dir=self.run_dir, resume="auto")

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(
            PretrainJob(self.recipe, self.overrides, self.run_dir)
        )


def submit(
    recipe: str,
    *,
    overrides: list[str] | None = None,
    nodes: int = 1,
    gpus_per_node: int = 1,
    partition: str | None = None,
    account: str | None = None,
    time_min: int = 1440,
    run_dir: str | None = None,
    cpus_per_task: int = 8,
    executor=None,
):
    """Submit and return the submitit job. ``executor`` may be given (tests use a local one)."""
    overrides = overrides or []
    cfg = load_recipe(recipe, overrides)  # fail here, not on the cluster, for a bad recipe
    run_dir = str(Path(run_dir) if run_dir else Path("runs") / cfg.name)
    if executor is None:
        import submitit

        executor = submitit.AutoExecutor(
            folder=str(Path(run_dir) / "submitit" / "%j"), slurm_max_num_timeout=30
        )
        params = {
            "nodes": nodes,
            # One task per GPU; a CPU-only job (gpus_per_node 0) runs one task per node.
            "tasks_per_node": max(1, gpus_per_node),
            "cpus_per_task": cpus_per_task,
            "timeout_min": time_min,
            "slurm_signal_delay_s": 120,
            "name": f"vlp-{cfg.name}",
        }
        if gpus_per_node > 0:
            params["gpus_per_node"] = gpus_per_node
        if partition:
            params["slurm_partition"] = partition
        if account:
            params["slurm_account"] = account
        executor.update_parameters(**params)
    job = executor.submit(PretrainJob(str(recipe), overrides, run_dir))
    print(f"submitted job {job.job_id}: {recipe} -> {run_dir}")
    return job
