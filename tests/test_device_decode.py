"""Tests of ``data.decode_device: cuda`` (vlp.data.device_decode), run on the CPU.

torchvision decodes JPEGs on the CPU too, so the device path is exercised here with
``device="cpu"``: the loader is told CUDA is there (the workers never touch it; only the
fallback check asks), and its encoded batches are decoded by ``batch_to(batch, "cpu")``.
The reference is the CPU path (PIL draft decoding in the workers) on the same shards, an
independent decoder and resize. They are not bit-identical: PIL reduces in the DCT domain
and resizes from a float crop box, the device path decodes in full and does the whole
reduction with torch's antialiased bilinear resize from a box rounded to stored pixels.
Measured on the four real radiographs at 224 px: 0.26-0.40 grey levels mean absolute
difference (1024 px stored), up to 1.04 for a 2048-px image decoded at 1/8 by PIL.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_loader import REAL_CXR, config, jpeg_bytes, make_record, write_shards
from vlp.data import schema
from vlp.data.batch import batch_to
from vlp.data.loader import build_loader
from vlp.data.transforms import AugmentConfig

CONVIRT = AugmentConfig(
    enabled=True, crop_scale=(0.6, 1.0), degrees=20.0, translate=0.1, scale=(0.95, 1.05)
)


def batches(root, monkeypatch, cuda: bool, **overrides) -> list[dict]:
    """One epoch of a loader over ``root``, built as if CUDA were (not) there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    return list(build_loader(config(root, **overrides), None))


def assert_close_images(cpu: dict, device: dict, mean_tol: float, max_tol: float) -> dict:
    """Same keys, shapes and masks; each present image within the tolerances (grey
    levels) of the CPU path's; absent ones exactly zero on both. Returns how many images
    of each view were compared."""
    assert cpu["keys"] == device["keys"]
    assert cpu.keys() == device.keys()
    assert cpu["images"].keys() == device["images"].keys()
    compared = {}
    for view, want in cpu["images"].items():
        got = device["images"][view]
        assert got.shape == want.shape and got.dtype == torch.uint8, view
        mask = cpu["view_mask"][view]
        assert torch.equal(device["view_mask"][view], mask), view
        assert not got[~mask].any() and not want[~mask].any(), view
        diff = (got.float() - want.float()).abs()[mask]
        compared[view] = len(diff)
        if not len(diff):
            continue
        per_image = diff.flatten(1).mean(1)
        assert per_image.max() <= mean_tol, (view, per_image.tolist())
        assert diff.max() <= max_tol, (view, diff.max())
    return compared


@pytest.mark.parametrize("augment", [AugmentConfig(), CONVIRT], ids=["no-augment", "convirt"])
def test_device_path_on_the_cpu_is_close_to_the_pil_path(tmp_path, monkeypatch, augment):
    # 200x160 stored, 32 px out: PIL decodes at 1/4. Every third study has no lateral and
    # no prior has one, so absent views sit beside present ones at both time steps.
    write_shards(tmp_path, 10, [5, 5], image_hw=(200, 160), lateral=lambda i: i % 3 != 0)
    common = dict(views=["frontal", "lateral"], priors=1, augment=augment)
    cpu = batches(tmp_path, monkeypatch, False, **common)
    encoded = batches(tmp_path, monkeypatch, True, decode_device="cuda", **common)
    assert len(cpu) == len(encoded) > 1
    compared = {"frontal": 0, "lateral": 0}
    for want, batch in zip(cpu, encoded):
        # the workers left every view encoded: nothing decoded before batch_to
        assert "images" not in batch and batch["encoded_images"].keys() == {"frontal", "lateral"}
        assert not len(batch["encoded_images"]["frontal"]["decoded_rows"])
        counts = assert_close_images(want, batch_to(batch, "cpu"), mean_tol=0.5, max_tol=3)
        compared = {view: compared[view] + counts[view] for view in compared}
    # 10 current frontals + 10 priors' frontals; the 6 laterals of i % 3 != 0
    assert compared == {"frontal": 20, "lateral": 6}


def test_real_radiographs_decode_on_the_device_close_to_pil(tmp_path, monkeypatch):
    paths = sorted(REAL_CXR.glob("*.png"))
    if not paths:
        pytest.skip(f"no real radiographs in {REAL_CXR}")
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        for i, path in enumerate(paths):
            record = make_record(i, lateral=False, n_priors=0, n_sentences=1)
            key = schema.sample_key(record["subject_id"], record["study_id"])
            pixels = np.array(Image.open(path).convert("L"))
            members = {
                "json": json.dumps(record).encode(),
                "txt": b"r",
                "frontal.jpg": jpeg_bytes(pixels, quality=95),
            }
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = {
        "shards": [{"name": "shard-000000.tar", "samples": len(paths)}],
        "total": len(paths),
    }
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, schema_version=1)))
    for augment in (AugmentConfig(), CONVIRT):
        common = dict(workers=0, image_size=224, batch_size=len(paths), augment=augment)
        (cpu,) = batches(tmp_path, monkeypatch, False, **common)
        (encoded,) = batches(tmp_path, monkeypatch, True, decode_device="cuda", **common)
        # measured: at most 0.43 (no augmentation) and 0.31 (convirt) grey levels per image
        compared = assert_close_images(cpu, batch_to(encoded, "cpu"), mean_tol=1.0, max_tol=64)
        assert compared == {"frontal": len(paths)}


def test_cuda_without_a_gpu_falls_back_to_the_cpu_path_with_one_warning(
    tmp_path, monkeypatch, caplog
):
    write_shards(tmp_path, 8, [4, 4], lateral=lambda i: i % 2 == 0)
    common = dict(views=["frontal", "lateral"], priors=1, augment=CONVIRT)
    cpu = batches(tmp_path, monkeypatch, False, **common)
    with caplog.at_level(logging.WARNING, logger="vlp"):
        fallback = batches(tmp_path, monkeypatch, False, decode_device="cuda", **common)
    lines = [r for r in caplog.records if "decode_device" in r.getMessage()]
    assert [r.getMessage() for r in lines] == [
        "data.decode_device=cuda: no CUDA device here; decoding JPEGs on the CPU in the "
        "loader workers"
    ]
    assert lines[0].name.startswith("vlp") and lines[0].levelno == logging.WARNING
    assert len(cpu) == len(fallback) > 1
    for want, got in zip(cpu, fallback):
        assert want.keys() == got.keys() and want["keys"] == got["keys"]
        for view, images in want["images"].items():
            assert torch.equal(got["images"][view], images), view
            assert torch.equal(got["view_mask"][view], want["view_mask"][view]), view


def test_decode_device_is_selected_in_a_recipe_and_validated():
    from vlp.config import ConfigError, load_recipe

    recipe = load_recipe("recipes/clip.yaml", ["data.decode_device=cuda"])
    assert recipe.data.decode_device == "cuda"
    assert load_recipe("recipes/clip.yaml").data.decode_device == "cpu"
    with pytest.raises(
        ConfigError, match=r"decode_device must be one of \['cpu', 'cuda'\], got 'gpu'"
    ):
        load_recipe("recipes/clip.yaml", ["data.decode_device=gpu"])


def test_a_jpeg_whose_data_does_not_decode_is_left_out_on_the_device(tmp_path, monkeypatch, caplog):
    """The worker reads only the header, so a file cut after it reaches the device: that
    view becomes zeros, its mask is cleared and one warning says so; the other samples
    decode as on the CPU path (where the cut sample is skipped in the worker)."""
    from tests.test_loader import study_image

    good = jpeg_bytes(study_image(0, 0, 200, 160))  # half of it is well past the header
    write_shards(tmp_path, 4, [4], image_hw=(200, 160), corrupt={1: good[: len(good) // 2]})
    cpu = batches(tmp_path, monkeypatch, cuda=False, workers=0, batch_size=4, drop_last=False)
    encoded = batches(
        tmp_path,
        monkeypatch,
        cuda=True,
        decode_device="cuda",
        workers=0,
        batch_size=4,
        drop_last=False,
    )
    assert len(cpu[0]["keys"]) == 3 and len(encoded[0]["keys"]) == 4  # skipped vs kept
    with caplog.at_level(logging.WARNING, logger="vlp"):
        device = batch_to(encoded[0], "cpu")
    cut = device["keys"].index(next(k for k in device["keys"] if k not in cpu[0]["keys"]))
    assert not device["view_mask"]["frontal"][cut, 0]
    assert not device["images"]["frontal"][cut].any()
    assert sum("does not decode" in r.getMessage() for r in caplog.records) == 1
    kept = [device["keys"].index(k) for k in cpu[0]["keys"]]
    diff = device["images"]["frontal"][kept].float() - cpu[0]["images"]["frontal"].float()
    assert diff.abs().mean() < 1.0
