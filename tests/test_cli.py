"""The `vlp` command line and the README: help texts, errors, and every README example run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("pretrain", "submit", "export", "shards", "phantom", "eval", "demo")


def vlp(
    *args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlp.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def test_top_level_help_is_fast_and_lists_commands():
    start = time.perf_counter()
    proc = vlp("--help")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0
    for command in SUBCOMMANDS:
        assert command in proc.stdout
    assert elapsed < 3.0, f"vlp --help took {elapsed:.2f}s"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_has_real_help(command):
    proc = vlp(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    assert len(proc.stdout.splitlines()) > 4


def test_unknown_command_and_bad_arguments_fail_in_one_line():
    for args in (["frobnicate"], ["pretrain"], ["phantom", "--patients", "many"], ["eval", "nope"]):
        proc = vlp(*args)
        assert proc.returncode == 2, args
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, proc.stderr
        assert "error:" in lines[0] and "Traceback" not in proc.stderr


def test_missing_recipe_is_a_one_line_error(tmp_path):
    proc = vlp("pretrain", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"vlp pretrain: error: {tmp_path / 'nope.yaml'}: recipe file not found"
    )


def test_missing_shards_fail_in_one_line_before_anything_starts(tmp_path):
    for shards in (str(tmp_path / "nonexistent" / "train"), str(tmp_path)):
        run_dir = tmp_path / "run"
        proc = vlp(
            "pretrain",
            str(ROOT / "recipes" / "debug.yaml"),
            "--set",
            f"data.shards={shards}",
            "--run-dir",
            str(run_dir),
        )
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith("vlp pretrain: error: ") and "data.shards: " in lines[0]
        assert shards in lines[0]
        assert not run_dir.exists()  # no process group, no run directory, nothing written


# Each bad input of issue 16's checklist: (overrides, the key or text the one line names).
BAD_INPUTS = {
    "unknown-objective": (
        ["objectives=[{name: local_mii}]"],
        "objectives[0].name: unknown objective 'local_mii'; did you mean 'local_mi'?",
    ),
    # Every image encoder yields local tokens; a local objective without an image
    # encoder is what remains impossible.
    "local-objective-without-image-encoder": (
        ["model.encoders.image=null"],
        "objectives[0]: objective 'local_mi' needs the feature(s) ['image_local']",
    ),
    "image-sizes-disagree": (
        [
            "model.encoders.image.tower.name=vit_tiny_patch16_224",
            "model.encoders.image.tower.params={img_size: 96}",
        ],
        "model.encoders.image.tower.params.img_size: 96 disagrees with data.image_size (64)",
    ),
    # The global batch is data.batch_size (per rank) x accumulation x ranks by
    # construction; a DeepSpeed batch key in deepspeed.extra could only contradict it.
    "batch-size-in-deepspeed-extra": (
        ["deepspeed.extra={train_batch_size: 7}"],
        "deepspeed: extra.train_batch_size: vlp sets DeepSpeed's batch keys itself",
    ),
    "empty-shard-manifest": (
        ["data.shards=EMPTY"],
        "data.shards: EMPTY: manifest lists no shards",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_in_one_line_before_anything_starts(tmp_path, case):
    from vlp.data.schema import SCHEMA_VERSION

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"shards": [], "total": 0, "schema_version": SCHEMA_VERSION}))
    overrides, expected = BAD_INPUTS[case]
    run_dir = tmp_path / "run"
    args = ["pretrain", str(ROOT / "recipes" / "debug.yaml"), "--run-dir", str(run_dir)]
    for item in overrides:
        args += ["--set", item.replace("EMPTY", str(empty))]
    proc = vlp(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("vlp pretrain: error: ")
    assert expected.replace("EMPTY", str(empty)) in lines[0], lines[0]
    assert not run_dir.exists()  # no process group, no run directory, nothing written


def test_vlp_debug_shows_the_traceback_of_a_bad_input(tmp_path):
    overrides, expected = BAD_INPUTS["unknown-objective"]
    args = ["pretrain", str(ROOT / "recipes" / "debug.yaml"), "--run-dir", str(tmp_path / "r")]
    proc = vlp(*args, "--set", overrides[0], env=dict(os.environ, VLP_DEBUG="1"))
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "vlp.config.loader.ConfigError: " in proc.stderr and expected in proc.stderr


def readme_examples() -> list[tuple[str, str]]:
    """(name, command) of every ``<!-- example: NAME -->`` code block in the README, in order."""
    text = (ROOT / "README.md").read_text()
    pattern = re.compile(r"<!-- example: ([\w-]+) -->\s*```bash\n(.*?)```", re.S)
    return [(name, body.strip().replace("\\\n", " ")) for name, body in pattern.findall(text)]


def test_readme_examples_run_in_order(tmp_path):
    """Runs the README's examples as a user would, in a scratch copy of the working folder."""
    examples = readme_examples()
    assert [n for n, _ in examples] == [
        "dicom-phantom",
        "phantom-and-shards",
        "pretrain-debug",
        "export",
        "export-hf",
        "zero-shot",
        "grounding",
        "temporal",
        "zero-shot-images",
    ]
    for name in ("recipes", "tools"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(
        os.environ, VLP_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)
    )
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "vlp").write_text(f'#!/bin/sh\nexec {sys.executable} -m vlp.cli "$@"\n')
    (bindir / "vlp").chmod(0o755)
    (bindir / "python").symlink_to(sys.executable)
    env["PATH"] = f"{bindir}:{env['PATH']}"
    for name, command in examples:
        proc = subprocess.run(
            ["bash", "-ec", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, (
            f"README example {name!r} failed:\n{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    assert (tmp_path / "data" / "phantom" / "preview.png").is_file()
    assert list((tmp_path / "data" / "phantom-dcm" / "files").glob("*/*/*/*.dcm"))
    assert (tmp_path / "data" / "phantom-dcm-shards" / "train" / "manifest.json").is_file()
    assert (tmp_path / "data" / "phantom-shards" / "train" / "manifest.json").is_file()
    assert (tmp_path / "runs" / "debug" / "export" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "debug" / "eval-zs" / "results.json").is_file()
    assert len(list((tmp_path / "runs" / "debug" / "heatmaps").glob("*.png"))) == 4
    hf = tmp_path / "runs" / "debug" / "export-hf"
    assert (hf / "text" / "config.json").is_file() and (hf / "image" / "config.json").is_file()
    assert (hf / "README.md").is_file() and (
        tmp_path / "runs" / "debug" / "export" / "README.md"
    ).is_file()
    temporal = json.loads((tmp_path / "runs/debug/eval-temporal/results.json").read_text())
    assert temporal["with_prior"] > 0 and temporal["embedding"] == "pair"
    grounding = json.loads((tmp_path / "runs/debug/eval-grounding/results.json").read_text())
    assert grounding["similarity"].startswith("local MI critic")
