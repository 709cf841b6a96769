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


def entry_args(
    recipe: str,
    run_dir: Path,
    out: Path,
    overrides=(),
    resume: str | None = None,
    synthetic: int = 0,
    reshard: bool = False,
) -> list[str]:
    """The arguments of ``train_entry.py`` (its path first)."""
    args = [ENTRY, recipe, "--run-dir", str(run_dir), "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    if resume:
        args += ["--resume", resume]
    if reshard:
        args.append("--reshard")
    if synthetic:
        args += ["--synthetic", str(synthetic)]
    return args


def torchrun(ranks: int, port: int, *, nnodes: int = 1, node_rank: int = 0) -> list[str]:
    """The torchrun command line up to the script: ``ranks`` per node, static rendezvous
    at ``127.0.0.1:port`` (node 0's agent hosts it)."""
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
        f"--node_rank={node_rank}", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
        f"--master_port={port}",
    ]  # fmt: skip


def _histories(out: Path, ranks: int) -> list[dict]:
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(ranks)]


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
    args = entry_args(recipe, run_dir, out, overrides, resume, synthetic, reshard)
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [*torchrun(ranks, free_port()), *args]
    proc = subprocess.run(cmd, env=env_for(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return _histories(out, ranks)


def run_nodes(
    tmp_path: Path,
    name: str,
    *,
    nodes: int,
    overrides: list[str] = (),
    resume: str | None = None,
    run_dir: Path | None = None,
    cache: Path,
    recipe: str = DEBUG,
) -> list[dict]:
    """Train as ``nodes`` torchrun launches of one rank each on this host, as separate
    nodes would (``--nnodes``, ``--node_rank``, one static rendezvous), sharing one run
    directory as a cluster's shared file system; each rank's history."""
    run_dir = run_dir or tmp_path / name
    out = tmp_path / f"{name}.json"
    args = entry_args(recipe, run_dir, out, overrides, resume)
    port = free_port()
    procs = [
        subprocess.Popen(
            [*torchrun(1, port, nnodes=nodes, node_rank=node), *args],
            env=env_for(cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(nodes)
    ]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    for node, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"node {node} failed:\n{log[-5000:]}"
    return _histories(out, nodes)


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
