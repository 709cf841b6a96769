"""Damaged data is skipped and counted per shard and reason, never dropped silently:
truncated shards (cut inside a member and exactly at a member boundary), corrupt JPEGs and
samples without text, in the loader, in the trainer's TensorBoard scalars, and the stop
above ``data.max_skipped_fraction``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.helpers.training import SMALL, env_for
from tests.test_loader import config, epoch_keys, jpeg_bytes, study_image, tokenizer, write_shards
from vlp.data.loader import build_loader
from vlp.data.shards import DamagedShard, iter_tar_samples

__all__ = ["tokenizer"]  # the fixture, re-exported for this module's tests

ROOT = Path(__file__).resolve().parents[1]


def _keys_in(shard: Path) -> list[str]:
    """Sample keys of an intact shard, read with tarfile alone (independent of vlp)."""
    with tarfile.open(shard) as tar:
        keys = [m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()]
    return list(dict.fromkeys(keys))


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_a_shard_cut_at_a_member_boundary_is_detected(tmp_path):
    write_shards(tmp_path, 6, [6])
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
    # Cut exactly before the header of the first member of the fourth sample: tarfile
    # itself would end the archive there without a word.
    fourth = _keys_in(shard)[3]
    cut = next(m.offset for m in members if m.name.startswith(fourth))
    _truncate(shard, cut)
    with tarfile.open(shard) as tar:  # what tarfile alone does: no error
        assert len(tar.getmembers()) > 0
    got = []
    with pytest.raises(DamagedShard, match="truncated"):
        for sample in iter_tar_samples(str(shard)):
            got.append(sample["__key__"])
    # The third sample, the one in progress where the archive ends, may be incomplete and
    # is not trusted; the first two are yielded.
    assert got == _keys_in_intact_copy(tmp_path)[:2]


def _keys_in_intact_copy(tmp_path: Path) -> list[str]:
    write_shards(tmp_path / "intact", 6, [6])
    return _keys_in(tmp_path / "intact" / "shard-000000.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_shard_is_counted_per_shard_and_reason(tmp_path, tokenizer, workers):
    written = write_shards(tmp_path, 12, [6, 6])
    damaged = tmp_path / "shard-000001.tar"
    intact = _keys_in(damaged)
    _truncate(damaged, damaged.stat().st_size // 2)
    loader = build_loader(config(tmp_path, workers=workers, drop_last=False), tokenizer)
    keys = epoch_keys(loader)
    stats = loader.stats
    kept = [k for k in intact if k in keys]
    assert 0 < len(kept) < len(intact)
    assert kept == intact[: len(kept)]  # the samples before the cut are kept
    # Every sample is either yielded or counted: the manifest's 12.
    assert stats.samples_yielded + stats.samples_skipped == len(written) == 12
    assert stats.samples_skipped == len(intact) - len(kept)
    assert stats.skipped_by_reason == {"damaged_shard": len(intact) - len(kept)}
    assert stats.skipped_by_shard == {str(damaged): len(intact) - len(kept)}
    assert [row[0] for row in stats.damaged_shards] == [str(damaged)]
    assert stats.damaged_shards[0][2] == len(kept)


def test_corrupt_images_and_missing_text_are_counted_under_their_reasons(tmp_path, tokenizer):
    good = jpeg_bytes(study_image(0, 0, 48, 40))
    write_shards(tmp_path, 8, [4, 4], corrupt={1: good[:100], 6: b"not a jpeg"})
    # Remove the txt member of one sample of the first shard.
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = members[0][0].name.split(".", 1)[0]
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            if info.name != f"{victim}.txt":
                tar.addfile(info, __import__("io").BytesIO(data))
    loader = build_loader(config(tmp_path, workers=0, drop_last=False), tokenizer)
    keys = epoch_keys(loader)
    stats = loader.stats
    assert len(keys) == 5 and stats.samples_skipped == 3
    assert stats.skipped_by_reason == {"image": 2, "text": 1}
    assert stats.skipped_by_shard == {str(shard): 2, str(tmp_path / "shard-000001.tar"): 1}


def _pretrain(tmp_path: Path, cache: Path, shards: Path, *overrides: str):
    command = [
        sys.executable, "-m", "vlp.cli", "pretrain", str(ROOT / "recipes" / "debug.yaml"),
        "--run-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    for item in [*SMALL, f"data.shards={shards}", *overrides]:
        command += ["--set", item]
    return subprocess.run(command, env=env_for(cache), capture_output=True, text=True, timeout=600)


def _phantom_shards(tmp_path: Path, cache: Path) -> Path:
    """A copy of the small phantom's train shards (built once per session in ``cache``)."""
    import shutil

    from vlp.config import load_recipe
    from vlp.data.phantom_cache import phantom_shards

    cfg = load_recipe(ROOT / "recipes" / "debug.yaml", SMALL)
    source = phantom_shards(cfg.data.phantom, cfg.data.priors, root=cache) / "shards" / "train"
    target = tmp_path / "shards"
    shutil.copytree(source, target)
    return target


def test_training_shows_skipped_samples_in_tensorboard_and_stops_above_the_limit(
    tmp_path, phantom_cache
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards = _phantom_shards(tmp_path, phantom_cache)
    first = sorted(shards.glob("*.tar"))[0]
    held = len(_keys_in(first))
    _truncate(first, first.stat().st_size // 4)  # the phantom's one train shard
    result = _pretrain(tmp_path, phantom_cache, shards, "train.steps=8", "data.shuffle_buffer=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"damaged shard {first}" in result.stderr + result.stdout
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    skipped = [e.value for e in events.Scalars("data/skipped_damaged_shard")]
    assert skipped[-1] > 0 and skipped[-1] < held
    assert events.Scalars("data/samples_skipped")[-1].value == skipped[-1]

    # The same data with a limit it exceeds: one line naming the shard, exit 2 at the
    # step that first counts the damage, the checkpoints from before it kept.
    again = _pretrain(
        tmp_path / "limited",
        phantom_cache,
        shards,
        "train.steps=12",
        "data.shuffle_buffer=0",
        "data.max_skipped_fraction=0.0",
        "data.skip_check_after=1",
        "checkpoint.every=1",
    )
    assert again.returncode == 2, again.stderr[-3000:]
    message = again.stderr.strip().splitlines()[-1]
    assert "data.max_skipped_fraction" in message and str(first) in message
    assert "Traceback" not in again.stderr
    stopped = int(message.split("by step ")[1].split(",")[0])
    kept = [int(p.name.split("-")[1]) for p in (tmp_path / "limited" / "run").glob("step-*")]
    assert all(step < stopped for step in kept)


def test_evaluators_count_skipped_samples_the_same_way(tmp_path, capsys):
    """The evaluators' feature extraction reads through the same loader: a corrupt JPEG, a
    truncated shard and their counts reach ``Features.skipped`` and one stderr line."""
    from vlp.config import load_recipe
    from vlp.evaluation.features import extract_features
    from vlp.models.model import build_model

    good = jpeg_bytes(study_image(0, 0, 48, 40))
    write_shards(tmp_path, 12, [6, 6], corrupt={1: good[:100], 4: b"not a jpeg"})
    damaged = tmp_path / "shard-000001.tar"
    intact = _keys_in(damaged)
    _truncate(damaged, damaged.stat().st_size // 2)
    cfg = load_recipe(ROOT / "recipes" / "debug.yaml")
    model_cfg = dataclasses.replace(cfg.model, encoders={"image": cfg.model.encoders["image"]})
    model = build_model(model_cfg, 64).eval()
    feats = extract_features(model, tmp_path)
    corrupt = [k for k in _keys_in(tmp_path / "shard-000000.tar") if k not in feats.keys]
    lost = [k for k in intact if k not in feats.keys]
    assert len(corrupt) == 2 and 0 < len(lost) < len(intact)
    assert feats.skipped == len(corrupt) + len(lost) and len(feats) == 12 - feats.skipped
    err = capsys.readouterr().err
    assert f"skipped {feats.skipped} of 12 samples" in err and str(damaged) in err
