"""BioViL-T's multi-image encoder (``vlp.models.multi_image``) and its recipe.

Independent references: the sine embedding against a per-entry loop of its formula; the
per-sample prior handling against encoding each sample alone; training under DeepSpeed
against an uninterrupted run (exact resume).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers.training import check_trains_and_resumes
from vlp.config import load_recipe
from vlp.data.batch import batch_from_images
from vlp.models.image import ImageTowerConfig
from vlp.models.multi_image import BioViLTConfig, BioViLTEncoder, sine_position_embedding

ROOT = Path(__file__).resolve().parents[1]


def _encoder(**overrides) -> BioViLTEncoder:
    torch.manual_seed(0)
    values = dict(tower=ImageTowerConfig(name="test_resnet"), dim=16, heads=2, depth=2)
    values.update(overrides)
    return BioViLTEncoder(BioViLTConfig(**values), image_size=64).eval()


def _batch(has_prior: list[bool], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(has_prior), 2, 1, 64, 64), generator=g, dtype=torch.uint8)
    mask = torch.tensor([[True, p] for p in has_prior])
    images[:, 1][~mask[:, 1]] = 0
    batch = batch_from_images({"frontal": images})
    batch["view_mask"]["frontal"] = mask
    batch["study_mask"] = mask.clone()
    return batch


def test_sine_position_embedding_matches_its_formula():
    grid, dim = (3, 5), 8
    got = sine_position_embedding(grid, dim)
    half = dim // 2
    for i in range(grid[0]):
        for j in range(grid[1]):
            for axis, coord, size in ((0, i, grid[0]), (1, j, grid[1])):
                for k in range(half):
                    angle = (coord + 1) / size * 2 * math.pi / 10000 ** (2 * (k // 2) / half)
                    want = math.sin(angle) if k % 2 == 0 else math.cos(angle)
                    assert got[i * grid[1] + j, axis * half + k].item() == pytest.approx(
                        want, abs=1e-5
                    )


def test_shapes_with_and_without_a_prior():
    encoder = _encoder()
    with torch.no_grad():
        out = encoder(_batch([True, False, True]))
    regions = out.layout[0].grid[0] * out.layout[0].grid[1]
    assert out.local.shape == (3, regions, 32) and out.pooled.shape == (3, 32)
    assert encoder.global_dim == encoder.local_dim == 32
    assert [(s.view, s.time, s.start) for s in out.layout] == [("frontal", 0, 0)]
    with torch.no_grad():
        alone = encoder.encode_images(torch.zeros(2, 1, 64, 64, dtype=torch.uint8))
    assert alone.local.shape == (2, regions, 32)


def test_a_missing_prior_gives_the_learned_embedding_and_each_sample_is_its_own():
    encoder = _encoder()
    batch = _batch([True, False, True, False])
    with torch.no_grad():
        mixed = encoder(batch).local
        # Rows without a prior: the difference half is the missing-prior embedding exactly.
        missing = encoder.missing_prior[0, 0]
        for row in (1, 3):
            assert torch.equal(mixed[row, :, 16:], missing.expand_as(mixed[row, :, 16:]))
        # Each row equals the same sample encoded alone (eval mode: no batch statistics).
        for row in range(4):
            single = {
                "images": {"frontal": batch["images"]["frontal"][row : row + 1]},
                "view_mask": {"frontal": batch["view_mask"]["frontal"][row : row + 1]},
            }
            torch.testing.assert_close(encoder(single).local[0], mixed[row], atol=1e-5, rtol=1e-5)
        # The prior is read: a different prior image changes the rows that have one, only.
        other = _batch([True, False, True, False], seed=1)
        other["images"]["frontal"][:, 0] = batch["images"]["frontal"][:, 0]
        moved = (encoder(other).local - mixed).abs().flatten(1).amax(1) > 1e-6
    assert moved.tolist() == [True, False, True, False]
    # Without a prior the encoder is encode_images on the current image.
    with torch.no_grad():
        none = _batch([False, False])
        torch.testing.assert_close(
            encoder(none).local, encoder.encode_images(none["images"]["frontal"][:, 0]).local
        )


def test_recipe_declares_the_prior_and_the_global_head():
    cfg = load_recipe(ROOT / "recipes" / "biovil_t.yaml")
    assert cfg.model.encoders["image"]["kind"] == "biovil_t"
    assert cfg.data.priors >= 1 and cfg.model.global_head == "mean_local"
    assert cfg.model.embed_dim == 128


def test_biovil_t_trains_under_deepspeed_and_resumes_exactly(tmp_path, phantom_cache):
    small = [
        "model.encoders.image.dim=16",
        "model.encoders.image.heads=2",
        "model.encoders.image.depth=1",
    ]
    run_dir = check_trains_and_resumes(
        tmp_path, phantom_cache, str(ROOT / "recipes" / "biovil_t.yaml"), small
    )
    # The temporal evaluator reads the model's requirements: the prior study is encoded
    # with its own prior (T = 3 in the evaluation loader).
    from vlp.data.phantom_cache import phantom_shards
    from vlp.evaluation import run_evaluator

    # The shards this run trained on (the cache holds one phantom per priors setting).
    data = load_recipe(run_dir / "config.yaml").data
    folder = phantom_shards(data.phantom, priors=data.priors, root=phantom_cache)
    train = folder / "shards" / "train"
    results = run_evaluator("temporal", run_dir, train, tmp_path / "eval", bootstrap=10)
    assert 0 < results["with_prior"] < results["samples"]
