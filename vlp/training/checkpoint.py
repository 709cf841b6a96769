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

Another world size. The per-rank files (DeepSpeed's ZeRO partitions, the trainer states)
belong to the world size that wrote them, so :func:`check_world_size` refuses a resume on
another number of ranks before any process group starts, in one line naming the command
that continues (``--reshard``). With ``--reshard``, :func:`to_universal` converts the
folder's ZeRO partitions once into DeepSpeed's universal checkpoint
(``step-N/universal/``, by ``deepspeed.checkpoint.ds_to_universal``), which an engine
configured with ``"checkpoint": {"load_universal": true}`` loads at any world size;
without ZeRO partitions (stage 0) DeepSpeed's files already fit any world size. ZeRO-0,
2 and 3 in fp32 resume exactly this way (``tests/test_faults.py``; ZeRO-1 shares ZeRO-2's
code, bf16 is untested), with three DeepSpeed 0.19.8 problems worked around in
:func:`load_resharded`. The loader and RNG states cannot
follow (see :func:`load_resharded` and ``VLPLoader.restart_resharded``).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = re.compile(r"^trainer_state_rank(\d+)\.pt$")
COMPLETE = "COMPLETE"
LATEST = "latest"
#: sub-folder of ``step-N/`` holding its universal-checkpoint conversion.
UNIVERSAL = "universal"


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
        # Made here so that a read-only run directory fails as an OSError: DeepSpeed logs a
        # failed makedirs and goes on, and torch.save then fails with a RuntimeError.
        folder.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(
            str(run_dir), tag=tag, client_state={"step": step}, save_latest=False
        )
        state = dict(trainer_state, step=step, rng=_rng_to_tensors(rng_state()))
        torch.save(state, folder / f"trainer_state_rank{rank}.pt")
    except OSError as err:
        error = err
    except RuntimeError as err:
        # torch.save reports a failed write (a disk that fills mid-file) as a RuntimeError
        # from its zip writer; any other RuntimeError is a bug and propagates.
        if not _is_write_failure(err):
            raise
        error = err
    if any_rank(error is not None):
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"{previous.name} is intact" if previous else "no earlier checkpoint exists"
        if error is None:
            reason = "another rank failed to write"
        elif isinstance(error, RuntimeError):  # torch's zip writer: no errno to show
            reason = f"a file write failed, most likely a full disk: {str(error).strip()}"
        else:
            reason = f"{type(error).__name__}: {error}"
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


#: what torch's zip writer (caffe2/serialize/inline_container.cc) raises when a write
#: fails: a disk that fills mid-file ends in "[enforce fail at inline_container.cc:...]
#: unexpected pos ...", a missing folder in "Parent directory ... does not exist".
_WRITE_FAILURES = ("inline_container.cc", "file write failed", "PytorchStreamWriter failed",
                   "Parent directory")  # fmt: skip


def _is_write_failure(err: RuntimeError) -> bool:
    return any(text in str(err) for text in _WRITE_FAILURES)


def any_rank(flag: bool) -> bool:
    """Collective: whether ``flag`` is true on some rank (also the barrier before
    ``COMPLETE``: every rank has finished writing when it returns)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class WorldSizeChanged(RuntimeError):
    """A checkpoint written by another number of ranks, resumed without ``--reshard``."""


def resume_folder(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint ``--resume`` names: ``auto`` = the newest completed one of ``run_dir``
    (None when there is none), else the given folder, which must be complete."""
    if resume == "auto":
        return latest_checkpoint(run_dir)
    folder = Path(resume)
    if not (folder / COMPLETE).is_file():
        raise FileNotFoundError(f"{folder} is not a completed checkpoint (no {COMPLETE} marker)")
    return folder


def saved_world_size(folder: str | Path) -> int:
    """How many ranks wrote ``folder``: one ``trainer_state_rank{r}.pt`` each."""
    return sum(1 for f in Path(folder).iterdir() if TRAINER_STATE.match(f.name))


def check_world_size(folder: Path, world_size: int, reshard: bool, command: str) -> bool:
    """Whether resuming ``folder`` on ``world_size`` ranks changes the world size; without
    ``reshard`` such a resume is refused with :class:`WorldSizeChanged`, whose one line
    names the checkpoint, both world sizes and ``command`` (the command that continues).
    Reads files only: call it before any process group or DeepSpeed starts."""
    saved = saved_world_size(folder)
    if saved == world_size:
        return False
    if not reshard:
        raise WorldSizeChanged(
            f"checkpoint {folder} was written by {saved} rank(s) and this job has "
            f"{world_size}: its optimizer partitions and per-rank loader and RNG states "
            f"fit {saved} rank(s) only. Resume with {saved} rank(s), or continue on "
            f"{world_size} through DeepSpeed's universal checkpoint (weights and optimizer "
            f"exact; the loader restarts the saved epoch) with: {command}"
        )
    return True


def has_zero_partitions(folder: str | Path) -> bool:
    """Whether DeepSpeed wrote per-rank ZeRO optimizer partitions (stage >= 1, or bf16)
    into ``folder``: these need the universal conversion to load at another world size."""
    return any(Path(folder).glob("*zero_pp_rank_*_optim_states.pt"))


def to_universal(folder: str | Path) -> Path:
    """Convert ``folder``'s ZeRO checkpoint into ``folder/universal/`` (once: a converted
    folder is reused) with DeepSpeed's ``ds_to_universal``; run it on one rank. The
    conversion writes into a temporary folder renamed at the end, so a conversion killed
    midway is redone, never loaded."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    folder = Path(folder)
    out = folder / UNIVERSAL
    if (out / COMPLETE).is_file():
        return out
    tmp = folder / f".{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    args = Namespace(
        input_folder=str(folder),
        output_folder=str(tmp),
        # In-process and serial: worker pools would fork a process holding a process group.
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # vlp's engine does not record DeepSpeed's universal-checkpoint info (it is for
        # tensor and pipeline parallel layouts, which vlp does not use): add the default.
        inject_missing_state=True,
    )
    ds_to_universal.main(args)
    (tmp / COMPLETE).write_text("ok\n")
    os.replace(tmp, out)
    (folder / f"latest_{UNIVERSAL}").unlink(missing_ok=True)  # ds_to_universal's pointer
    return out


def reseed(seed: int, step: int, rank: int) -> None:
    """Seed Python, NumPy and torch from (seed, step, rank): the RNG policy of a resume on
    another world size, where no saved per-rank state belongs to this rank."""
    value = (seed * 1_000_003 + step) * 1_009 + rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


class _NoFragment:
    """A stand-in for DeepSpeed's fragment mapping of a parameter: no optimizer state."""

    def get_optim_state_keys(self) -> list[str]:
        return []


def _load_nothing(*_args, **_kwargs) -> None:
    return None  # no step was saved for padding


@contextlib.contextmanager
def _stand_ins_for_padding_partitions(optimizer):
    """Work around DeepSpeed 0.19.8's ZeRO-1/2 universal load on more ranks.

    ``load_hp_checkpoint_state_from_checkpoint_dir`` collects, per parameter group, the
    saved step of the parameters this rank holds a fragment of, and reads the first:
    a rank whose partition of a small group is padding alone (a one-element logit scale
    over two ranks) holds none and fails with ``IndexError: list index out of range``.
    During the load, such a group's first parameter gets a stand-in fragment that loads
    nothing; the padding keeps its fresh optimizer state, which no weight reads."""
    patched = []
    for group in getattr(optimizer, "bit16_groups", None) or []:
        if group and all(getattr(p, "_hp_mapping", None) is None for p in group):
            param = group[0]
            patched.append((param, getattr(param, "load_hp_checkpoint_state", None)))
            param._hp_mapping = _NoFragment()
            param.load_hp_checkpoint_state = _load_nothing
    try:
        yield
    finally:
        for param, method in patched:
            param._hp_mapping = None
            param.load_hp_checkpoint_state = method


def load_resharded(engine, folder: str | Path) -> dict:
    """Restore the engine from a checkpoint of another world size: its universal
    conversion when it has ZeRO partitions (the engine must be configured with
    ``load_universal``), else DeepSpeed's files as they are. Returns ``step`` and
    ``loaders``, every saved rank's loader state in rank order; RNG is not restored."""
    folder = Path(folder)
    # DeepSpeed 0.19.8's ZeRO-3 universal load gives every parameter group the
    # hyperparameters of the first saved group (a no-decay group then decays): the
    # recipe's own (weight decay, betas, names; the trainer re-derives the learning
    # rate) are put back after the load, whatever the stage.
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    if (folder / UNIVERSAL / COMPLETE).is_file():
        with _stand_ins_for_padding_partitions(engine.optimizer):
            load_path, _ = engine.load_checkpoint(str(folder), tag=UNIVERSAL)
    else:
        load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {folder}")
    for group, kept in zip(engine.optimizer.param_groups, hyper):
        group.update(kept)
    # ZeRO-3's universal load gives every parameter group one and the same ``step``
    # tensor, which each group's Adam step then increments in place: one step counted
    # once per group. Each group gets its own copy.
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    files = sorted(
        (int(m.group(1)), f)
        for f in folder.iterdir()
        if (m := TRAINER_STATE.match(f.name)) is not None
    )
    states = [torch.load(f, weights_only=True) for _, f in files]
    return {"step": int(states[0]["step"]), "loaders": [s.get("loader") for s in states]}


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
