"""`vlp demo --tiny` end to end: every artefact exists and every metric is a finite number."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, VLP_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vlp.cli", "demo", "--tiny", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for stage in ("1-2/5 phantom", "3/5 pretrain", "4/5 evaluate", "5/5 report"):
        assert stage in proc.stdout
    summary = json.loads((out / "demo_results.json").read_text())
    metrics = summary["metrics"]
    expected = {
        "zero-shot mean AUROC",
        "linear probe 10% labels, mean AUROC (pretrained)",
        "linear probe 10% labels, mean AUROC (random init)",
        "grounding mean CNR",
        "edema ordinal AUC 0v123",
    }
    assert expected <= set(metrics), sorted(metrics)
    assert any(name.startswith("retrieval") and name.endswith("R@5") for name in metrics)
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"
    report = (out / "report.md").read_text()
    assert (
        "| zero-shot mean AUROC |" in report
        and "## Does pretraining learn?" in report
        and "tensorboard --logdir" in report
    )
    images = [
        line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")
    ]
    assert len(images) >= 3
    for image in images:
        assert (out / image).is_file(), image
    assert (out / "run" / "export" / "model.safetensors").is_file()

    # A second run reuses the phantom, the shards and the finished training run.
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing" in again.stdout
