"""What the learning benchmarks share: train a recipe with ``vlp pretrain`` in a
subprocess (resumable: a rerun picks up where it stopped) and export a checkpoint."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: the demo's image tower (Liao et al.'s ResNet at half width, 8×8 grid at 256 px) and its
#: frozen MiniLM: the CPU-sized towers of ``recipes/demo.yaml``.
DEMO_IMAGE_TOWER = (
    "model.encoders.image.tower={name: liao_resnet256_5, params: {stage_channels: "
    "[16, 32, 64, 128], blocks_per_stage: [1, 1, 2, 2], local_stage: 3}}"
)
DEMO_TEXT_TOWER = (
    "model.encoders.text.tower={name: minilm, pooling: mean, sentence_pooling: mean, "
    "frozen_cache_size: 100000}"
)


def pretrain(recipe: str, run_dir: Path, overrides: list[str]) -> Path:
    """``vlp pretrain recipes/RECIPE --set ... --run-dir RUN_DIR --resume auto``."""
    command = [sys.executable, "-m", "vlp.cli", "pretrain", str(REPO / "recipes" / recipe)]
    for item in overrides:
        command += ["--set", item]
    subprocess.run([*command, "--run-dir", str(run_dir), "--resume", "auto"], check=True)
    return run_dir


def export(run_dir: Path, step: int | None, out: Path) -> Path:
    """``vlp export`` of ``step`` (None: the latest) into ``out``, once."""
    from vlp.training.export import export as export_run

    if not (out / "model.safetensors").is_file():
        export_run(run_dir, out, step=step)
    return out


def with_ci(value, ci=None) -> str:
    """A table cell: ``0.123 [0.10, 0.15]``; the value alone when the interval is missing
    or not finite; ``n/a`` without a value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if ci and all(c is not None and math.isfinite(c) for c in ci):
        return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    return f"{value:.3f}"
