"""MAE (``vlp.models.mae`` encoder, ``vlp.objectives.reconstruction`` loss).

Independent references: the loss against a per-patch loop in numpy; the unmasked encoder
against timm's own ``forward_features``; the masked encoder against the same images with
their hidden patches changed (it must not see them); training against an uninterrupted
run (DeepSpeed ZeRO-2 and ZeRO-3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.training import check_trains_and_resumes
from vlp.data.batch import batch_from_images
from vlp.models.image import ImageTowerConfig
from vlp.models.mae import MAEConfig, MAEDecoderConfig, MAEEncoder, patchify, random_masking
from vlp.models.model import FeatureDims
from vlp.objectives.base import ObjectiveSpec, build_objective

ROOT = Path(__file__).resolve().parents[1]


def _encoder(mask_ratio: float = 0.75) -> MAEEncoder:
    torch.manual_seed(0)
    config = MAEConfig(
        tower=ImageTowerConfig(name="vit_tiny_patch16_224"),
        mask_ratio=mask_ratio,
        decoder=MAEDecoderConfig(dim=32, depth=1, heads=4),
    )
    return MAEEncoder(config, image_size=64)


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 64, 64), generator=g, dtype=torch.uint8)


def test_masking_keeps_the_requested_number_of_patches_per_sample():
    torch.manual_seed(1)
    kept, restore, mask = random_masking(5, 16, 4, "cpu")
    assert kept.shape == (5, 4) and mask.shape == (5, 16)
    assert mask.sum(1).tolist() == [12.0] * 5  # 16 - 4 hidden in every sample
    for b in range(5):
        assert sorted(torch.nonzero(mask[b] == 0).squeeze(1).tolist()) == sorted(kept[b].tolist())
    # restore undoes the shuffle: the kept ids come first in shuffled order
    shuffled = torch.argsort(restore, 1)
    assert torch.equal(shuffled[:, :4], kept)
    assert len({tuple(k.tolist()) for k in kept}) > 1  # each sample its own subset


def test_the_encoder_gives_extras_in_training_only():
    encoder = _encoder()
    batch = batch_from_images({"frontal": _images()})
    encoder.train()
    out = encoder(batch)
    assert out.local.shape == (3, 4, 192)  # 16 patches at 64 px, 25 % kept
    assert out.extras["mae_prediction"].shape == out.extras["mae_target"].shape == (3, 16, 256)
    assert out.extras["mae_mask"].sum(1).tolist() == [12.0] * 3
    encoder.eval()
    full = encoder(batch)
    assert full.extras is None and full.local.shape == (3, 16, 192) and full.grid == (4, 4)


@torch.no_grad()
def test_unmasked_encoding_is_the_vits_own_forward():
    encoder = _encoder().eval()
    images = _images()
    out = encoder.encode_images(images)
    tokens = encoder.tower.model.forward_features(encoder.tower.normalize(images))
    torch.testing.assert_close(out.pooled, tokens[:, 0])
    torch.testing.assert_close(out.local, tokens[:, 1:])


@torch.no_grad()
def test_the_masked_encoder_never_sees_the_hidden_patches():
    encoder = _encoder().train()
    images = _images()
    torch.manual_seed(5)
    first = encoder(batch_from_images({"frontal": images}))
    mask = first.extras["mae_mask"]
    # Replace every hidden patch's pixels; the same masking (same seed) must then give the
    # same tokens, and a target that differs exactly on the hidden patches.
    patches = patchify(images, 16).clone()
    patches[mask.bool()] = 255 - patches[mask.bool()]
    from vlp.models.mae import unpatchify

    changed = unpatchify(patches, 16, (4, 4))
    torch.manual_seed(5)
    second = encoder(batch_from_images({"frontal": changed}))
    assert torch.equal(second.extras["mae_mask"], mask)
    torch.testing.assert_close(second.local, first.local)
    torch.testing.assert_close(second.extras["mae_prediction"], first.extras["mae_prediction"])
    differs = (second.extras["mae_target"] != first.extras["mae_target"]).any(-1)
    assert torch.equal(differs, mask.bool())


def _loop_loss(prediction, target, mask, norm_pix: bool) -> float:
    total, count = 0.0, 0
    for b in range(prediction.shape[0]):
        for n in range(prediction.shape[1]):
            if not mask[b, n]:
                continue
            t = target[b, n].astype(np.float64)
            if norm_pix:
                t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
            total += float(np.mean((prediction[b, n] - t) ** 2))
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_the_loss_is_the_mse_of_the_hidden_patches_only(norm_pix):
    objective = build_objective(
        ObjectiveSpec("mae", 1.0, {"norm_pix_loss": norm_pix}), FeatureDims(8, 8, None)
    )
    g = torch.Generator().manual_seed(2)
    prediction = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    target = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1]], dtype=torch.float64)
    feats = {"image_mae_prediction": prediction, "image_mae_target": target, "image_mae_mask": mask}
    loss = float(objective(feats, {}).losses["reconstruction"])
    want = _loop_loss(prediction.numpy(), target.numpy(), mask.numpy(), norm_pix)
    assert loss == pytest.approx(want, rel=1e-6)
    # Predictions on visible patches do not matter.
    other = prediction.clone()
    other[mask == 0] += 100.0
    feats["image_mae_prediction"] = other
    assert float(objective(feats, {}).losses["reconstruction"]) == pytest.approx(loss, rel=1e-9)


TINY_MAE = [
    "model.encoders.image.tower.name=vit_tiny_patch16_224",
    "model.encoders.image.decoder={dim: 32, depth: 1, heads: 4}",
    "data.image_size=32",
]


@pytest.mark.parametrize("stage", [2, 3])
def test_mae_trains_resumes_exactly_and_exports_its_decoder(tmp_path, phantom_cache, stage):
    from safetensors.torch import load_file

    from vlp.training.export import export

    extra = [*TINY_MAE, f"deepspeed.zero_stage={stage}"]
    run_dir = check_trains_and_resumes(
        tmp_path, phantom_cache, str(ROOT / "recipes" / "mae.yaml"), extra
    )
    figures = sorted((run_dir / "figures").glob("mae_reconstruction_step-*.png"))
    assert [p.name for p in figures] == [
        "mae_reconstruction_step-2.png",
        "mae_reconstruction_step-4.png",
    ]
    weights = load_file(export(run_dir) / "model.safetensors")
    decoder = [k for k in weights if ".decoder." in k]
    assert any(k.endswith("decoder.mask_token") for k in decoder), sorted(weights)[:20]
    assert any("decoder.blocks.0." in k for k in decoder)
