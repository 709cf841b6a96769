"""Does MAE learn on the phantom? Reconstruction loss over training, and a linear probe.

Trains ``recipes/mae.yaml`` shrunk to CPU size (a 6-block ViT-Tiny with 32-px patches at
256 px, an 8×8 grid, 75 % hidden; decoder 128 wide, 2 blocks) on the learning benchmark's
phantom shards (``benchmarks/learning.py`` builds them; seed 0, 450 patients), then:

* reads the reconstruction loss back from the run's TensorBoard events and plots it
  (``OUT/mae_loss.png``) beside the last checkpoint's reconstructions
  (``RUN/figures/mae_reconstruction_step-N.png``);
* runs the linear probe (``vlp eval linear-probe``) on the test split, pretrained against the same encoder
  randomly initialised (10 % labels, mean AUROC with 95 % bootstrap intervals).

Writes ``OUT/mae_learning.md`` and prints it.

    python benchmarks/mae_learning.py --shards runs/learning/shards --out runs/mae --steps 800
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch import export, pretrain, with_ci  # noqa: E402

OVERRIDES = [
    "data.image_size=256",
    "model.encoders.image.tower={name: vit_tiny_patch16_224, params: {kwargs: {patch_size: 32, depth: 6}}}",
    "model.encoders.image.decoder={dim: 128, depth: 2, heads: 4}",
    "data.batch_size=16",
    "data.workers=1",
    "optim.lr=1.5e-4",
    "optim.warmup_steps=50",
    "train.log_every=20",
    "deepspeed.zero_stage=2",
]


def loss_curve(run_dir: Path, out_png: Path) -> list[tuple[int, float]]:
    """``loss/total`` from the run's TensorBoard events, plotted to ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("loss/total")]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    ax.plot([s for s, _ in points], [v for _, v in points], lw=1.2)
    ax.set(xlabel="step", ylabel="MSE on hidden patches (normalised)", title="MAE on the phantom")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", default="runs/learning/shards")
    parser.add_argument("--out", default="runs/mae")
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args()
    out, shards = Path(args.out), Path(args.shards)
    run_dir = out / "run"
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*OVERRIDES, f"data.shards={shards / 'train'}", f"train.steps={args.steps}"]
    overrides.append(f"checkpoint.every={max(1, args.steps // 4)}")
    pretrain("mae.yaml", run_dir, overrides)
    points = loss_curve(run_dir, out / "mae_loss.png")
    export(run_dir, None, run_dir / "export")
    from vlp.evaluation import linear_probe
    from vlp.training.export import load_model

    model, _ = load_model(run_dir / "export")
    probe = linear_probe.evaluate(
        model, shards / "test", out / "linear-probe", random_init=True, bootstrap=200
    )

    def cell(encoder: str) -> str:
        return with_ci(
            probe[encoder]["mean_auroc"]["10%"], probe[encoder]["mean_auroc_ci"]["10%"]["ci"]
        )

    first = sum(v for _, v in points[:3]) / 3
    last = sum(v for _, v in points[-3:]) / 3
    figures = sorted((run_dir / "figures").glob("mae_reconstruction_step-*.png"))
    lines = [
        f"MAE on phantom seed 0 (train split), {args.steps} steps, batch 16, 6-block "
        "ViT-Tiny with 32-px patches at 256 px, 75 % hidden; test split.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| reconstruction loss, mean of the first 3 logged steps | {first:.3f} |",
        f"| reconstruction loss, mean of the last 3 logged steps | {last:.3f} |",
        f"| linear probe 10 % labels, mean AUROC, MAE encoder | {cell('pretrained')} |",
        f"| linear probe 10 % labels, mean AUROC, random init | {cell('random_init')} |",
        "",
        f"Loss curve: {out / 'mae_loss.png'}; reconstructions: {figures[-1] if figures else 'none'}",
    ]
    text = "\n".join(lines)
    (out / "mae_learning.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
