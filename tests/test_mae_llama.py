"""MAE + LLaMA attention pooling (recipes/mae_llama.yaml): the attention-pooling head, the
causal LM's last-token pooling, the label-aware margin loss, the frozen text side, the warm
start from an MAE export, and training with resume under ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.training import SMALL, check_trains_and_resumes, run_training
from tests.test_mae import TINY_MAE
from vlp.models.heads import AttentionPool, AttentionPoolConfig, HeadConfig
from vlp.models.text import last_token
from vlp.objectives.contrastive import LabelMarginConfig, LabelMarginObjective

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "mae_llama.yaml")
TINY_MAE_LLAMA = [
    *TINY_MAE,
    "model.encoders.text.tower.name=tiny_llama",
    "model.local_dim=64",
    "model.embed_dim=32",
    "model.attention_pool={queries: 2, heads: 4}",
]


def test_last_token_pooling_finds_the_last_real_token_whatever_the_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    expected = []
    for row in mask.tolist():  # a loop: the highest index whose mask is 1
        real = [i for i, m in enumerate(row) if m]
        expected.append(real[-1] if real else 0)
    assert last_token(mask).tolist() == expected == [2, 4, 4, 0]


def _pool(queries=1, heads=1, dim=8, out=6) -> AttentionPool:
    torch.manual_seed(0)
    return AttentionPool(
        dim, dim, out, HeadConfig(kind="linear"), "test", AttentionPoolConfig(queries, heads)
    ).eval()


def test_attention_pool_is_softmax_attention_of_a_learned_query_over_the_real_tokens():
    pool = _pool()
    tokens = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    got = pool(None, tokens, mask)
    # By hand: MultiheadAttention's projections with one head, padded keys left out.
    wq, wk, wv = pool.attention.in_proj_weight.chunk(3)
    bq, bk, bv = pool.attention.in_proj_bias.chunk(3)
    rows = []
    for b in range(2):
        x = F.layer_norm(tokens[b][mask[b]], (8,), pool.norm.weight, pool.norm.bias)
        q = pool.query[0] @ wq.T + bq
        k, v = x @ wk.T + bk, x @ wv.T + bv
        weights = torch.softmax(k @ q / math.sqrt(8), dim=0)
        attended = pool.attention.out_proj(weights @ v)
        rows.append(pool.head(attended))
    assert torch.allclose(got, torch.stack(rows), atol=1e-5)
    assert got.shape == (2, 6)


def test_attention_pool_ignores_padding_and_survives_an_empty_text():
    pool = _pool(queries=3, heads=2)
    tokens = torch.randn(1, 4, 8)
    short = pool(None, tokens[:, :2], torch.ones(1, 2, dtype=torch.bool))
    padded = torch.cat([tokens[:, :2], 100 * torch.randn(1, 2, 8)], dim=1)
    mask = torch.tensor([[True, True, False, False]])
    assert torch.allclose(pool(None, padded, mask), short, atol=1e-5)
    empty = pool(None, tokens, torch.zeros(1, 4, dtype=torch.bool))
    assert torch.isfinite(empty).all()
    assert pool.attention_weights(padded, mask)[0, :, 2:].abs().max() == 0


def _margin_loop(image, text, labels, margin, uncertain):
    """The margin loss by a double loop over image–report pairs."""
    sets = [
        tuple(int(v == 1 or (uncertain == "positive" and v == -1)) for v in row)
        for row in labels.tolist()
    ]
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    total = 0.0
    for i in range(len(image)):
        for j in range(len(text)):
            d = float((image[i] - text[j]).norm())
            total += d * d if sets[i] == sets[j] else max(0.0, margin - d) ** 2
    return total / (len(image) * len(text))


@pytest.mark.parametrize("uncertain", ["negative", "positive"])
def test_label_margin_loss_matches_a_loop(uncertain):
    torch.manual_seed(1)
    labels = torch.tensor(
        [[1.0, 0.0, float("nan")], [1.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    )
    image, text = torch.randn(4, 5), torch.randn(4, 5)
    objective = LabelMarginObjective(LabelMarginConfig(margin=1.2, uncertain=uncertain), None)
    out = objective({"image_global": image, "report": text}, {"labels": labels[:, None]})
    expected = _margin_loop(image, text, labels, 1.2, uncertain)
    assert float(out.losses["margin"]) == pytest.approx(expected, rel=1e-5)


def test_label_margin_loss_is_zero_when_the_margins_hold():
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # Same labels: the same point; other labels: opposite points (distance 2 > margin 1).
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    objective = LabelMarginObjective(LabelMarginConfig(margin=1.0), None)
    out = objective({"image_global": image, "report": image.clone()}, {"labels": labels})
    assert float(out.losses["margin"]) == pytest.approx(0.0, abs=1e-10)


def _module(overrides):
    from vlp.config import load_recipe
    from vlp.training.module import build_pretraining_module

    cfg = load_recipe(RECIPE, [*SMALL, *overrides])
    return cfg, build_pretraining_module(cfg.model, cfg.objectives, cfg.data.image_size)


def test_the_frozen_lm_gets_no_gradient_and_no_optimiser_state():
    from vlp.data.batch import batch_from_images
    from vlp.training import optim
    from vlp.training.module import param_groups_of

    cfg, module = _module(TINY_MAE_LLAMA)
    groups = optim.param_groups(param_groups_of(module), cfg.optim)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    text = list(module.model.encoders["text"].parameters())
    assert text and not any(id(p) in in_optimizer for p in text)
    assert all(not p.requires_grad for p in text)
    tokenizer = module.model.tokenizer
    tokens = tokenizer(
        ["left effusion", "no acute findings here at all"], padding=True, return_tensors="pt"
    )
    images = torch.randint(0, 255, (2, 1, 32, 32), dtype=torch.uint8)
    batch = batch_from_images(
        {"frontal": images},
        report_input_ids=tokens["input_ids"],
        report_attention_mask=tokens["attention_mask"],
    )
    module.train()
    loss, _ = module(batch)
    loss.backward()
    assert all(p.grad is None for p in text)
    image_grads = [p.grad for p in module.model.encoders["image"].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in image_grads)
    pool = module.model.heads["report"]
    assert pool.query.grad is not None and pool.query.grad.abs().sum() > 0


def test_warm_start_copies_the_selected_tensors_and_refuses_a_mismatch(tmp_path):
    from safetensors.torch import save_file

    from vlp.training.export import warm_start

    _, source = _module(TINY_MAE_LLAMA)
    torch.manual_seed(123)
    for p in source.parameters():
        p.data.normal_()
    folder = tmp_path / "export"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, folder / "model.safetensors"
    )
    _, target = _module(TINY_MAE_LLAMA)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    loaded = warm_start(target, tmp_path, ["model.encoders.image"])
    after, saved = target.state_dict(), source.state_dict()
    image_keys = [k for k in after if k.startswith("model.encoders.image.")]
    assert loaded == len(image_keys) > 0
    for key, value in after.items():
        expected = saved[key] if key in image_keys else before[key]
        assert torch.equal(value, expected), key
    _, other = _module([*TINY_MAE_LLAMA, "model.local_dim=48"])
    with pytest.raises(ValueError, match="other shapes"):
        warm_start(other, folder, ["model.heads"])
    with pytest.raises(ValueError, match="no tensor in common"):
        warm_start(target, folder, ["model.encoders.nothing_here"])
    partial = {k: v.contiguous() for k, v in source.state_dict().items() if k != image_keys[0]}
    save_file(partial, folder / "model.safetensors")
    with pytest.raises(ValueError, match="not in the export"):
        warm_start(target, folder, ["model.encoders.image"])


def test_init_from_a_missing_export_is_one_line_before_any_process_group(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlp.cli",
            "pretrain",
            RECIPE,
            "--set",
            f"train.init_from={tmp_path / 'no-such-run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "train.init_from" in result.stderr and "Traceback" not in result.stderr
    assert "process group" not in result.stderr.lower()


@pytest.mark.parametrize("stage", [2, 3])
def test_mae_llama_trains_and_resumes_exactly(tmp_path, phantom_cache, stage):
    """Both ZeRO stages; under ZeRO-3 the optimiser's fp32 partitions hold exactly the
    trainable (non-text) parameters and the frozen LM sits apart as frozen parameters."""
    run_dir = check_trains_and_resumes(
        tmp_path, phantom_cache, RECIPE, [*TINY_MAE_LLAMA, f"deepspeed.zero_stage={stage}"]
    )
    if stage != 3:
        return
    _, module = _module(TINY_MAE_LLAMA)
    trainable = sum(
        p.numel() for n, p in module.named_parameters() if not n.startswith("model.encoders.text")
    )
    step = sorted(run_dir.glob("step-*"))[-1]
    optim_state = torch.load(
        next(step.glob("*optim_states.pt")), map_location="cpu", weights_only=False
    )
    assert (
        sum(t.numel() for t in optim_state["optimizer_state_dict"]["fp32_flat_groups"]) == trainable
    )
    model_state = torch.load(
        next(step.glob("*model_states.pt")), map_location="cpu", weights_only=False
    )
    frozen = set(model_state["frozen_param_shapes"])
    text = {n for n, _ in module.named_parameters() if n.startswith("model.encoders.text")}
    assert frozen == text


def test_mae_llama_warm_starts_from_an_mae_run(tmp_path, phantom_cache):
    """An MAE run's export initialises mae_llama's image encoder (step 0 equals it)."""
    from safetensors.torch import load_file

    from vlp.training.export import export

    run_training(
        tmp_path,
        "mae",
        cache=phantom_cache,
        recipe=str(ROOT / "recipes" / "mae.yaml"),
        overrides=[*SMALL, *TINY_MAE, "train.steps=2"],
    )
    mae_export = export(tmp_path / "mae")
    # The image encoder frozen (learning rate 0): after a step it still equals the export
    # only if the warm start loaded it; a fresh initialisation would differ.
    overrides = [
        *SMALL,
        *TINY_MAE_LLAMA,
        "train.steps=1",
        f"train.init_from={mae_export}",
        "optim.group_lr={image: 0.0, text: 0.0}",
    ]
    run_training(tmp_path, "aligned", cache=phantom_cache, recipe=RECIPE, overrides=overrides)
    before = load_file(mae_export / "model.safetensors")
    after = load_file(export(tmp_path / "aligned") / "model.safetensors")
    image = [k for k in before if k.startswith("model.encoders.image.tower.")]
    assert image and all(torch.equal(before[k], after[k]) for k in image)
