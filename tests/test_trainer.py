"""The DeepSpeed trainer, really started: 1 process and 2 gloo ranks under torchrun.

Independent references: a 2-rank run is compared with a 1-process run holding the same
global batch; a resumed run with an uninterrupted one; TensorBoard files are read back
with TensorBoard's own reader.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.training import DEBUG, ENTRY, env_for, run_training

ROOT = Path(__file__).resolve().parents[1]

# A model without batch norm and without dropout, so 1 process and 2 ranks compute the same
# function of the same global batch (batch-norm statistics would differ per rank).
NO_BN = [
    "model.encoders.image.tower.name=vit_tiny_patch16_224",
    "data.image_size=32",
    "objectives=[{name: clip, weight: 1.0}]",
    "model.encoders.text.tower.params={dropout: 0.0}",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vlp-cache")


def test_bad_recipe_fails_before_any_process_group(tmp_path):
    import torch.distributed as dist

    from vlp.config import ConfigError
    from vlp.training.trainer import pretrain

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {DEBUG}\ntrain: {{stesp: 3}}\n")
    with pytest.raises(ConfigError, match=r"train\.stesp: unknown key; did you mean 'steps'\?"):
        pretrain(bad, run_dir=tmp_path / "run")
    assert not dist.is_initialized()
    assert not (tmp_path / "run").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "vlp.cli", "pretrain", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "train.stesp: unknown key; did you mean 'steps'?" in proc.stderr


# ZeRO-3 with a timm ViT (the tower enters it through forward_features, outside its hooked
# call) and with a batch-norm-free CNN (ConvNeXt, layer norm); the local-MI arm adds a
# separable critic, whose temperature is read outside the critic's forward.
LOCAL_MI = [
    "objectives=[{name: local_mi, weight: 1.0, critic: {kind: separable, dim: 16}}]",
]
CONVNEXT = [
    "model.encoders.image.tower.name=convnext_atto",
    "model.encoders.image.tower.params={}",
    "data.image_size=64",
]


@pytest.mark.parametrize(
    ("stage", "tower"),
    [(2, []), (3, []), (3, CONVNEXT), (3, LOCAL_MI)],
    ids=["zero2-vit", "zero3-vit", "zero3-convnext", "zero3-vit-local-mi"],
)
def test_two_rank_zero_equals_one_process_and_exports(tmp_path, cache, stage, tower):
    from safetensors.torch import load_file

    from vlp.training.export import export, load_model

    overrides = [
        *NO_BN,
        *tower,
        f"deepspeed.zero_stage={stage}",
        "train.steps=3",
        "checkpoint.every=100",
    ]
    one = run_training(tmp_path, "one", overrides=overrides, synthetic=8, cache=cache)[0]
    two = run_training(tmp_path, "two", ranks=2, overrides=overrides, synthetic=8, cache=cache)
    assert len(one["losses"]) == 3
    for rank_history in two:
        # Logged losses are averaged over ranks: the 1-process loss on the global batch.
        assert rank_history["losses"] == pytest.approx(one["losses"], abs=1e-5)
    assert one["losses"][0] != pytest.approx(one["losses"][-1], abs=1e-4), "training did not move"
    # The sharded checkpoint consolidates to the same weights the single process trained.
    single = load_file(str(export(tmp_path / "one") / "model.safetensors"))
    sharded = load_file(str(export(tmp_path / "two") / "model.safetensors"))
    assert single.keys() == sharded.keys()
    for name in single:
        assert sharded[name].shape == single[name].shape, name
        assert (sharded[name] - single[name]).abs().max() < 1e-4, name
    model, _ = load_model(tmp_path / "two" / "export")
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in sharded.values())


@pytest.mark.parametrize(("ranks", "stage"), [(1, 0), (2, 2)])
def test_exact_resume_on_phantom_shards(tmp_path, cache, ranks, stage):
    base = [
        "train.steps=6",
        "checkpoint.every=3",
        "data.workers=1",
        f"deepspeed.zero_stage={stage}",
    ]
    full = run_training(tmp_path, f"full{ranks}", ranks=ranks, overrides=base, cache=cache)
    run_dir = tmp_path / f"split{ranks}"
    first = run_training(
        tmp_path,
        f"first{ranks}",
        ranks=ranks,
        overrides=["train.steps=3", *base[1:]],
        run_dir=run_dir,
        cache=cache,
    )
    second = run_training(
        tmp_path,
        f"second{ranks}",
        ranks=ranks,
        overrides=base,
        resume="auto",
        run_dir=run_dir,
        cache=cache,
    )
    assert first[0]["steps"] == [1, 2, 3] and second[0]["steps"] == [4, 5, 6]
    resumed = first[0]["losses"] + second[0]["losses"]
    assert resumed == pytest.approx(full[0]["losses"], abs=1e-6)


def test_run_dir_config_checkpoints_and_tensorboard(tmp_path, cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlp.config import load_recipe, recipe_from_dict

    run_training(
        tmp_path,
        "tb",
        overrides=["train.steps=4", "checkpoint.every=1", "checkpoint.keep=2"],
        cache=cache,
    )
    run_dir = tmp_path / "tb"
    # config.yaml reloads to an equal config.
    saved = recipe_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert saved == load_recipe(DEBUG, ["train.steps=4", "checkpoint.every=1", "checkpoint.keep=2"])
    # keep=2: only the last two completed checkpoints remain; latest names the newest.
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-3", "step-4"]
    assert (run_dir / "latest").read_text() == "step-4"
    assert (run_dir / "step-4" / "COMPLETE").is_file()
    assert (run_dir / "step-4" / "trainer_state_rank0.pt").is_file()
    assert "step 4/4" in (run_dir / "log.txt").read_text()
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "loss/total",
        "loss/local_mi/mi",
        "metric/local_mi/bound",
        "optim/grad_norm",
        "perf/samples_per_s",
        "perf/data_wait_fraction",
        "perf/step_time_s",
        "perf/memory_mb",
    ):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert any(t.startswith("lr/text") for t in tags) and any(
        t.startswith("lr/image") for t in tags
    )
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2, 3, 4]


def test_sigusr1_checkpoints_and_resume_auto_continues(tmp_path, cache):
    run_training(
        tmp_path, "warm", overrides=["train.steps=1"], cache=cache
    )  # build the phantom cache
    run_dir = tmp_path / "preempt"
    out = tmp_path / "preempt.json"
    cmd = [sys.executable, ENTRY, DEBUG, "--run-dir", str(run_dir), "--out", str(out)]
    cmd += [
        "--set",
        "train.steps=400",
        "--set",
        "checkpoint.every=1000",
        "--set",
        "train.log_every=1",
    ]
    proc = subprocess.Popen(
        cmd, env=env_for(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 300
    log = run_dir / "log.txt"
    while time.time() < deadline and not (log.is_file() and "step 2/400" in log.read_text()):
        time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    history = json.loads(Path(f"{out}.rank0").read_text())
    assert history["preempted"] is True
    stopped = history["steps"][-1]
    assert 2 <= stopped < 400
    assert (run_dir / f"step-{stopped}" / "COMPLETE").is_file()
    assert (run_dir / "latest").read_text() == f"step-{stopped}"
    resumed = run_training(
        tmp_path,
        "resumed",
        overrides=[f"train.steps={stopped + 2}"],
        resume="auto",
        run_dir=run_dir,
        cache=cache,
    )[0]
    assert resumed["steps"] == [stopped + 1, stopped + 2]


def test_time_limit_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path, cache):
    # 0.0001 minutes (6 ms) is over after the first step: both ranks must stop there
    # together (the decision is all-reduced), leave a complete checkpoint, and resume.
    histories = run_training(
        tmp_path,
        "limited",
        ranks=2,
        overrides=["train.steps=50", "train.time_limit_minutes=0.0001", "checkpoint.every=1000"],
        cache=cache,
    )
    assert [h["steps"] for h in histories] == [[1], [1]]
    assert all(h["time_limited"] and not h["preempted"] for h in histories)
    run_dir = tmp_path / "limited"
    assert (run_dir / "step-1" / "COMPLETE").is_file()
    assert (
        "train.time_limit_minutes (0.0001) reached at step 1 of 50"
        in (run_dir / "log.txt").read_text()
    )
