"""Step checkpoints: ``RUN_DIR/step-N/`` folders written by DeepSpeed, plus per-rank trainer state.

Layout (torchtitan-style step folders, DeepSpeed's own files inside)::

    RUN_DIR/
      latest                  text: the tag of the newest *completed* checkpoint ("step-200")
      step-200/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   (DeepSpeed)
        trainer_state_rank{r}.pt   step, loader state, RNG states of rank r
        COMPLETE                   written after every rank finished writing

DeepSpeed keeps its ``client_state`` only in the data-parallel rank 0 file, but RNG states
differ per rank, so each rank writes its own small ``trainer_state_rank{r}.pt`` (plain
tensors and numbers, loaded with ``weights_only=True``). ``latest`` is replaced atomically
and only after the ``COMPLETE`` marker exists, so a job killed while saving never leaves
``latest`` pointing at a partial folder.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STEP_DIR = re.compile(r"^step-(\d+)$")
COMPLETE = "COMPLETE"
LATEST = "latest"


def step_tag(step: int) -> str:
    return f"step-{step}"


def completed_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every completed checkpoint, oldest first."""
    run_dir = Path(run_dir)
    found = []
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            match = STEP_DIR.match(child.name)
            if match and (child / COMPLETE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder named by ``latest`` if it is complete, else the newest complete one."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        candidate = run_dir / pointer.read_text().strip()
        if (candidate / COMPLETE).is_file():
            return candidate
    done = completed_checkpoints(run_dir)
    return done[-1][1] if done else None


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only run directory, ...): the
    run stops, the previous complete checkpoint and ``latest`` are left as they were."""


def save(engine, run_dir: str | Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    A rank that cannot write (an ``OSError``: no space, a read-only or vanished run
    directory) does not leave the others waiting: the failure is all-reduced before the
    ``COMPLETE`` marker, the partial folder is removed and :class:`CheckpointWriteError`
    names the error and the checkpoint still intact. (Assumes the failing write returns
    on every rank, e.g. a shared file system that is full for all of them.)"""
    run_dir = Path(run_dir)
    tag = step_tag(step)
    folder = run_dir / tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    error = None
    try:
        if rank == 0 and folder.exists():  # a partial folder from a killed save
            shutil.rmtree(folder)
        _barrier()
        engine.save_checkpoint(
            str(run_dir), tag=tag, client_state={"step": step}, save_latest=False
        )
        state = dict(trainer_state, step=step, rng=_rng_to_tensors(rng_state()))
        torch.save(state, folder / f"trainer_state_rank{rank}.pt")
    except OSError as err:
        error = err
    if _any_rank(error is not None):
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"{previous.name} is intact" if previous else "no earlier checkpoint exists"
        reason = f"{type(error).__name__}: {error}" if error else "another rank failed to write"
        raise CheckpointWriteError(
            f"checkpoint {tag} could not be written in {run_dir} ({reason}); the run stops; "
            f"{kept}, and --resume auto continues from it once the run directory is writable"
        )
    if rank == 0:
        (folder / COMPLETE).write_text(f"{step}\n")
        tmp = run_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, run_dir / LATEST)
        for _, old in completed_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return folder


def _any_rank(flag: bool) -> bool:
    """Collective: whether ``flag`` is true on some rank (also the barrier before
    ``COMPLETE``: every rank has finished writing when it returns)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def load(engine, folder: str | Path) -> dict:
    """Restore engine (model, optimizer, scheduler) and this rank's trainer state and RNG."""
    folder = Path(folder)
    if not (folder / COMPLETE).is_file():
        raise FileNotFoundError(f"{folder} is not a completed checkpoint (no {COMPLETE} marker)")
    rank = dist.get_rank() if dist.is_initialized() else 0
    state_file = folder / f"trainer_state_rank{rank}.pt"
    if not state_file.is_file():
        raise FileNotFoundError(
            f"{state_file} missing: the checkpoint was written with a different number of ranks"
        )
    load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {folder}")
    state = torch.load(state_file, weights_only=True)
    set_rng_state(_rng_from_tensors(state.pop("rng")))
    return state


def _rng_to_tensors(state: dict) -> dict:
    """RNG state as tensors and plain numbers, so nothing needs pickling of custom objects."""
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out = {
        "python": (version, list(internal), gauss),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
        "torch": state["torch"],
    }
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def _rng_from_tensors(state: dict) -> dict:
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out = {
        "python": (version, tuple(internal), gauss),
        "numpy": (kind, keys.numpy(), pos, has_gauss, cached),
        "torch": state["torch"],
    }
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out
