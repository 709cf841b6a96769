"""``vlp zero-shot``: typed prompts against image files, softmax and heatmaps (issue 18)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.helpers.training import SMALL, run_training

ROOT = Path(__file__).resolve().parents[1]
REAL_CXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-cxr"
PROMPTS = ["pleural effusion", "no pleural effusion", "normal chest radiograph"]


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory, phantom_cache):
    """A CLIP model trained 2 steps on the small phantom, exported; and phantom images."""
    from vlp.config import load_recipe
    from vlp.data.phantom_cache import phantom_shards
    from vlp.training.export import export

    tmp = tmp_path_factory.mktemp("zero-shot")
    recipe = str(ROOT / "recipes" / "clip.yaml")
    overrides = [*SMALL, "model.embed_dim=32", "model.local_dim=32", "train.steps=2"]
    run_training(tmp, "clip", recipe=recipe, overrides=overrides, cache=phantom_cache)
    cfg = load_recipe(recipe, overrides)
    raw = phantom_shards(cfg.data.phantom, cfg.data.priors, root=phantom_cache) / "phantom"
    images = sorted(glob.glob(str(raw / "files" / "*" / "*" / "*" / "*.jpg")))[:2]
    return export(tmp / "clip"), images, tmp


def _by_hand(path: str, size: int) -> torch.Tensor:
    """The evaluation geometry written out: grayscale, centred square crop, resize."""
    gray = np.asarray(Image.open(path).convert("L"))
    h, w = gray.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(gray[top : top + side, left : left + side])
    return torch.from_numpy(np.array(crop.resize((size, size), Image.Resampling.BILINEAR)))


def test_scores_and_softmax_match_the_cosine_computed_by_hand(clip_export):
    from vlp.evaluation.prompting import load_image, score_images
    from vlp.training.export import load_model

    exported, images, tmp = clip_export
    module, _ = load_model(exported)
    results = score_images(module, images, prompts=PROMPTS)

    model = module.model
    size = model.image_size
    for i, path in enumerate(images):
        # An even margin puts the centred box on whole pixels, where a crop can match it.
        gray = np.asarray(Image.open(path).convert("L"))
        h, w = gray.shape
        even = gray[: h - (abs(h - w) % 2)] if h > w else gray[:, : w - (abs(h - w) % 2)]
        png = tmp / f"even{i}.png"
        Image.fromarray(even).save(png)
        diff = (load_image(png, size)[0].int() - _by_hand(png, size).int()).abs()
        # A resize inside a box may read the pixels just outside it; a crop cannot.
        assert int(diff[2:-2, 2:-2].max()) <= 1
    with torch.no_grad():
        pixels = torch.stack([load_image(p, size) for p in images])  # geometry checked above
        image = F.normalize(model.encode_image(pixels)["image_global"], dim=-1)
        text = F.normalize(model.encode_text(PROMPTS, "report"), dim=-1)
        cosine = image @ text.T
        scale = float(module.objectives["clip"].logit_scale())
    for b, entry in enumerate(results):
        got = torch.tensor([entry["scores"][p] for p in PROMPTS])
        assert torch.allclose(got, cosine[b], atol=2e-3), (got, cosine[b])
        probs = torch.tensor([entry["groups"]["prompts"][p] for p in PROMPTS])
        assert torch.allclose(probs, (scale * cosine[b]).softmax(-1), atol=2e-3)
        assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)


def test_a_prompt_yaml_gives_a_softmax_per_class(clip_export, tmp_path):
    from vlp.evaluation.prompting import score_images
    from vlp.training.export import load_model

    exported, images, _ = clip_export
    prompt_file = tmp_path / "prompts.yaml"
    prompt_file.write_text(
        "classes:\n"
        "  Pleural Effusion:\n"
        "    positive: [pleural effusion, fluid in the pleural space]\n"
        "    negative: [no pleural effusion]\n"
    )
    module, _ = load_model(exported)
    (entry,) = score_images(module, images[:1], prompt_file=str(prompt_file))
    probs = entry["groups"]["Pleural Effusion"]
    assert set(probs) == {"positive: Pleural Effusion", "negative: Pleural Effusion"}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert len(entry["scores"]) == 3


def test_cli_prints_writes_json_and_heatmaps(clip_export, tmp_path):
    exported, images, _ = clip_export
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "zs.json"
    heat = tmp_path / "heat"
    command = [sys.executable, str(ROOT / "tools" / "zero_shot.py"), "--checkpoint", str(exported)]
    command += ["--image", *images, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
    command += ["--heatmap", str(heat), "--json", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| pleural effusion |" in proc.stdout and "softmax over" in proc.stdout
    results = json.loads(out.read_text())
    assert [r["image"] for r in results] == images
    pngs = sorted(heat.glob("*.png"))
    assert len(pngs) == len(images) * 2
    for png in pngs:
        with Image.open(png) as im:
            assert im.size[0] > 100 and im.size[1] > 100


def test_bad_inputs_are_one_line(clip_export, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    exported, _, _ = clip_export
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    for extra, message in (
        (["--image", str(broken), "--prompt", "x"], "broken.png: cannot read the image"),
        (["--image", str(broken)], "at least one --prompt"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "vlp.cli", "zero-shot", "--checkpoint", str(exported), *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode != 0
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.skipif(not REAL_CXR.is_dir(), reason=f"real radiographs not found at {REAL_CXR}")
def test_real_radiographs_are_scored(clip_export):
    from vlp.evaluation.prompting import score_images
    from vlp.training.export import load_model

    exported, _, _ = clip_export
    module, _ = load_model(exported)
    paths = sorted(str(p) for p in REAL_CXR.glob("*.png"))
    results = score_images(module, paths, prompts=PROMPTS)
    assert len(results) == len(paths)
    for entry in results:
        assert all(np.isfinite(v) for v in entry["scores"].values())


def test_a_dicom_scores_as_the_same_picture_in_png(clip_export, tmp_path):
    """An 8-bit MONOCHROME1 DICOM of a phantom image (inverted storage) is read back to
    the picture the PNG holds, so both score the same."""
    from tests.test_dicom import dataset, save
    from vlp.evaluation.prompting import score_images
    from vlp.training.export import load_model

    exported, images, _ = clip_export
    gray = np.array(Image.open(images[0]).convert("L"))
    gray[0, 0], gray[0, 1] = 0, 255  # full range: the min–max display mapping is the identity
    png = tmp_path / "a.png"
    Image.fromarray(gray).save(png)
    dcm = save(
        dataset(255 - gray, bits_stored=8, photometric="MONOCHROME1"), str(tmp_path / "a.dcm")
    )
    module, _ = load_model(exported)
    from_png, from_dcm = score_images(module, [str(png), dcm], prompts=PROMPTS)
    for prompt in PROMPTS:
        assert from_dcm["scores"][prompt] == pytest.approx(from_png["scores"][prompt], abs=1e-5)
