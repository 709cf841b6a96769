"""Med-ST's MoVE encoder (``vlp.models.move``): shared attention, per-view experts.

Independent references: with the lateral masked, the frontal output against the frontal
view encoded alone; the experts against a plain timm ViT forward; ZeRO-3 training against
an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.training import check_trains_and_resumes
from vlp.config import load_recipe
from vlp.data.batch import batch_from_images
from vlp.models.image import ImageTowerConfig
from vlp.models.move import MoVEConfig, MoVEEncoder

ROOT = Path(__file__).resolve().parents[1]


def _encoder() -> MoVEEncoder:
    torch.manual_seed(0)
    tower = ImageTowerConfig(name="vit_tiny_patch16_224")
    return MoVEEncoder(MoVEConfig(tower=tower), image_size=32).eval()


def _batch(has_lateral: list[bool]) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (len(has_lateral), 1, 32, 32)
    frontal = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    lateral = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    batch = batch_from_images({"frontal": frontal, "lateral": lateral})
    batch["view_mask"]["lateral"] = torch.tensor(has_lateral)[:, None]
    return batch


def test_shapes_and_layout():
    encoder = _encoder()
    with torch.no_grad():
        out = encoder(_batch([True, False]))
    assert out.pooled.shape == (2, 192) and out.local.shape == (2, 8, 192)
    assert [(s.view, s.start, s.stop) for s in out.layout] == [("frontal", 0, 4), ("lateral", 4, 8)]


def test_a_masked_lateral_leaves_the_frontal_output_of_the_frontal_alone():
    encoder = _encoder()
    batch = _batch([True, False, False])
    with torch.no_grad():
        both = encoder(batch)
        alone = encoder.encode_images(batch["images"]["frontal"][:, 0])
        # Studies without a lateral: class token and frontal patches as the frontal alone.
        for row in (1, 2):
            torch.testing.assert_close(both.pooled[row], alone.pooled[row], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(both.local[row, :4], alone.local[row], atol=1e-5, rtol=1e-5)
        # With a lateral, the shared attention lets it change the frontal output.
        assert (both.pooled[0] - alone.pooled[0]).abs().max() > 1e-4


def test_the_frontal_expert_is_the_vits_own_forward():
    encoder = _encoder()
    images = _batch([False])["images"]["frontal"][:, 0]
    with torch.no_grad():
        out = encoder.encode_images(images)
        tokens = encoder.tower.model.forward_features(encoder.tower.normalize(images))
    torch.testing.assert_close(out.pooled, tokens[:, 0])
    torch.testing.assert_close(out.local, tokens[:, 1:])
    # The lateral experts start as copies and train separately.
    block, expert = encoder.tower.model.blocks[0], encoder.lateral_experts[0]
    assert torch.equal(block.mlp.fc1.weight, expert["mlp"].fc1.weight)
    assert block.mlp.fc1.weight.data_ptr() != expert["mlp"].fc1.weight.data_ptr()


#: MoVE shrunk to a tiny ViT at 32 px (a 2×2 grid per view). ZeRO-3 keeps parameters
#: below ``stage3_param_persistence_threshold`` (1e5 elements) whole; at 0 every tiny
#: parameter is partitioned, as a ViT-B's position embedding (151k) would be.
TINY_MOVE = [
    "model.encoders.image.tower.name=vit_tiny_patch16_224",
    "data.image_size=32",
    "deepspeed.extra={zero_optimization: {stage: 3, stage3_param_persistence_threshold: 0}}",
]


def test_move_recipe_trains_under_zero3_and_resumes_exactly(tmp_path, phantom_cache):
    recipe = str(ROOT / "recipes" / "move.yaml")
    assert load_recipe(recipe).deepspeed.zero_stage == 3
    check_trains_and_resumes(tmp_path, phantom_cache, recipe, TINY_MOVE)


def test_med_st_recipe_trains_under_zero3_and_resumes_exactly(tmp_path, phantom_cache):
    recipe = str(ROOT / "recipes" / "med_st.yaml")
    cfg = load_recipe(recipe)
    assert cfg.deepspeed.zero_stage == 3 and cfg.data.priors == 3
    assert [(o.name, o.weight) for o in cfg.objectives] == [
        ("clip", 1.0),
        ("weighted_local_alignment", 1.0),
        ("temporal_cycle", 1.0),
    ]
    check_trains_and_resumes(tmp_path, phantom_cache, recipe, TINY_MOVE)


def test_grounding_reads_the_current_frontal_segment_of_a_two_view_encoding():
    from vlp.evaluation.grounding import frontal_tokens

    encoder = _encoder()
    with torch.no_grad():
        out = encoder(_batch([True]))
    feats = {"image_local": out.local, "image_grid": out.grid, "image_layout": out.layout}
    frontal = frontal_tokens(feats)
    assert torch.equal(frontal["image_local"], out.local[:, :4]) and frontal["image_grid"] == (2, 2)
    lateral_only = dict(feats, image_layout=out.layout[1:] + out.layout[1:])
    with pytest.raises(ValueError, match="no current frontal segment"):
        frontal_tokens(lateral_only)
