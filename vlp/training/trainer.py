"""``vlp pretrain``: one recipe, from one CPU process to many Slurm GPU nodes, under DeepSpeed.

The flow of :func:`pretrain`:

1. load and validate the recipe (a bad recipe fails here, before any process group);
2. detect the launch (single process, torchrun, Slurm srun) and start the process group;
3. prepare the run directory (``config.yaml``, ``log.txt``, ``tensorboard/``) and the data
   (phantom shards built into a cache on first use when the recipe names no shards);
4. build the training module (``vlp.training.module``: the model's encoders and heads, and
   the objectives), the parameter groups and schedule, and hand them to
   ``deepspeed.initialize``;
5. resume from ``--resume`` (a checkpoint folder, or ``auto`` for the newest completed one);
6. train, checkpointing into ``step-N/`` every ``checkpoint.every`` steps, at the end, and
   at the next step boundary after SIGUSR1/SIGTERM (then requeue under Slurm).
"""

from __future__ import annotations

import datetime
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vlp.config import load_recipe
from vlp.config.loader import dump_yaml
from vlp.config.schema import RecipeConfig
from vlp.training.monitor import LOG, Monitor, setup_logging

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM; the loop checks it at step boundaries (all ranks agree).

    The handler only sets the flag, so a signal never interrupts a collective. A rank
    blocked in one when torchrun sends SIGTERM (because another rank died) runs the
    handler only once the collective returns: at once with an error when the peer's
    connection closed, else at ``train.collective_timeout_minutes``; the error then ends
    the rank (:class:`CollectiveFailed`), whatever the flag. Should neither come first,
    torchrun sends SIGKILL after its grace period (30 s), so the job cannot hang.
    """

    def __init__(self):
        self.raised = False
        self.signum = None

    def install(self) -> None:
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.raised = True
        self.signum = signum


def deepspeed_config(cfg: RecipeConfig, world_size: int) -> dict:
    ds = cfg.deepspeed
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": cfg.data.batch_size * ds.gradient_accumulation_steps * world_size,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.bf16},
        "steps_per_print": 10**9,  # vlp does its own logging
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    for key, value in ds.extra.items():
        config[key] = value
    return config


def default_run_dir(cfg: RecipeConfig) -> Path:
    return Path("runs") / cfg.name


def _grad_norm(module) -> float:
    import torch

    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _write_objective_figures(module, folder: Path, step: int) -> None:
    """Each objective's checkpoint-time figures (e.g. MAE reconstructions); a figure that
    fails is logged, never the end of the run."""
    for name, objective in module.objectives.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for path in objective.write_figures(folder, step):
                LOG.info("objective %s: wrote %s", name, path)
        except Exception as err:  # a plot must not cost a training run
            LOG.warning("objective %s: figure at step %d failed: %s", name, step, err)


def checkpoint_due(step: int, cfg: RecipeConfig) -> bool:
    """Whether optimizer step ``step`` (1-based) ends with a regular checkpoint: every
    ``checkpoint.every`` steps and at the last (a stop adds one wherever it comes)."""
    return step % cfg.checkpoint.every == 0 or step == cfg.train.steps


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _requeue_if_slurm() -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    if os.environ.get("SLURM_RESTART_COUNT") is None and os.environ.get("VLP_REQUEUE", "1") == "0":
        return
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=60)
        LOG.info("requeued Slurm job %s", job)
    except (OSError, subprocess.SubprocessError) as err:
        LOG.warning("could not requeue Slurm job %s: %s", job, err)


def check_shards_exist(cfg: RecipeConfig, source: str | None) -> None:
    """Fail before any process group or DeepSpeed starts when ``data.shards`` names shards
    that are not there: one ``ConfigError`` line (empty ``data.shards`` is the phantom)."""
    from vlp.config.loader import ConfigError
    from vlp.data.shards import ShardError, resolve_shards

    if not cfg.data.shards:
        return
    try:
        if not resolve_shards(cfg.data.shards):
            raise ShardError(f"{cfg.data.shards}: the shard list is empty")
    except ShardError as err:
        raise ConfigError(source, "data.shards", str(err)) from None


def check_same_shards(cfg: RecipeConfig, source: str | None) -> None:
    """Collective: every rank resolves ``data.shards`` itself, and all must get the same
    list, in the same order (the loader deals it to ranks by position), or samples would
    be read twice or never. A glob or folder resolved on node-local disks that differ is
    the usual cause. Each rank's (count, sha256 of the list) is all-gathered; on a
    difference every rank raises one ``ConfigError`` line naming the ranks, their counts
    and the first differing shard, before the model or DeepSpeed is built."""
    import hashlib

    import torch.distributed as dist

    from vlp.config.loader import ConfigError
    from vlp.data import shards

    if not cfg.data.shards or dist.get_world_size() == 1:
        return  # the phantom's shards are built by one code path from the recipe alone
    urls = [shard.url for shard in shards.resolve_shards(cfg.data.shards, "train")]
    digest = hashlib.sha256("\n".join(urls).encode()).hexdigest()
    views: list = [None] * dist.get_world_size()
    dist.all_gather_object(views, (len(urls), digest))
    if len(set(views)) == 1:
        return
    lists: list = [None] * dist.get_world_size()
    dist.all_gather_object(lists, urls)  # only on a mismatch: find the first difference
    groups: dict = {}
    for r, view in enumerate(views):
        groups.setdefault(view, []).append(r)
    seen = "; ".join(
        f"rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}: {count} shard(s)"
        for (count, _), ranks in groups.items()
    )
    first, other = lists[0], next(lst for lst in lists if lst != lists[0])
    other_rank = lists.index(other)
    at = next((i for i, (a, b) in enumerate(zip(first, other)) if a != b), None)
    at = min(len(first), len(other)) if at is None else at
    shown = [lst[at] if at < len(lst) else "(none)" for lst in (first, other)]
    raise ConfigError(
        source,
        "data.shards",
        f"the ranks resolved {cfg.data.shards} to different shard lists ({seen}); first "
        f"difference at shard {at}: rank 0 has {shown[0]}, rank {other_rank} has {shown[1]}. "
        "Every rank must see the same shards in the same order (a shared file system, or "
        "a manifest.json, not a folder on node-local disks that differ)",
    )


def check_init_from(cfg: RecipeConfig, source: str | None) -> None:
    """``train.init_from`` must name an export before anything heavy starts."""
    from vlp.config.loader import ConfigError
    from vlp.training.export import weights_file

    if cfg.train.init_from:
        try:
            weights_file(cfg.train.init_from)
        except FileNotFoundError as err:
            raise ConfigError(source, "train.init_from", str(err)) from None


def _continue_command(recipe, overrides, run_dir: Path, resume: str) -> str:
    """The ``vlp pretrain`` command that continues ``resume`` on this job's world size
    (a recipe passed as an object is named by the run directory's ``config.yaml``)."""
    import shlex

    source = run_dir / "config.yaml" if isinstance(recipe, RecipeConfig) else recipe
    parts = ["vlp", "pretrain", str(source), "--run-dir", str(run_dir), "--resume", resume]
    for item in overrides or []:
        parts += ["--set", item]
    return shlex.join([*parts, "--reshard"])


def _convert_to_universal(folder: Path, rank: int) -> None:
    """Collective: rank 0 converts ``folder`` to DeepSpeed's universal checkpoint while
    the others wait; a failed conversion stops every rank (none waits forever)."""
    from vlp.training import checkpoint

    error = None
    if rank == 0:
        LOG.info("--reshard: converting %s to DeepSpeed's universal checkpoint", folder)
        try:
            checkpoint.to_universal(folder)
        except Exception as err:  # re-raised below on rank 0, with its traceback
            error = err
    if checkpoint.any_rank(error is not None):
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 could not convert {folder} to a universal checkpoint")


class NonFiniteLoss(RuntimeError):
    """The loss stayed non-finite for ``train.max_nonfinite_steps`` steps in a row."""


class CollectiveFailed(RuntimeError):
    """A collective failed during training: another rank died or stopped answering."""


#: what gloo and NCCL say when a peer is gone or silent (closed or reset connections,
#: timeouts, an aborted communicator), and nothing a misuse of the API says.
_PEER_LOST = re.compile(
    r"connection (reset|closed|refused)|closed by peer|broken pipe|timed out|timeout"
    r"|communicator was aborted|remote (worker|process)",
    re.IGNORECASE,
)


def _raised_in_torch_distributed(err: BaseException) -> bool:
    """Whether the innermost Python frame of ``err``'s traceback is in ``torch.distributed``
    (a collective, or its backward inside autograd)."""
    import torch.distributed as dist

    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    package = os.path.dirname(os.path.abspath(dist.__file__)) + os.sep
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(package)


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank died or hangs.

    Two conditions, both needed, so that a genuine bug is never reported as a lost peer:
    the error comes from ``torch.distributed`` (its class is ``torch.distributed.DistError``
    — ``DistBackendError``, ``DistNetworkError``, ... — or it is a ``RuntimeError`` raised
    in a ``torch.distributed`` frame: gloo raises a plain ``RuntimeError``), and its
    message says the connection closed or the wait timed out (:data:`_PEER_LOST`). A wrong
    shape passed to a collective, or any error of our own code, fails the first or the
    second test and keeps its traceback.
    """
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    from_dist = (dist_error is not None and isinstance(err, dist_error)) or (
        isinstance(err, RuntimeError) and _raised_in_torch_distributed(err)
    )
    return from_dist and bool(_PEER_LOST.search(str(err)))


def _collective_failed(err: BaseException, rank: int, step: int, run_dir: Path):
    """The one-line :class:`CollectiveFailed` for ``err``, naming the checkpoint intact."""
    from vlp.training import checkpoint

    lines = str(err).strip().splitlines() or [type(err).__name__]
    # gloo prefixes its messages with the C++ source location: not the reader's concern.
    first = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0].rstrip(".")
    first = first if len(first) <= 200 else first[:197] + "..."
    last = checkpoint.latest_checkpoint(run_dir)
    kept = (
        f"the last completed checkpoint {last.name} is intact and --resume auto continues from it"
        if last is not None
        else "no checkpoint was completed yet, so --resume auto starts afresh"
    )
    return CollectiveFailed(
        f"rank {rank}: a collective failed at step {step} ({first}): another rank died or "
        f"stopped answering; {kept}"
    )


def _finite_everywhere(loss) -> bool:
    """Collective: True when the loss is finite on every rank."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0])
    dist.all_reduce(flag)
    return float(flag) == 0.0


def _data_counts(loader) -> list[float]:
    """This rank's loader counters, summed over ranks each step: samples seen, skipped,
    skipped per reason, damaged shards (zeros for a ``batch_source``)."""
    from vlp.data.decode import SKIP_REASONS

    if loader is None:
        return [0.0] * (3 + len(SKIP_REASONS))
    stats = loader.stats
    by_reason = [float(stats.skipped_by_reason.get(r, 0)) for r in SKIP_REASONS]
    return [
        float(stats.samples_seen),
        float(stats.samples_skipped),
        *by_reason,
        float(len(stats.damaged_shards)),
    ]


def _data_scalars(totals: list[float]) -> dict[str, float]:
    """TensorBoard scalars of the summed loader counters (``_data_counts``)."""
    from vlp.data.decode import SKIP_REASONS

    seen, skipped, *by_reason, damaged = totals
    scalars = {
        "data/samples_skipped": skipped,
        "data/skipped_fraction": skipped / seen if seen else 0.0,
        "data/damaged_shards": damaged,
    }
    scalars.update({f"data/skipped_{r}": v for r, v in zip(SKIP_REASONS, by_reason)})
    scalars["data/samples_seen"] = seen
    return scalars


def _check_skipped(data_cfg, scalars: dict, loader, step: int) -> None:
    """Stop every rank together (the counts are already summed over ranks) when more of
    the data was skipped than ``data.max_skipped_fraction`` allows; the last checkpoint
    is kept, and the message lists this rank's worst shards."""
    from vlp.data.loader import TooManySkipped

    seen, fraction = scalars["data/samples_seen"], scalars["data/skipped_fraction"]
    if seen < data_cfg.skip_check_after or fraction <= data_cfg.max_skipped_fraction:
        return
    worst = loader.stats.worst_shards(10) if loader is not None else []
    damaged = [s for s, _, _ in loader.stats.damaged_shards] if loader is not None else []
    raise TooManySkipped(
        f"data.max_skipped_fraction: {scalars['data/samples_skipped']:.0f} of {seen:.0f} samples "
        f"({fraction:.1%}) were skipped by step {step}, more than "
        f"{data_cfg.max_skipped_fraction:.1%}; this rank's worst shards (skipped samples): "
        f"{worst}; damaged shards: {damaged}. The last checkpoint is kept: repair or remove "
        "those shards (or raise data.max_skipped_fraction), then --resume auto continues"
    )


def pretrain(
    recipe: str | Path | RecipeConfig,
    *,
    overrides: list[str] | None = None,
    run_dir: str | Path | None = None,
    resume: str | None = None,
    reshard: bool = False,
    batch_source: Callable[[int, int, object], Iterator[dict]] | None = None,
) -> dict:
    """Train; returns ``{"steps": [...], "losses": [...], "run_dir": ...}`` (rank-local view).

    ``reshard`` lets ``resume`` continue a checkpoint written by another number of ranks
    (:func:`vlp.training.checkpoint.check_world_size` refuses it otherwise).
    ``batch_source(rank, world_size, tokenizer)``, when given, replaces the shard loader
    with an iterator of batch dicts (tests use it to feed identical global batches).
    """
    cfg = recipe if isinstance(recipe, RecipeConfig) else load_recipe(recipe, overrides or [])
    if batch_source is None:
        check_shards_exist(cfg, None if isinstance(recipe, RecipeConfig) else str(recipe))
        check_init_from(cfg, None if isinstance(recipe, RecipeConfig) else str(recipe))
    # Loader workers tokenise after fork; HF's Rust tokenizer threads must not be live then.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import deepspeed
    import torch
    import torch.distributed as dist

    from vlp import distributed
    from vlp.data.batch import batch_to
    from vlp.training import checkpoint, optim
    from vlp.training.module import build_pretraining_module, param_groups_of

    env = distributed.detect_env()
    rank, world = env.rank, env.world_size
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    # The checkpoint to resume and its world size are checked from files alone, so a
    # resume on another number of ranks is refused before any process group starts.
    resume_from, resharding = None, False
    if resume:
        resume_from = checkpoint.resume_folder(run_dir, resume)
        if resume_from is not None:
            command = _continue_command(recipe, overrides, run_dir, resume)
            resharding = checkpoint.check_world_size(resume_from, world, reshard, command)
    # DeepSpeed reads the torchrun variables; export them for Slurm and single runs too.
    os.environ.update(
        {
            "RANK": str(env.rank),
            "WORLD_SIZE": str(env.world_size),
            "LOCAL_RANK": str(env.local_rank),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
        }
    )
    # Bounds every collective's wait: a rank that hangs fails the others instead of
    # blocking them for ever (a rank that dies fails them at once).
    timeout = datetime.timedelta(minutes=cfg.train.collective_timeout_minutes)
    if env.is_distributed:
        distributed.init_distributed(env=env, timeout=timeout)
    elif not dist.is_initialized():
        # DeepSpeed always needs a process group: a single process gets a group of one.
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
            timeout=timeout,
        )
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    if batch_source is None:
        check_same_shards(cfg, None if isinstance(recipe, RecipeConfig) else str(recipe))

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run_dir / "config.yaml")
    dist.barrier()
    setup_logging(run_dir, rank)
    LOG.info(
        "run %s: %d rank(s), backend %s, run dir %s", cfg.name, world, dist.get_backend(), run_dir
    )
    universal = resharding and checkpoint.has_zero_partitions(resume_from)
    if universal:
        _convert_to_universal(resume_from, rank)

    # Denormal floats appear in small weights and activations after a few steps and make
    # CPU kernels up to 40x slower (measured: a debug step 3.0 s -> 0.08 s); flush them.
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.train.seed)
    module = build_pretraining_module(cfg.model, cfg.objectives, cfg.data.image_size)
    if cfg.train.init_from:
        from vlp.training.export import warm_start

        loaded = warm_start(module, cfg.train.init_from, cfg.train.init_include)
        LOG.info("initialised %d tensors from %s", loaded, cfg.train.init_from)
    if cfg.deepspeed.activation_checkpointing:
        module.model.set_grad_checkpointing(True)
    groups = optim.param_groups(param_groups_of(module), cfg.optim)
    optimizer = optim.build_optimizer(groups, cfg.optim)
    scheduler = optim.build_scheduler(optimizer, cfg.train.steps, cfg.optim)
    ds_config = deepspeed_config(cfg, world)
    if universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    distributed.bound_every_group(timeout)  # DeepSpeed's own groups wait no longer
    device = engine.device

    start_step, loader_state, resharded_loaders = 0, None, None
    if resume:
        folder = resume_from
        if folder is None:
            LOG.info("--resume auto: no completed checkpoint in %s, starting fresh", run_dir)
        elif resharding:
            state = checkpoint.load_resharded(engine, folder)
            start_step = state["step"]
            saved_ranks = len(state["loaders"])
            if all(s is not None for s in state["loaders"]):
                resharded_loaders = state["loaders"]
            checkpoint.reseed(cfg.train.seed, start_step, rank)
            LOG.warning(
                "--reshard: %s was written by %d rank(s), this job has %d: weights, "
                "optimizer and schedule restored%s; RNGs reseeded from (train.seed, step, "
                "rank); the loader restarts the saved epoch from its beginning, counters "
                "carried over (the sample order of another world size cannot be continued "
                "exactly)",
                folder,
                saved_ranks,
                world,
                " through DeepSpeed's universal checkpoint" if universal else "",
            )
        else:
            state = checkpoint.load(engine, folder)
            start_step, loader_state = int(state["step"]), state.get("loader")
        if folder is not None:
            # The recipe's schedule is the truth: a run resumed with a different train.steps
            # (or after a preemption) continues on the schedule of *this* recipe, not with
            # the learning rate the saved optimizer last used.
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * optim.lr_multiplier(start_step, cfg.train.steps, cfg.optim)
            LOG.info("resumed from %s at step %d", folder, start_step)

    tokenizer = engine.module.model.tokenizer  # None for an image-only model
    if batch_source is not None:
        loader = None
        batches = batch_source(rank, world, tokenizer)
        for _ in range(start_step * cfg.deepspeed.gradient_accumulation_steps):
            next(batches)
    else:
        from vlp.config.components import requirements_of
        from vlp.data.loader import build_loader
        from vlp.data.phantom_cache import resolve_train_shards
        from vlp.data.requirements import narrowed

        # Decode only what the encoders and objectives read (views, priors, text kinds).
        loader_cfg = narrowed(resolve_train_shards(cfg, rank=rank), requirements_of(cfg))
        LOG.info(
            "loader decodes views %s, %d prior(s), reports %s, sentences %s",
            loader_cfg.views,
            loader_cfg.priors,
            loader_cfg.reports,
            loader_cfg.sentences,
        )
        loader = build_loader(
            loader_cfg, tokenizer, rank=rank, world_size=world, split="train", state=loader_state
        )
        if resharded_loaders is not None:
            loader.restart_resharded(resharded_loaders)
            LOG.info(
                "--reshard: the loader restarts epoch %d; %d sample(s) seen before carried over",
                loader.epoch,
                loader.stats.samples_seen,
            )
        batches = iter(loader)

    flag = PreemptionFlag()
    flag.install()
    monitor = Monitor(run_dir, rank, cfg.train.steps, start_step, cfg.train.log_every)
    history = {
        "steps": [],
        "losses": [],
        "run_dir": str(run_dir),
        "preempted": False,
        "time_limited": False,
    }
    accum = cfg.deepspeed.gradient_accumulation_steps
    global_batch = cfg.data.batch_size * accum * world

    def trainer_state() -> dict:
        return {"loader": loader.state_dict() if loader is not None else None}

    # DeepSpeed reports the global grad norm for ZeRO ≥ 1 and bf16; without ZeRO in fp32 it
    # clips but discards the norm, so the trainer measures it (pre-clipping, as DeepSpeed does).
    own_grad_norm = cfg.deepspeed.zero_stage == 0 and not cfg.deepspeed.bf16
    grad_norm = None
    step = start_step
    nonfinite_total = nonfinite_run = 0
    limit_s = 60.0 * cfg.train.time_limit_minutes
    t_train = time.perf_counter()
    at = step
    try:
        while step < cfg.train.steps:
            at = step + 1  # the step being computed, as the log and the checkpoints count
            t_step = time.perf_counter()
            data_wait = 0.0
            logs_sum: dict[str, float] = {}
            engine.train()
            due = checkpoint_due(at, cfg)
            engine.module.record_figures = due  # the checkpoint's figures draw this step
            skipped = None  # "loss" or "gradients": the step changed no weight
            for _ in range(accum):
                t_data = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    if loader is None:
                        raise
                    batches = iter(loader)  # the loader has moved on to the next epoch
                    batch = next(batches)
                batch = batch_to(batch, device, non_blocking=True)
                data_wait += time.perf_counter() - t_data
                engine.module.step = step  # objectives' start_step (ObjectiveSpec)
                loss, logs = engine(batch)
                if not _finite_everywhere(loss):
                    # Skipped on every rank (the check is all-reduced): no backward, no
                    # update. With accumulation the micro-batches already reduced cannot be
                    # taken back, so the run stops below.
                    skipped = "loss"
                    break
                engine.backward(loss)
                for name, value in logs.items():
                    logs_sum[name] = logs_sum.get(name, 0.0) + float(value)
                at_boundary = engine.is_gradient_accumulation_boundary()
                if own_grad_norm and at_boundary:
                    grad_norm = _grad_norm(engine.module)
                    if not math.isfinite(grad_norm):
                        # ZeRO-0 in fp32 is the one configuration in which DeepSpeed applies
                        # a non-finite gradient (it clips by a NaN norm); every other one
                        # skips the step itself (below). The gradients are already averaged
                        # over ranks, so every rank takes this branch together.
                        optimizer.zero_grad(set_to_none=True)
                        skipped = "gradients"
                        break
                engine.step()
                if at_boundary and not engine.was_step_applied():
                    skipped = "gradients"  # DeepSpeed found a non-finite gradient norm
            if skipped:
                nonfinite_total += 1
                nonfinite_run += 1
                LOG.warning(
                    "step %d: the %s not finite on some rank; step skipped "
                    "(%d in a row, %d in all)",
                    step + 1,
                    "loss is" if skipped == "loss" else "gradients are",
                    nonfinite_run,
                    nonfinite_total,
                )
                cannot_skip = skipped == "loss" and accum > 1
                if cannot_skip or nonfinite_run >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLoss(
                        f"train.max_nonfinite_steps: the loss or its gradients were not finite "
                        f"in {nonfinite_run} step(s) in a row up to step {step + 1}"
                        + (
                            " (with gradient accumulation a step cannot be skipped)"
                            if cannot_skip
                            else ""
                        )
                        + "; the weights were not updated by them and the last checkpoint "
                        "is kept: lower optim.lr or check the data, then --resume auto"
                    )
                # The schedule advances over a skipped step (DeepSpeed's own skip does not
                # step it), so that it stays a function of the step, as resume re-derives it.
                if scheduler is not None:
                    scheduler.step()
            else:
                nonfinite_run = 0
            step += 1
            # Mean over micro-batches and ranks: what a single process would have logged.
            names = sorted(logs_sum)
            out_of_time = limit_s > 0 and time.perf_counter() - t_train > limit_s
            data_counts = _data_counts(loader)
            packed = torch.tensor(
                [logs_sum[n] / accum for n in names]
                + data_counts
                + [float(flag.raised), float(out_of_time)],
                dtype=torch.float64,
            )
            dist.all_reduce(packed)  # every rank stops at the same step
            values = (packed[: len(names)] / world).tolist()
            data_totals = packed[len(names) : len(names) + len(data_counts)].tolist()
            preempted, out_of_time = bool(packed[-2] > 0), bool(packed[-1] > 0)
            stop = preempted or out_of_time
            scalars = dict(zip(names, values))
            scalars.update(_data_scalars(data_totals))
            scalars["train/nonfinite_skipped"] = float(nonfinite_total)
            elapsed = time.perf_counter() - t_step
            for group in optimizer.param_groups:
                scalars[f"lr/{group.get('name', 'group')}"] = group["lr"]
            if not own_grad_norm:
                grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                scalars["optim/grad_norm"] = float(grad_norm)
            scalars.update(
                {
                    "perf/step_time_s": elapsed,
                    "perf/samples_per_s": global_batch / elapsed,
                    "perf/data_wait_fraction": data_wait / elapsed,
                    "perf/memory_mb": _memory_mb(device),
                }
            )
            history["steps"].append(step)
            history["losses"].append(scalars.get("loss/total", float("nan")))
            monitor.step(step, scalars)
            _check_skipped(cfg.data, scalars, loader, step)

            if due or stop:
                checkpoint.save(engine, run_dir, step, trainer_state(), cfg.checkpoint.keep)
                LOG.info("checkpoint step-%d saved", step)
                if rank == 0 and due:  # a stop between checkpoints kept no figure to draw
                    _write_objective_figures(engine.module, run_dir / "figures", step)
            if out_of_time and not preempted:
                LOG.warning(
                    "train.time_limit_minutes (%g) reached at step %d of %d: checkpoint saved; "
                    "--resume auto continues",
                    cfg.train.time_limit_minutes,
                    step,
                    cfg.train.steps,
                )
                history["time_limited"] = True
                break
            if stop:
                LOG.warning(
                    "preemption signal received: checkpoint at step %d saved, exiting", step
                )
                history["preempted"] = True
                if rank == 0:
                    _requeue_if_slurm()
                break
    except RuntimeError as err:
        if not is_peer_failure(err):
            raise
        failure = _collective_failed(err, rank, at, run_dir)
        LOG.error("%s", failure)
        raise failure from err
    finally:
        monitor.close()
    if loader is not None and loader.stats.samples_skipped:
        # Corrupt samples are skipped and counted, never silently dropped (each rank
        # reports its own shards).
        stats = loader.stats
        LOG.warning(
            "rank %d skipped %d of %d sample(s) (%s); most per shard: %s; damaged shards: %s",
            rank,
            stats.samples_skipped,
            stats.samples_seen,
            ", ".join(f"{k} {v}" for k, v in sorted(stats.skipped_by_reason.items())),
            stats.worst_shards(5),
            [shard for shard, _, _ in stats.damaged_shards][:5],
        )
    LOG.info("done at step %d", step)
    return history
