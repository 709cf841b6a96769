"""Learning efficiency: training wall time of ``vlp pretrain`` and open_clip_train to a zero-shot AUROC.

Both trainers train on the same phantom shards (``--patients`` patients, converted once at
256 px and cached in ``--work``), with the same small model, batch, cores and optimisation
as ``openclip_compare.py`` pairs them (its table: resnet18 + MLP head, batch 16, one
DataLoader worker each, AdamW with cosine decay, grad clip 1.0, fp32), and in lockstep
through its baton, so the load of other jobs on the shared cores hits both alike. What
this script changes in that pairing, the same on both sides, so that learning shows within
a 10-minute run on two shared cores: images at ``--image-size`` 64 px (not 128); every
tower at ``--lr`` 1e-3 (``recipes/demo.yaml``'s rate; the clip recipe's text rate of 1e-5
is meant for a pretrained BERT, and open_clip has one rate); ``--warmup`` 10 steps (the
recipe's 500 would not end within the budget); one torch thread per process
(``--threads``: two OpenMP threads on oversubscribed cores made a step 5-10× slower); a
checkpoint at every open_clip epoch (vlp: ``checkpoint.every`` = the steps of one epoch).

Arms (each a lockstep run of both trainers; ``--arms`` picks them, ``minilm`` alone by
default: at a 10-minute budget the ``clip`` arm never left chance on the open_clip side
(README), so it gives no ratio and would halve the other arm's epochs):

``clip``
    ``recipes/clip.yaml`` with the pairing above: both text towers are the random ``tiny``
    BERT (2 layers, width 64) through the MiniLM tokenizer, trained.
``minilm``
    What vlp does better: ``recipes/demo.yaml``'s text tower, the offline MiniLM (mean
    pooling), frozen (``group_lr.text=0``) and cached (``frozen_cache_size``: a frozen
    tower's embedding of a report it has seen is looked up, not recomputed). open_clip gets
    the same pretrained MiniLM through ``hf_model_name`` (``mean_pooler``) locked with
    ``--lock-text --lock-text-freeze-layer-norm``; both train only the projection heads on
    top of it. open_clip recomputes the frozen tower on every batch, padded to 77 tokens.

Timing: a side's training time to step k is the sum of its lockstep step times (from
receiving the baton to the end of the step, data wait and the saving of earlier
checkpoints included) over steps 2..k plus its median step for step 1; start-up (process
start, DeepSpeed or open_clip initialisation, to the end of step 1) is not counted and is
printed apart. Evaluation runs after training and is not training time.

Evaluation, one protocol for both: the zero-shot mean AUROC over the shipped CheXpert
prompts on the test split of an independent evaluation phantom (``--eval-seed`` 1,
``--eval-patients`` 1000; the training phantom is seed 0), larger than the training
phantom's own test split so that a checkpoint's AUROC is less noisy. vlp checkpoints: ``vlp export`` +
``vlp.evaluation.run_evaluator("zero-shot", ...)``. open_clip checkpoints: the test
studies' frontal JPEGs through open_clip's own validation preprocessing and
``encode_image``, the same prompts through its tokenizer and ``encode_text``, scored by
``vlp.evaluation.zero_shot.aurocs_from_embeddings`` (the evaluator's cosine, BioViL prompt
ensemble, positive − negative and AUROC code). The threshold is the highest mean AUROC both
sides of an arm reach, rounded down to 0.05 (``--threshold`` sets it); the time to it is
interpolated linearly between the last checkpoint below it and the first at or above it
(from time 0 at AUROC 0.5 when the first checkpoint is already above). When the highest
value both reach rounds down to chance (0.5), the threshold is rounded to 0.01 instead. The
ratio is vlp / open_clip; target ≤ 0.5. Writes ``WORK/patients-N/learning_efficiency.json``
and the figure ``WORK/patients-N/learning_efficiency.png``. Run::

    python benchmarks/learning_efficiency.py            # ~10 minutes on two shared cores
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from launch import DEMO_TEXT_TOWER, export  # noqa: E402
from openclip_compare import (  # noqa: E402
    MATCH_OPEN_CLIP,
    ensure_old_webdataset,
    epoch_steps,
    open_clip_argv,
    run_lockstep,
    write_model_config,
    write_open_clip_shards,
)
from trainer_speed import SMALL_CLIP, ensure_phantom_shards  # noqa: E402

DEFAULT_WORK = Path(tempfile.gettempdir()) / "vlp_learning_eff"
TARGET = 0.5
#: per arm: the open_clip text tower, vlp overrides and open_clip flags (module docstring).
ARMS = {
    "clip": {"text": "tiny", "vlp": [], "open_clip": []},
    "minilm": {
        "text": "minilm",
        "vlp": [DEMO_TEXT_TOWER, "optim.group_lr={text: 0.0}"],
        "open_clip": ["--lock-text", "--lock-text-freeze-layer-norm"],
    },
}


# ----------------------------------------------------------------------------- timing


def checkpoint_times(stamps: dict, every: int) -> tuple[list[float], float, float]:
    """Training time at the end of steps every, 2·every, … (module docstring: step 1 counts
    as the median step), the median step and the start-up time."""
    starts, ends = stamps["starts"], stamps["ends"]
    steps = [ends[k][0] - starts[k - 1][0] for k in range(1, len(ends))]
    median = statistics.median(steps)
    cumulative = [median]
    for step in steps:
        cumulative.append(cumulative[-1] + step)
    times = [cumulative[k - 1] for k in range(every, len(ends) + 1, every)]
    return times, median, ends[0][0] - stamps["started"]


def threshold_of(curves: list[list[float]]) -> float:
    """The highest multiple of 0.05 that every curve reaches; of 0.01 when that would be
    chance (0.5) or below, so that a short run still has a threshold above chance; NaN
    when some curve never gets above chance (no threshold to time)."""
    best = min(max(c) for c in curves)
    for step in (0.05, 0.01):
        value = math.floor(best / step + 1e-9) * step
        if value > 0.5:
            return round(value, 2)
    return math.nan


def time_to(threshold: float, times: list[float], aurocs: list[float]) -> float:
    """Training time at which the curve first reaches ``threshold`` (linear between the
    checkpoints around it, from (0, 0.5) before the first); NaN if it never does."""
    before_t, before_a = 0.0, 0.5
    for t, a in zip(times, aurocs):
        if a >= threshold:
            if before_a >= threshold:
                return before_t
            return before_t + (t - before_t) * (threshold - before_a) / (a - before_a)
        before_t, before_a = t, a
    return math.nan


# ----------------------------------------------------------------------------- evaluation


def test_studies(test: Path) -> tuple[list[bytes], np.ndarray]:
    """Frontal JPEG bytes and CheXpert labels (N×14) of the test studies, in the order and
    with the labels vlp's evaluation loader gives them."""
    from vlp.data.loader import LoaderConfig, build_loader
    from vlp.models.text import load_tokenizer, minilm_path

    cfg = LoaderConfig(
        shards=str(test), batch_size=32, workers=0, image_size=128, views=["frontal"],
        priors=0, prior_text=False, sentences=False, shuffle_buffer=0, shard_shuffle=False,
    )  # fmt: skip
    keys, labels = [], []
    for batch in build_loader(cfg, load_tokenizer(str(minilm_path())), split="test"):
        keys += batch["keys"]
        labels.append(batch["labels"][:, 0].numpy())
    frontal = {}
    for shard in sorted(test.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, part = member.name.partition(".")
                if part == "frontal.jpg":
                    frontal[key] = tar.extractfile(member).read()
    return [frontal[k] for k in keys], np.concatenate(labels)


def open_clip_aurocs(model_config: Path, model_name: str, checkpoints: list[Path], test: Path):
    """Zero-shot mean AUROC of each open_clip checkpoint (module docstring)."""
    import open_clip
    import torch
    from PIL import Image

    from vlp.evaluation import zero_shot

    open_clip.add_model_config(model_config)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    images, labels = test_studies(test)
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images])
    spec = zero_shot.load_prompts()
    tokens = tokenizer([c[2] for c in zero_shot.prompt_columns(spec)])
    values = []
    for path in checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        model.eval()
        with torch.no_grad():
            image = torch.cat([model.encode_image(x) for x in pixels.split(32)])
            text = model.encode_text(tokens)
        result = zero_shot.aurocs_from_embeddings(image, text, labels, spec, bootstrap=100)
        values.append(result["mean_auroc"])
    return values


def vlp_aurocs(run_dir: Path, steps: list[int], test: Path, out: Path) -> list[float]:
    """Zero-shot mean AUROC of vlp's checkpoint at each step: export, then the evaluator."""
    from vlp.evaluation import run_evaluator

    values = []
    for step in steps:
        folder = export(run_dir, step, out / f"export-{step}")
        result = run_evaluator("zero-shot", folder, test, out / f"eval-{step}", bootstrap=100)
        values.append(result["mean_auroc"])
        shutil.rmtree(folder)
    return values


# ----------------------------------------------------------------------------- report


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results["arms"])
    fig, axes = plt.subplots(1, len(arms), figsize=(5.2 * len(arms), 3.8), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        entry = results["arms"][arm]
        for side, colour in (("vlp", "C0"), ("open_clip", "C1")):
            curve = entry[side]
            reached = f"{curve['time_to']:.0f} s" if math.isfinite(curve["time_to"]) else "n/a"
            ax.plot([0] + curve["times"], [0.5] + curve["aurocs"], "o-", color=colour, ms=4,
                    label=f"{side}: {reached} to the threshold")  # fmt: skip
            if math.isfinite(curve["time_to"]):
                ax.axvline(curve["time_to"], color=colour, ls=":", lw=1)
        ax.axhline(entry["threshold"], color="grey", ls="--", lw=1)
        ax.set_title(f"{arm}: vlp / open_clip = {entry['ratio']:.2f}")
        ax.set_xlabel("training wall time (s, lockstep)")
        ax.set_ylabel("zero-shot mean AUROC (test)")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="whole-run budget")
    parser.add_argument("--epochs", type=int, help="epochs per arm (default: from --minutes)")
    parser.add_argument("--arms", nargs="*", default=["minilm"], choices=list(ARMS))
    parser.add_argument("--threshold", type=float, help="AUROC to reach (default: see above)")
    parser.add_argument("--lr", type=float, default=1e-3, help="every tower, both sides")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps, both sides")
    parser.add_argument("--image-size", type=int, default=64, help="model input, both sides")
    parser.add_argument("--patients", type=int, default=250, help="phantom patients")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--eval-patients", type=int, default=1000, help="patients of the evaluation phantom"
    )
    parser.add_argument(
        "--eval-seed", type=int, default=1, help="seed of the evaluation phantom (not 0)"
    )
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="shards, runs and results")
    parser.add_argument("--wds-target", default="/tmp/wds0286", help="webdataset 0.2.86 folder")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # One thread per trainer: on two cores shared with other jobs, two OpenMP threads that
    # spin-wait for each other made a resnet18 step 5-10x slower than one thread (measured
    # 3.5 s vs 0.3 s at 64 px), which would drown both trainers' learning in noise alike.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    began = time.perf_counter()
    work = Path(args.work) / f"patients-{args.patients}"
    train = ensure_phantom_shards(work, args.patients)
    # Evaluated on the test split of an independent phantom (another seed, more patients):
    # with the training phantom's 103 test studies a checkpoint's mean AUROC moved by about
    # ±0.08, which made the threshold crossings, and so the ratio, jump between runs.
    evaluation = Path(args.work) / f"eval-seed-{args.eval_seed}-patients-{args.eval_patients}"
    test = (
        ensure_phantom_shards(evaluation, args.eval_patients, seed=args.eval_seed).parent / "test"
    )
    pattern, samples = write_open_clip_shards(train, work / "openclip-shards")
    ensure_old_webdataset(Path(args.wds_target))
    shards = len(json.loads((train / "manifest.json").read_text())["shards"])
    every = epoch_steps(samples, shards, workers=1)
    # Measured on the 2 shared cores (README: 4 epochs per arm took 11.6 minutes): about
    # 1.25 minutes of the budget per epoch of one arm (both trainers' steps and the
    # evaluation of their checkpoints) and 0.8 minute per arm of start-up.
    epochs = args.epochs or max(2, int((args.minutes / len(args.arms) - 0.8) / 1.25))
    steps = every * epochs
    print(
        f"{samples} phantom training studies in {shards} shards, {every} steps per epoch "
        f"(batch 16), {epochs} epochs per arm, lr {args.lr:g}, warm-up {args.warmup}, "
        f"{os.cpu_count()} cores",
        flush=True,
    )

    results = {"epochs": epochs, "steps_per_epoch": every, "arms": {}}
    for arm in args.arms:
        spec = ARMS[arm]
        model_config, model_name = write_model_config(
            work / f"openclip-model-{arm}", spec["text"], args.image_size
        )
        vlp_overrides = [
            *SMALL_CLIP, *MATCH_OPEN_CLIP,
            f"data.shards={train / 'manifest.json'}", "data.workers=1",
            f"data.image_size={args.image_size}",
            f"optim.lr={args.lr}", f"optim.group_lr={{text: {args.lr}}}",
            f"optim.warmup_steps={args.warmup}",
            f"train.steps={steps}", f"train.log_every={every}",
            f"checkpoint.every={every}", f"checkpoint.keep={epochs + 1}",
            *spec["vlp"],
        ]  # fmt: skip
        oc_argv = (
            open_clip_argv(
                pattern, samples, model_name, 1, epochs, every, lr=args.lr, warmup=args.warmup
            )
            + spec["open_clip"]
        )
        print(f"\n== arm {arm}: lockstep training, {steps} steps per side ==", flush=True)
        data = run_lockstep(
            work, f"eff-{arm}", str(REPO / "recipes" / "clip.yaml"), vlp_overrides, oc_argv,
            model_config, args.wds_target, steps, keep_runs=True,
        )  # fmt: skip
        print(f"== arm {arm}: evaluating {epochs} checkpoints per side ==", flush=True)
        entry = {}
        for side in ("vlp", "open_clip"):
            times, median, startup = checkpoint_times(data[side], every)
            run_dir = data["run_dirs"][side]
            if side == "vlp":
                steps_at = [every * (k + 1) for k in range(epochs)]
                aurocs = vlp_aurocs(run_dir, steps_at, test, work / f"eval-{arm}")
            else:
                found = [run_dir / "checkpoints" / f"epoch_{k + 1}.pt" for k in range(epochs)]
                aurocs = open_clip_aurocs(model_config, model_name, found, test)
            shutil.rmtree(run_dir, ignore_errors=True)  # hundreds of MB of checkpoints
            entry[side] = {"times": times, "aurocs": aurocs, "median_step_s": median,
                           "startup_s": startup}  # fmt: skip
        entry["threshold"] = args.threshold or threshold_of(
            [entry["vlp"]["aurocs"], entry["open_clip"]["aurocs"]]
        )
        for side in ("vlp", "open_clip"):
            curve = entry[side]
            curve["time_to"] = time_to(entry["threshold"], curve["times"], curve["aurocs"])
        reached = entry["vlp"]["time_to"], entry["open_clip"]["time_to"]
        entry["ratio"] = reached[0] / reached[1] if reached[1] > 0 else math.nan
        results["arms"][arm] = entry
        (work / "learning_efficiency.json").write_text(json.dumps(results, indent=1))

    figure = plot(results, work / "learning_efficiency.png")
    print(f"\nload average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for arm, entry in results["arms"].items():
        print(f"arm {arm}: threshold zero-shot mean AUROC {entry['threshold']:.2f} (nan: a side "
              "never got above chance, nothing to time)")  # fmt: skip
        for side in ("vlp", "open_clip"):
            curve = entry[side]
            points = ", ".join(
                f"{t:.0f} s {a:.3f}" for t, a in zip(curve["times"], curve["aurocs"])
            )
            print(
                f"  {side:9s} {curve['time_to']:6.1f} s to the threshold | checkpoints: {points} "
                f"| median step {curve['median_step_s']:.3f} s, start-up {curve['startup_s']:.0f} s"
            )
        print(f"  ratio vlp / open_clip: {entry['ratio']:.2f} (target <= {TARGET})")
    print(f"figure: {figure}\nwhole run: {(time.perf_counter() - began) / 60:.1f} min")


if __name__ == "__main__":
    main()
