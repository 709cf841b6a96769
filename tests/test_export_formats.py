"""``vlp export --format open_clip|hf`` and the model card (issue 18, item 3).

A tiny CLIP recipe (timm ``resnet18`` at 64 px, the ``tiny`` HF text tower, linear heads
without bias: what open_clip can express) trains 2 steps once for the module; it is
exported in every format, and a separate process that cannot import vlp loads the
open_clip and hf folders by the code their model cards document (open_clip,
transformers, timm only). Its image and text embeddings must equal vlp's
``encode_image`` / ``encode_text`` (unit-normalised) to 1e-5. Nothing downloads: the
loaders run with the Hub offline.
"""

from __future__ import annotations

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
CLIP = str(ROOT / "recipes" / "clip.yaml")
DEBUG = str(ROOT / "recipes" / "debug.yaml")
#: a CLIP model open_clip can hold: linear heads without bias (its HF text projection has none).
EXPRESSIBLE = [
    *SMALL,
    "model.projection={kind: linear, bias: false}",
    "model.embed_dim=32",
    "model.local_dim=32",
    "optim.warmup_steps=0",
    "train.steps=2",
]
TEXTS = ["small left pleural effusion", "no acute cardiopulmonary process", "mild edema."]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# Runs in a fresh interpreter where importing vlp fails: the documented loading code of
# each model card, then a batch through the objects it made.
LOADER = r"""
import json, re, sys
from pathlib import Path


class NoVlp:
    def find_spec(self, name, path=None, target=None):
        if name == "vlp" or name.startswith("vlp."):
            raise ImportError("the loading side must not use vlp")


sys.meta_path.insert(0, NoVlp())
import PIL.Image, torch, torch.nn.functional as F

open_clip_dir, hf_dir, images, texts, out = sys.argv[1:]
images, texts = json.loads(images), json.loads(texts)
result = {}
for fmt, folder in (("open_clip", open_clip_dir), ("hf", hf_dir)):
    card = Path(folder, "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    scope = {"PIL": PIL}
    exec(code.replace("cxr.png", images[0]), scope)
    with torch.no_grad():
        if fmt == "open_clip":
            model, preprocess, tokenizer = scope["model"], scope["preprocess"], scope["tokenizer"]
            batch = torch.stack([preprocess(PIL.Image.open(p).convert("L")) for p in images])
            img = model.encode_image(batch, normalize=True)
            txt = model.encode_text(tokenizer(texts), normalize=True)
            scale = float(model.logit_scale.exp())
        else:
            s = scope
            batch = torch.stack([s["transform"](PIL.Image.open(p).convert("L")) for p in images])
            img = F.normalize(s["project"](s["image_model"](batch), "image"), dim=-1)
            grid = s["image_model"].forward_features(batch)  # as projections.json describes
            result["local"] = s["project"](grid.flatten(2).transpose(1, 2), "image_local").tolist()
            head = s["spec"]["heads"]["text"]
            tok = s["tokenizer"](texts, padding=True, truncation=True,
                                 max_length=head["max_length"], return_tensors="pt")
            states = s["text_model"](**tok).last_hidden_state
            pooled = s["pool"](states, tok["attention_mask"], head["pooling"])
            txt = F.normalize(s["project"](pooled, "text"), dim=-1)
            scale = s["spec"]["logit_scale"]
    result[fmt] = {
        "img": img.tolist(), "txt": txt.tolist(), "scale": scale,
        "documented": [scope["img"].tolist(), scope["txt"].tolist()],
    }
Path(out).write_text(json.dumps(result))
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The run, its three exports, vlp's embeddings, and what the loader process got."""
    from vlp.training.export import export, load_model

    tmp = tmp_path_factory.mktemp("export-formats")
    run_training(tmp, "clip", recipe=CLIP, overrides=EXPRESSIBLE, synthetic=4, cache=tmp / "cache")
    run = tmp / "clip"
    (run / "eval-zs").mkdir()
    (run / "eval-zs" / "results.md").write_text("| label | AUROC |\n|---|---|\n| edema | 0.61 |\n")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        folders = {fmt: export(run, fmt=fmt) for fmt in ("vlp", "open_clip", "hf")}
    rng = np.random.default_rng(0)
    images = []
    for index in range(3):
        path = tmp / f"cxr{index}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
        images.append(str(path))
    module, _ = load_model(folders["vlp"])
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p)))[None] for p in images])
    with torch.no_grad():
        vlp = {
            "img": F.normalize(module.model.encode_image(pixels)["image_global"], dim=-1),
            "local": module.model.encode_image(pixels)["image_local"],
            "txt": F.normalize(module.model.encode_text(TEXTS), dim=-1),
            "first": F.normalize(module.model.encode_text(["small left pleural effusion"]), dim=-1),
            "scale": float(module.objectives["clip"].logit_scale()),
        }
    script = tmp / "loader.py"
    script.write_text(LOADER)
    out = tmp / "loaded.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | OFFLINE
    proc = subprocess.run(
        [sys.executable, str(script), str(folders["open_clip"]), str(folders["hf"]),
         json.dumps(images), json.dumps(TEXTS), str(out)],
        cwd=tmp_path_factory.mktemp("elsewhere"), env=env | {"OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"run": run, "folders": folders, "vlp": vlp, "loaded": json.loads(out.read_text())}


@pytest.mark.parametrize("fmt", ["open_clip", "hf"])
def test_round_trip_embeddings_equal_vlp(trained, fmt):
    """open_clip (3-channel grayscale, its preprocess) and timm + transformers + the
    projection JSON give vlp's unit embeddings, and the same logit scale."""
    got, want = trained["loaded"][fmt], trained["vlp"]
    assert torch.allclose(torch.tensor(got["img"]), want["img"], atol=1e-5, rtol=0)
    assert torch.allclose(torch.tensor(got["txt"]), want["txt"], atol=1e-5, rtol=0)
    assert got["scale"] == pytest.approx(want["scale"], rel=1e-6)
    # The card's own snippet (one image, one text) gives the same.
    image, text = map(torch.tensor, got["documented"])
    assert torch.allclose(image, want["img"][:1], atol=1e-5, rtol=0)
    assert torch.allclose(text, want["first"], atol=1e-5, rtol=0)
    if fmt == "hf":  # the local head too, from timm's feature map
        local = torch.tensor(trained["loaded"]["local"])
        assert torch.allclose(local, want["local"], atol=1e-5, rtol=1e-5)


def test_open_clip_folder_uses_open_clips_formats(trained):
    """open_clip's config file and names: a timm tower, an HF tower in hf_text/, vlp's
    normalisation on each of 3 channels, the first conv spread over them."""
    from safetensors.torch import load_file

    folder = trained["folders"]["open_clip"]
    config = json.loads((folder / "open_clip_config.json").read_text())
    vision, text = config["model_cfg"]["vision_cfg"], config["model_cfg"]["text_cfg"]
    assert vision["timm_model_name"] == "resnet18" and vision["timm_proj"] == "linear"
    assert Path(text["hf_model_name"]) == (folder / "hf_text").resolve()
    assert (folder / "hf_text" / "config.json").is_file()
    assert text["hf_pooler_type"] == "cls_last_hidden_state_pooler"
    assert config["preprocess_cfg"]["mean"] == [0.5] * 3
    assert config["preprocess_cfg"]["std"] == [0.25] * 3
    state = load_file(str(folder / "open_clip_model.safetensors"))
    vlp = load_file(str(trained["folders"]["vlp"] / "model.safetensors"))
    conv = state["visual.trunk.conv1.weight"]
    assert conv.shape[1] == 3
    assert torch.allclose(
        conv.sum(1, keepdim=True), vlp["model.encoders.image.tower.model.conv1.weight"], atol=1e-6
    )
    assert state["logit_scale"].ndim == 0


def test_hf_folder_loads_with_timm_and_transformers_conventions(trained):
    folder = trained["folders"]["hf"]
    image = json.loads((folder / "image" / "config.json").read_text())
    assert image["architecture"] == "resnet18" and image["num_classes"] == 0
    assert image["pretrained_cfg"]["mean"] == [0.5] and image["pretrained_cfg"]["std"] == [0.25]
    assert image["pretrained_cfg"]["input_size"] == [1, 64, 64]
    assert (folder / "text" / "config.json").is_file()
    assert (folder / "text" / "tokenizer_config.json").is_file()
    spec = json.loads((folder / "projections.json").read_text())
    assert set(spec["heads"]) == {"image", "image_local", "text", "sentence"}
    assert spec["heads"]["text"]["pooling"] == "cls" and spec["similarity"] == "cosine"


@pytest.mark.parametrize("fmt", ["vlp", "open_clip", "hf"])
def test_every_export_writes_a_model_card(trained, fmt):
    card = (trained["folders"][fmt] / "README.md").read_text()
    assert card.startswith("# clip\n")
    assert "CLIP/ConVIRT global image-report contrastive loss" in card
    assert "| steps trained | 2 |" in card
    assert "phantom" in card and "resnet18" in card and "tiny" in card
    assert "### eval-zs" in card and "| edema | 0.61 |" in card  # RUN/eval*/results.md


def test_model_card_takes_explicit_results(trained, tmp_path):
    from vlp.training.export import export

    table = tmp_path / "probe" / "results.md"
    table.parent.mkdir()
    table.write_text("| probe | AP |\n|---|---|\n| mean | 0.42 |\n")
    out = export(trained["run"], out=tmp_path / "exp", evals=[str(table.parent)])
    card = (out / "README.md").read_text()
    assert "| mean | 0.42 |" in card and "eval-zs" not in card
    with pytest.raises(FileNotFoundError, match="no results.md"):
        export(trained["run"], out=tmp_path / "bad", evals=[str(tmp_path / "missing")])


# --------------------------------------------------------------------------- refusals


def _module(recipe: str, overrides: list[str]):
    from vlp.config import load_recipe
    from vlp.training.module import build_pretraining_module

    small = [s for s in SMALL if not s.startswith("data.phantom")]  # nothing is read
    cfg = load_recipe(recipe, [*small, *overrides])
    return build_pretraining_module(cfg.model, cfg.objectives, cfg.data.image_size).eval(), cfg


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    """A run directory of the debug recipe's local-MI model (stage-0 checkpoint layout)."""
    from vlp.config.loader import dump_yaml

    module, cfg = _module(DEBUG, [])
    run = tmp_path_factory.mktemp("debug-run")
    dump_yaml(cfg, run / "config.yaml")
    (run / "step-3").mkdir()
    torch.save({"module": module.state_dict()}, run / "step-3" / "mp_rank_00_model_states.pt")
    (run / "step-3" / "COMPLETE").write_text("")
    return run


def test_cli_refuses_a_local_mi_model_in_one_line(debug_run, capsys):
    from vlp.cli import main

    assert main(["export", str(debug_run), "--format", "open_clip"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("vlp export: error: cannot export to open_clip: ")
    assert "objective 'local_mi' is not clip" in lines[0] and "MI critic" in lines[0]
    assert "no bias" in lines[0]  # the debug recipe's linear heads carry biases
    assert not (debug_run / "export-open_clip").exists()


def test_hf_format_holds_a_local_mi_model_without_its_critic(debug_run):
    from vlp.training.export import export

    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        out = export(debug_run, fmt="hf")
    spec = json.loads((out / "projections.json").read_text())
    assert spec["similarity"] is None and "critics" in spec["note"]
    assert spec["heads"]["image"]["layers"][0]["bias"] == "image.0.bias"
    assert "| steps trained | 3 |" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["model.encoders.image.tower.name=liao_resnet256_5", "data.image_size=128"], "Liao"),
        (["model.global_head=mean_local"], "global_head 'mean_local'"),
        (["model.text_head=attention_pool"], "text_head 'attention_pool'"),
        (["model.projection={kind: mlp, bias: false}"], "projection mlp"),
        (["model.projection={kind: linear, bias: true}"], "has no bias"),
        (["model.encoders.text.tower.pooling=last"], "text pooling 'last'"),
    ],
    ids=["liao", "mean_local", "attention_pool", "mlp", "linear_bias", "last_pooling"],
)
def test_open_clip_refuses_what_it_cannot_express(overrides, reason):
    from vlp.training.formats import NotExpressible, open_clip_config

    base = [o for o in EXPRESSIBLE if o not in overrides and not o.startswith("data.phantom")]
    module, cfg = _module(CLIP, [*base, *overrides])
    with pytest.raises(NotExpressible) as err:
        open_clip_config(module, cfg, "unused")
    assert "\n" not in str(err.value) and reason in str(err.value), str(err.value)


def test_open_clip_refuses_a_vit_away_from_timms_default_size(tmp_path):
    """open_clip builds timm models at their default input size: a ViT trained at 64 px
    has another position embedding, found when the weights are mapped."""
    from vlp.training.formats import NotExpressible, write_open_clip

    vit = ["model.encoders.image.tower.name=vit_tiny_patch16_224"]
    module, cfg = _module(CLIP, [*EXPRESSIBLE, *vit])
    with pytest.raises(NotExpressible, match="pos_embed is .* passes no img_size"):
        write_open_clip(module, cfg, tmp_path / "vit")
    assert not (tmp_path / "vit").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.encoders.text.tower.pooling=mean"],
        [
            "model.projection={kind: identity}",
            "model.encoders.text.tower.params={hidden_size: 512, num_heads: 4, num_layers: 1}",
        ],
    ],
    ids=["mean_pooling", "identity_heads"],
)
def test_other_expressible_shapes_round_trip(overrides, tmp_path, monkeypatch):
    """Mean pooling and identity heads (timm_proj none, hf_proj_type null) load back
    through open_clip with vlp's embeddings (untrained weights: the mapping is the same)."""
    import open_clip

    from vlp.training.formats import write_open_clip

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    module, cfg = _module(CLIP, [*EXPRESSIBLE, *overrides])  # later overrides win
    write_open_clip(module, cfg, tmp_path / "oc")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    rgb = ((images.float() / 255 - 0.5) / 0.25).repeat(1, 3, 1, 1)
    with torch.no_grad():
        got_image = model.eval().encode_image(rgb, normalize=True)
        got_text = model.encode_text(tokenizer(TEXTS), normalize=True)
        want_image = F.normalize(module.model.encode_image(images)["image_global"], dim=-1)
        want_text = F.normalize(module.model.encode_text(TEXTS), dim=-1)
    assert torch.allclose(got_image, want_image, atol=1e-5, rtol=0)
    assert torch.allclose(got_text, want_text, atol=1e-5, rtol=0)
