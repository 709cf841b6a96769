"""Launching the trainer in tests: ``tests/helpers/train_entry.py`` with a recipe and
``--set`` overrides, as 1 process or as ``ranks`` gloo ranks under torchrun, in a clean
environment (CPU DeepSpeed, one OpenMP thread, a private ``VLP_CACHE``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY = str(ROOT / "tests" / "helpers" / "train_entry.py")
DEBUG = str(ROOT / "recipes" / "debug.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(tmp_cache: Path) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "VLP_CACHE": str(tmp_cache),
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": str(ROOT),
            "CUDA_VISIBLE_DEVICES": "",
        }
    )
    for key in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_JOB_ID",
        "SLURM_PROCID",
    ):
        env.pop(key, None)
    return env


def run_training(
    tmp_path: Path,
    name: str,
    *,
    ranks: int = 1,
    overrides: list[str] = (),
    resume: str | None = None,
    reshard: bool = False,
    synthetic: int = 0,
    run_dir: Path | None = None,
    cache: Path,
    recipe: str = DEBUG,
) -> list[dict]:
    """Train ``recipe`` (default: the debug recipe) with ``overrides``; each rank's history
    (steps, losses) as the entry point wrote it."""
    run_dir = run_dir or tmp_path / name
    out = tmp_path / f"{name}.json"
    args = [ENTRY, recipe, "--run-dir", str(run_dir), "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    if resume:
        args += ["--resume", resume]
    if reshard:
        args.append("--reshard")
    if synthetic:
        args += ["--synthetic", str(synthetic)]
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args,
        ]  # fmt: skip
    proc = subprocess.run(cmd, env=env_for(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(ranks)]


#: a recipe shrunk to seconds: tiny towers and phantom, 64 px, no augmentation.
SMALL = [
    "model.encoders.image.tower.name=resnet18",
    "model.encoders.text.tower.name=tiny",
    "data.image_size=64",
    "data.batch_size=4",
    "data.workers=0",
    "data.augment.enabled=false",
    "data.phantom={patients: 24, seed: 0, image_size: 128}",
    "train.log_every=1",
    "checkpoint.every=2",
]


def check_trains_and_resumes(tmp_path: Path, cache: Path, recipe: str, extra=()) -> Path:
    """Train ``recipe`` (shrunk by :data:`SMALL` and ``extra``) 4 steps straight, and 2 + 2
    steps with ``--resume auto``; the losses must agree to 1e-6 and move. Returns the
    resumed run's directory."""
    small = [*SMALL, *extra]
    kw = dict(cache=cache, recipe=recipe)
    full = run_training(tmp_path, "full", overrides=[*small, "train.steps=4"], **kw)
    run_dir = tmp_path / "split"
    first = run_training(
        tmp_path, "first", overrides=[*small, "train.steps=2"], run_dir=run_dir, **kw
    )
    second = run_training(
        tmp_path,
        "second",
        overrides=[*small, "train.steps=4"],
        resume="auto",
        run_dir=run_dir,
        **kw,
    )
    assert first[0]["steps"] == [1, 2] and second[0]["steps"] == [3, 4]
    resumed = first[0]["losses"] + second[0]["losses"]
    assert resumed == pytest.approx(full[0]["losses"], abs=1e-6), (resumed, full[0]["losses"])
    assert len(set(full[0]["losses"])) == 4, "training did not move"
    return run_dir
