"""Every benchmark script starts: its imports resolve and ``--help`` prints its usage.

The benchmarks are run by hand (they take minutes), so nothing else in the suite would
notice a script broken by a change in the library or in ``benchmarks/launch.py``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "launch.py")


def test_every_script_is_listed():
    assert {"learning.py", "edema_learning.py", "mae_llama_learning.py"} <= set(SCRIPTS)
    assert "learning_efficiency.py" in SCRIPTS


def test_table_cells_show_the_interval_only_when_it_is_finite():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from launch import with_ci
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert with_ci(0.51234, [0.4, 0.6]) == "0.512 [0.40, 0.60]"
    assert with_ci(0.5, None) == with_ci(0.5, [math.nan, 0.6]) == with_ci(0.5, [None, 1]) == "0.500"
    assert with_ci(None) == with_ci(math.nan, [0.1, 0.2]) == "n/a"


def test_learning_efficiency_threshold_and_crossing():
    """The threshold both curves reach and the interpolated time to it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import learning_efficiency as eff
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert eff.threshold_of([[0.6, 0.83], [0.7, 0.79]]) == 0.75
    assert eff.threshold_of([[0.52, 0.54], [0.53]]) == 0.53  # 0.05 steps would give chance
    assert math.isnan(eff.threshold_of([[0.6], [0.499]]))  # one side never above chance
    # linear between the checkpoints around it; from (0, 0.5) before the first
    assert math.isclose(eff.time_to(0.75, [10.0, 20.0, 30.0], [0.6, 0.7, 0.8]), 25.0)
    assert math.isclose(eff.time_to(0.55, [10.0, 20.0], [0.6, 0.7]), 5.0)
    assert math.isnan(eff.time_to(0.9, [10.0], [0.6]))
    stamps = {"started": 0.0, "starts": [[1, 0], [3, 0], [6, 0]], "ends": [[1, 0], [3, 0], [6, 0]]}
    times, median, startup = eff.checkpoint_times(stamps, every=1)
    assert (times, median, startup) == ([2.5, 4.5, 7.5], 2.5, 1.0)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_local_mi_memory_runs_and_its_two_losses_agree():
    """A small real run: the vectorised loss and the script's own loop (an independent
    implementation) print the same loss, and the script ends (a child that dies must not
    leave it waiting)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "local_mi_memory.py"), "--studies", "3",
         "--loop-studies", "3", "--sentences", "2", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    difference = float(proc.stdout.rsplit("the losses differ by ", 1)[1].split()[0])
    assert difference < 1e-4, proc.stdout


def test_learning_refuses_the_training_phantom_as_its_evaluation_phantom(tmp_path):
    """The temporal and lateral-only figures must come from patients nobody trained on."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--out", str(tmp_path)]
        + ["--eval-seed", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--eval-seed 0 is the training phantom" in proc.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was built
