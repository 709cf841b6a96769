"""Trainer overhead: ``vlp pretrain`` steps/s against a bare PyTorch loop on the same work.

Both sides train the same module (``vlp.training.module.build_pretraining_module`` of the recipe), the same
objective, the same torch AdamW with the same parameter groups and schedule
(``vlp.training.optim``) and the same gradient clipping (the recipe's
``deepspeed.gradient_clipping``), on the same batches: ``--batches`` batches drawn once
from the phantom shards with the vlp loader, held in memory and cycled. The vlp side is
:func:`vlp.training.trainer.pretrain` with those batches fed through ``batch_source`` (so
it pays for DeepSpeed's engine and ZeRO stage, the per-step logging, TensorBoard and the
preemption check, but not for the loader); the bare side is::

    loss, logs = model(batch); optimizer.zero_grad(); loss.backward()
    clip_grad_norm_(params, clip); optimizer.step(); scheduler.step(); loss.item()

How it is timed, and why so: the cores are shared with other jobs that slow whole
stretches of time several-fold, so separate runs of the two sides are not comparable. The
two sides therefore run in lockstep in one process: the ``batch_source`` generator that
feeds ``pretrain`` runs one bare step (on its own model and optimizer, with the same
batch) before it hands each batch to the trainer. Step k of the trainer is the time from
handing over batch k to the request for batch k+1 (forward, backward, DeepSpeed step,
logging, TensorBoard: everything the trainer does per step); step k of the bare loop is
timed inside the generator. Adjacent steps see the same load, so the per-step ratio
``bare_k / vlp_k`` is stable; the figure is its median over steps ``--warmup`` … end
(start-up, warm-up and the final checkpoint are left out), together with the median step
times and the CPU-time ratio. ``--also-stage0`` repeats the run with
``deepspeed.zero_stage=0`` (ZeRO partitions nothing on one rank).

Default model: the clip recipe shrunk for a laptop (``model.encoders.image.tower.name=
resnet18``, ``data.image_size=128``, ``model.encoders.text.tower.name=tiny``, batch 16).
Run::

    python benchmarks/trainer_speed.py            # 1-2 minutes on two idle cores

``--help`` for options (``--set`` for any recipe override).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path(tempfile.gettempdir()) / "vlp_trainer_bench"

#: The benchmark model: the clip recipe with towers small enough for two CPU cores.
SMALL_CLIP = [
    "model.encoders.image.tower.name=resnet18",
    "data.image_size=128",
    "model.encoders.text.tower.name=tiny",
    "data.batch_size=16",
]


# ----------------------------------------------------------------------------- data


def ensure_phantom_shards(
    work: Path, patients: int, shard_size: int = 50, seed: int = 0, priors: int = 0
) -> Path:
    """Phantom studies (phantom ``seed``) converted at 256 px into ``work/shards``, with
    ``priors`` prior studies per sample, built once per phantom version and settings
    (``vlp.data.phantom_cache.build_phantom_shards``); returns train/."""
    from vlp.data.convert.api import ConvertOptions
    from vlp.data.phantom import PhantomConfig
    from vlp.data.phantom_cache import build_phantom_shards

    workers = max(1, (os.cpu_count() or 1) - 1)  # the converter CLI's default
    phantom_cfg = PhantomConfig(patients=patients, seed=seed, image_size=256, workers=workers)
    options = ConvertOptions(image_size=256, shard_size=shard_size, workers=workers, priors=priors)
    return build_phantom_shards(work, phantom_cfg, options) / "train"


def draw_batches(cfg, tokenizer, count: int) -> list[dict]:
    """``count`` batches from the recipe's loader (in this process), kept in memory."""
    from vlp.data.loader import build_loader

    loader = build_loader(cfg.data, tokenizer)
    batches = list(itertools.islice(iter(loader), count))
    if len(batches) < count:
        raise RuntimeError(f"the shards {cfg.data.shards} hold fewer than {count} batches")
    return batches


# ----------------------------------------------------------------------------- timing


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class BareLoop:
    """The same model, objective, optimizer, schedule and clipping, stepped by hand."""

    def __init__(self, cfg):
        import torch

        from vlp.training import optim
        from vlp.training.module import build_pretraining_module, param_groups_of

        torch.manual_seed(cfg.train.seed)
        self.model = build_pretraining_module(
            cfg.model, cfg.objectives, cfg.data.image_size
        ).train()
        groups = optim.param_groups(param_groups_of(self.model), cfg.optim)
        self.optimizer = optim.build_optimizer(groups, cfg.optim)
        self.scheduler = optim.build_scheduler(self.optimizer, cfg.train.steps, cfg.optim)
        self.params = [p for g in groups for p in g["params"]]
        self.clip = cfg.deepspeed.gradient_clipping

    def step(self, batch: dict) -> float:
        import torch

        loss, _logs = self.model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()


def run_lockstep(cfg, batches: list[dict], run_dir: Path) -> dict:
    """One ``pretrain`` run interleaved step by step with a bare loop; per-step durations."""
    from vlp.training.trainer import pretrain

    bare = BareLoop(cfg)
    times: dict[str, list] = {"vlp": [], "bare": []}  # (wall, cpu) per step
    marks = {"start": time.perf_counter()}

    def source(rank, world, tokenizer):
        handed = None
        for batch in itertools.cycle(batches):
            if handed is not None:  # the trainer has finished the step on the previous batch
                now = _now()
                times["vlp"].append((now[0] - handed[0], now[1] - handed[1]))
            else:
                marks["first_fetch"] = time.perf_counter()
            before = _now()
            bare.step(batch)
            after = _now()
            times["bare"].append((after[0] - before[0], after[1] - before[1]))
            handed = _now()
            yield batch

    pretrain(cfg, run_dir=run_dir, batch_source=source)
    times["startup_s"] = marks["first_fetch"] - marks["start"]
    return times


def summarise(times: dict, warmup: int) -> dict[str, float]:
    """Medians over the steady-state steps: step times, paired ratios (bare / vlp)."""
    vlp = times["vlp"][warmup:]
    bare = times["bare"][warmup : warmup + len(vlp)]
    return {
        "vlp_s": statistics.median(v[0] for v in vlp),
        "bare_s": statistics.median(b[0] for b in bare),
        "ratio": statistics.median(b[0] / v[0] for v, b in zip(vlp, bare)),
        "cpu_ratio": sum(b[1] for b in bare) / sum(v[1] for v in vlp),
        "steps": len(vlp),
        "startup_s": times["startup_s"],
    }


# ----------------------------------------------------------------------------- report


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "clip.yaml"))
    parser.add_argument(
        "--set", action="append", default=[], help="extra recipe override (after the defaults)"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed step pairs per run")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps at the start")
    parser.add_argument("--batches", type=int, default=8, help="distinct in-memory batches")
    parser.add_argument("--patients", type=int, default=150, help="phantom patients")
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="shards and run folders")
    parser.add_argument(
        "--also-stage0",
        action="store_true",
        help="also run vlp with deepspeed.zero_stage=0 (ZeRO partitions nothing on one rank)",
    )
    args = parser.parse_args()

    quiet_libraries()
    sys.path.insert(0, str(REPO))
    import torch
    from tqdm import tqdm

    from vlp.config import load_recipe
    from vlp.models.text import build_text_tower
    from vlp.registry import config_of

    work = Path(args.work)
    train = ensure_phantom_shards(work, args.patients)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    total = args.warmup + args.steps + 1  # the last step's end is not observed
    overrides = SMALL_CLIP + [
        f"data.shards={train / 'manifest.json'}",
        "data.workers=0",
        f"train.steps={total}",
        f"train.log_every={total}",
        f"checkpoint.every={total}",
        "checkpoint.keep=1",
    ]
    variants = {"vlp": load_recipe(args.recipe, overrides + args.set)}
    if args.also_stage0 and variants["vlp"].deepspeed.zero_stage != 0:
        variants["vlp ZeRO-0"] = load_recipe(
            args.recipe, overrides + args.set + ["deepspeed.zero_stage=0"]
        )
    cfg = variants["vlp"]
    text = config_of("encoder", "text", cfg.model.encoders["text"], "model.encoders.text")
    tokenizer = build_text_tower(text.tower).tokenizer
    batches = draw_batches(cfg, tokenizer, args.batches)
    tokens = statistics.mean(b["report_input_ids"].shape[1] for b in batches)
    print(
        f"model: {args.recipe} + {' '.join(SMALL_CLIP + args.set)}; zero stage "
        f"{cfg.deepspeed.zero_stage}, clipping {cfg.deepspeed.gradient_clipping}; "
        f"{args.batches} in-memory batches (report length {tokens:.0f} tokens); "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores",
        flush=True,
    )

    results = {}
    for name, variant in tqdm(variants.items(), desc="lockstep runs", unit="run"):
        gc.collect()
        with tempfile.TemporaryDirectory(dir=work / "runs", prefix="trainer-speed-") as run_dir:
            results[name] = summarise(run_lockstep(variant, batches, Path(run_dir)), args.warmup)

    print(
        f"\nsteady state: {args.steps} lockstep step pairs after {args.warmup} warm-up steps; "
        f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    for name, r in results.items():
        print(
            f"{name:10s}: {1 / r['vlp_s']:6.3f} steps/s (median step {r['vlp_s']:.3f} s) | bare "
            f"loop {1 / r['bare_s']:6.3f} steps/s (median step {r['bare_s']:.3f} s) | ratio "
            f"{r['ratio']:.3f} (median of per-step bare/vlp; CPU-time ratio {r['cpu_ratio']:.3f}) "
            f"| {r['startup_s']:.1f} s before the first step"
        )
    print("target: vlp / bare >= 0.9 (steady-state steps/s)")


if __name__ == "__main__":
    main()
