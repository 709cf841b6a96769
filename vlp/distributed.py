"""Process-group plumbing: where this process sits in a job, and gathers that keep gradients.

A job is one of three kinds, recognised from the environment:

* a single process (nothing set);
* ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``);
* Slurm ``srun`` with one task per accelerator (``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID``; the master is the first host of ``SLURM_JOB_NODELIST`` and the port is
  derived from ``SLURM_JOB_ID`` so every task of the job agrees on it without talking).

:func:`gather_with_grad` concatenates a tensor over ranks and lets gradients flow back to
the rank that produced each slice (``torch.distributed.nn.functional.all_gather``, whose
backward sums the incoming gradients). Slices may differ in their first dimension.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: Ports derived from a Slurm job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN).
PORT_BASE = 20000
PORT_SPAN = 40000


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as read from the environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # single | torchrun | slurm

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int_env(environ: Mapping[str, str], key: str) -> int:
    value = environ[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1,2],b`` → ``['a[1,2]', 'b']``."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm node list {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm node list {text!r}")
    parts.append("".join(current))
    return [p for p in parts if p]


def _expand_range_list(body: str, nodelist: str) -> list[str]:
    """``01-03,7`` → ``['01', '02', '03', '7']`` keeping zero padding."""
    out = []
    for item in body.split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {item!r} in Slurm node list {nodelist!r}")
            width = len(lo)
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        else:
            if not item:
                raise ValueError(f"empty item in Slurm node list {nodelist!r}")
            out.append(item)
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list such as ``node[01-03],gpu[1,4-5]-ib,other`` into host names.

    Several bracket groups in one name (``r[1-2]n[1-2]``) expand to their product, in the
    order Slurm prints them.
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        match = re.search(r"\[([^\[\]]*)\]", part)
        if match is None:
            hosts.append(part)
            continue
        prefix, suffix = part[: match.start()], part[match.end() :]
        for value in _expand_range_list(match.group(1), nodelist):
            hosts.extend(expand_nodelist(prefix + value + suffix))
    return hosts


def port_from_job_id(job_id: str) -> int:
    """A port every task of one Slurm job derives identically, spread across jobs."""
    digits = re.sub(r"\D", "", job_id)
    if not digits:
        raise ValueError(f"SLURM_JOB_ID={job_id!r} has no digits to derive a port from")
    return PORT_BASE + int(digits) % PORT_SPAN


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, world size, local rank and rendezvous address from ``environ``.

    torchrun's variables win over Slurm's, because ``srun torchrun ...`` sets both and then
    torchrun's describe the actual worker processes.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=_int_env(environ, "RANK"),
            world_size=_int_env(environ, "WORLD_SIZE"),
            local_rank=_int_env(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", "29500")),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("SLURM_PROCID is set but SLURM_JOB_NODELIST is missing")
        job_id = environ.get("SLURM_JOB_ID", "0")
        return DistEnv(
            rank=_int_env(environ, "SLURM_PROCID"),
            world_size=_int_env(environ, "SLURM_NTASKS"),
            local_rank=_int_env(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
            master_addr=environ.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
            master_port=int(environ.get("MASTER_PORT") or port_from_job_id(job_id)),
            launcher="slurm",
        )
    return DistEnv()


def init_distributed(
    backend: str | None = None,
    env: DistEnv | None = None,
    timeout: datetime.timedelta | None = None,
) -> DistEnv:
    """Join the process group described by the environment (no-op for a single process).

    ``backend`` defaults to ``nccl`` when CUDA is available and ``gloo`` otherwise. The
    CUDA device is set to the local rank before the group is created. ``timeout`` bounds
    every collective of the group (``train.collective_timeout_minutes``; ``None`` keeps
    torch's default): a rank that stops answering makes the others fail, not wait forever.
    """
    env = detect_env() if env is None else env
    if not env.is_distributed or dist.is_initialized():
        return env
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        **({"timeout": timeout} if timeout is not None else {}),
    )
    return env


def bound_every_group(timeout: datetime.timedelta) -> int:
    """Give every process group created so far the collective ``timeout``; returns how many.

    ``init_process_group``'s timeout covers the world group only: a group made later with
    ``new_group`` gets torch's default (30 minutes for gloo), and DeepSpeed makes one (a
    clone of the world group, its data-parallel group, which reduces the gradients). Call
    this after ``deepspeed.initialize``; a group created later keeps its own timeout.
    """
    from torch.distributed import distributed_c10d as c10d

    set_timeout = getattr(dist, "set_timeout", None) or c10d._set_pg_timeout  # older torch
    groups = list(getattr(getattr(c10d, "_world", None), "pg_map", {}) or [dist.group.WORLD])
    for group in groups:
        set_timeout(timeout, group)
    return len(groups)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _gather_sizes(tensor: torch.Tensor) -> list[int]:
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad], dim=0)


def gather_with_grad(tensor: torch.Tensor, equal_sizes: bool = False) -> torch.Tensor:
    """Concatenate ``tensor`` over ranks along dim 0, differentiably.

    The backward pass sums, on each rank, the gradients every rank computed for that rank's
    slice, so a loss computed on the gathered tensor by each rank and then averaged by
    DDP/DeepSpeed equals the loss of one process holding the whole batch (see
    ``tests/test_distributed_loss.py``). Ranks may hold different numbers of rows unless
    ``equal_sizes`` promises otherwise (which saves one small collective).
    """
    if world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    sizes = [tensor.shape[0]] * world_size() if equal_sizes else _gather_sizes(tensor)
    padded = _pad_rows(tensor, max(sizes))
    parts = all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` over ranks along dim 0 without autograd (ids, labels)."""
    if world_size() == 1:
        return tensor
    sizes = _gather_sizes(tensor)
    padded = _pad_rows(tensor.detach(), max(sizes)).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def rank_offset(local_rows: int, device=None) -> int:
    """Index of this rank's first row in a dim-0 concatenation over ranks."""
    if world_size() == 1:
        return 0
    sizes = gather_no_grad(torch.tensor([local_rows], device=device, dtype=torch.long))
    return int(sizes[: rank()].sum().item())
