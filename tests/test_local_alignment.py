"""BioViL-L's local word ↔ region alignment (``vlp.objectives.local_alignment``).

Independent references: the scores against a loop that materialises every attended
context vector; the loss against cross-entropies written out by hand; the word features
against the tokenizer's special ids; training against an uninterrupted run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers.training import SMALL, check_trains_and_resumes
from vlp.config import ConfigError, load_recipe
from vlp.models.model import FeatureDims
from vlp.objectives.base import ObjectiveSpec, build_objective
from vlp.objectives.local_alignment import region_word_scores

ROOT = Path(__file__).resolve().parents[1]


def _loop_scores(words, mask, regions, g1, g2):
    out = torch.zeros(words.shape[0], regions.shape[0], dtype=torch.float64)
    for i in range(words.shape[0]):
        for j in range(regions.shape[0]):
            total = 0.0
            for word, real in zip(words[i].double(), mask[i]):
                if not real:
                    continue
                w = word / word.norm()
                c = regions[j].double() / regions[j].double().norm(dim=-1, keepdim=True)
                a = torch.softmax(g1 * (c @ w), 0)
                v = (a[:, None] * c).sum(0)  # the attended context
                total += math.exp(g2 * float(w @ v / v.norm()))
            out[i, j] = math.log(total) / g2 if total else -math.inf
    return out


def test_scores_match_a_loop_over_attended_contexts():
    g = torch.Generator().manual_seed(0)
    words = torch.randn(3, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]], dtype=torch.bool)
    regions = torch.randn(4, 6, 8, generator=g)
    got = region_word_scores(words, mask, regions, 4.0, 5.0)
    want = _loop_scores(words, mask, regions, 4.0, 5.0)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_loss_is_the_two_way_cross_entropy_and_skips_reports_without_words():
    objective = build_objective(
        ObjectiveSpec("local_alignment", 1.0, {"logit_scale": 3.0}), FeatureDims(8, 8, 8)
    )
    g = torch.Generator().manual_seed(1)
    words = torch.randn(4, 5, 8, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2] = False  # a report with no word: not a query, its image still a negative
    regions = torch.randn(4, 6, 8, generator=g)
    features = {"image_local": regions, "report_words": words, "report_word_mask": mask}
    loss = objective(features, {}).losses["local"]
    scores = _loop_scores(words, mask, regions, 4.0, 5.0)
    queries = [0, 1, 3]
    by_report, by_image = [], []
    for q, i in enumerate(queries):
        row = 3.0 * scores[i]  # report i against every image
        by_report.append(-(row[i] - torch.logsumexp(row, 0)))
        column = 3.0 * scores[queries, i]  # image i against the reports that are queries
        by_image.append(-(column[q] - torch.logsumexp(column, 0)))
    want = (torch.stack(by_report).mean() + torch.stack(by_image).mean()) / 2
    assert float(loss) == pytest.approx(float(want), abs=1e-5)
    # Aligned words and regions (each word equal to a region of its own image) score a
    # lower loss than the same words shuffled across reports.
    aligned = {
        "image_local": regions,
        "report_words": regions[:, :5],
        "report_word_mask": torch.ones(4, 5, dtype=torch.bool),
    }
    shuffled = dict(aligned, report_words=regions[[1, 2, 3, 0], :5])
    assert objective(aligned, {}).losses["local"] < objective(shuffled, {}).losses["local"]


def test_the_model_gives_projected_words_without_special_tokens():
    from vlp.training.module import build_pretraining_module

    cfg = load_recipe(
        ROOT / "recipes" / "biovil_l.yaml",
        [
            "model.encoders.image.tower.name=resnet18",
            "model.encoders.text.tower.name=tiny",
            "data.image_size=64",
        ],
    )
    module = build_pretraining_module(cfg.model, cfg.objectives, 64).eval()
    text = module.model.text
    tokens = text.tokenize(["small left effusion", "no pneumothorax seen today"])
    batch = {f"report_{k}": v for k, v in tokens.items()}
    with torch.no_grad():
        features = module.model.encode(batch, {"report_words"})
    assert "report" not in features  # only what was asked for
    assert features["report_words"].shape == (*tokens["input_ids"].shape, 128)
    special = set(text.tokenizer.all_special_ids)
    want = [
        [m == 1 and t not in special for t, m in zip(ids, mask)]
        for ids, mask in zip(tokens["input_ids"].tolist(), tokens["attention_mask"].tolist())
    ]
    assert features["report_word_mask"].tolist() == want
    assert sum(want[0]) >= 3 and not want[0][0]  # [CLS] is not a word


def test_local_alignment_without_a_word_head_fails_at_load(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"extends: {ROOT / 'recipes' / 'biovil_l.yaml'}\nmodel: {{word_dim: null}}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert (
        "objectives[1]: objective 'local_alignment' needs the feature(s) ['report_word_mask', 'report_words']"
        in message
    )


def _loop_maps(words, mask, regions, g1, g2):
    """Per text t on image t: each real word's attention over regions, weighted over the
    words by softmax(g2 * cos(word, attended context)), word by word (float64)."""
    maps = []
    for t in range(words.shape[0]):
        c = regions[t].double() / regions[t].double().norm(dim=-1, keepdim=True)
        attentions, agreements = [], []
        for word, real in zip(words[t].double(), mask[t]):
            if not real:
                continue
            w = word / word.norm()
            a = torch.softmax(g1 * (c @ w), 0)
            v = (a[:, None] * c).sum(0)
            attentions.append(a)
            agreements.append(g2 * float(w @ v / v.norm()))
        if not attentions:
            maps.append(torch.full((regions.shape[1],), 1 / regions.shape[1], dtype=torch.float64))
            continue
        weights = torch.softmax(torch.tensor(agreements, dtype=torch.float64), 0)
        maps.append(sum(wt * a for wt, a in zip(weights, attentions)))
    return torch.stack(maps)


def test_word_scorer_scores_and_maps_match_loops():
    """The objective's scorer (zero-shot, grounding): its image-text score is R(text, image)
    of the loss; its region map is the word attention weighted as the smooth maximum
    weighs the words; word features arrive zero-padded (``encode_text(kind="words")``)."""
    from vlp.objectives.scoring import WordRegionScorer

    objective = build_objective(ObjectiveSpec("local_alignment", 1.0, {}), FeatureDims(8, 8, 8))
    scorer = objective.scorer()
    assert isinstance(scorer, WordRegionScorer) and scorer.has_regions
    assert scorer.text_kind == "words" and scorer.logit_scale == 10.0
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    words = torch.randn(3, 5, 8, generator=g) * mask[..., None]  # padding is a zero vector
    regions = torch.randn(4, 6, 8, generator=g)
    got = scorer.scores({"image_local": regions}, words[:2])
    torch.testing.assert_close(
        got.double(), _loop_scores(words[:2], mask[:2], regions, 4.0, 5.0).T, atol=1e-5, rtol=1e-5
    )
    index = torch.tensor([3, 0, 1])
    maps = scorer.region_scores({"image_local": regions}, words, index)
    want = _loop_maps(words, mask, regions[index], 4.0, 5.0)
    torch.testing.assert_close(maps.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps.sum(1).double(), torch.ones(3, dtype=torch.float64))
    # A word that points at one region of its image draws the map to that region.
    pointed = torch.zeros(1, 5, 8)
    pointed[0, 0] = regions[0, 4]
    assert int(scorer.region_scores({"image_local": regions}, pointed, index[1:2]).argmax()) == 4


def test_raw_text_words_equal_the_forwards_and_pad_across_chunks():
    from vlp.evaluation.features import text_embeddings
    from vlp.training.module import build_pretraining_module

    overrides = [
        "model.encoders.image.tower.name=resnet18",
        "model.encoders.text.tower.name=tiny",
        "data.image_size=64",
    ]
    cfg = load_recipe(ROOT / "recipes" / "biovil_l.yaml", overrides)
    module = build_pretraining_module(cfg.model, cfg.objectives, 64).eval()
    texts = ["small left effusion", "no pneumothorax is seen on this radiograph today"]
    tokens = module.model.text.tokenize(texts)
    batch = {f"report_{k}": v for k, v in tokens.items()}
    with torch.no_grad():
        features = module.model.encode(batch, {"report_words"})
        got = module.model.encode_text(texts, kind="words")
        chunked = text_embeddings(module, texts, "words", batch_size=1)
    want = features["report_words"] * features["report_word_mask"][..., None]
    torch.testing.assert_close(got, want)
    # One text per chunk: each chunk is tokenised to its own length, then padded.
    assert chunked.shape == got.shape
    torch.testing.assert_close(chunked, got, atol=1e-5, rtol=1e-5)
    plain = load_recipe(ROOT / "recipes" / "biovil.yaml", overrides)
    without = build_pretraining_module(plain.model, plain.objectives, 64).model
    with pytest.raises(ValueError, match="no word features"):
        without.encode_text(texts, kind="words")


def test_biovil_l_trains_under_deepspeed_and_resumes_exactly(tmp_path, phantom_cache):
    """Also: the trained run grounds phrases with its word-region attention when the
    grounding evaluator is pointed at the local objective, and with the global cosine
    (BioViL's map) by default."""
    from vlp.evaluation import run_evaluator
    from vlp.training.export import export

    recipe = str(ROOT / "recipes" / "biovil_l.yaml")
    run_dir = check_trains_and_resumes(tmp_path, phantom_cache, recipe)
    exported = export(run_dir)
    shards = _small_phantom_shards(phantom_cache, recipe)
    words = run_evaluator(
        "grounding",
        exported,
        shards / "test",
        tmp_path / "words",
        objective="local_alignment",
        bootstrap=20,
    )
    assert words["similarity"].startswith("word-region attention")
    assert math.isfinite(words["mean_cnr"]["value"]), words
    default = run_evaluator("grounding", exported, shards / "test", tmp_path / "cos", bootstrap=20)
    assert default["similarity"].startswith("cosine")
    assert default["mean_cnr"]["value"] != words["mean_cnr"]["value"]
    with pytest.raises(ValueError, match="retrieval ranks report or sentence"):
        run_evaluator(
            "retrieval", exported, shards / "test", tmp_path / "r", objective="local_alignment"
        )


def _small_phantom_shards(cache: Path, recipe: str) -> Path:
    """The shards of the phantom that SMALL names (the training tests build it)."""
    from vlp.data.phantom_cache import phantom_shards

    cfg = load_recipe(recipe, SMALL)
    return phantom_shards(cfg.data.phantom, cfg.data.priors, root=cache) / "shards"


# ---------------------------------------------------------------- Med-ST's weighted variant


@torch.no_grad()
def _loop_weighted_direction(queries, qmask, keys, kmask, weighting, tau):
    """One direction of Med-ST's token loss for one sample, token by token (float64)."""
    q = [queries[i].double() / queries[i].double().norm() for i in range(len(qmask)) if qmask[i]]
    k = [keys[j].double() / keys[j].double().norm() for j in range(len(kmask)) if kmask[j]]
    contexts = []
    for word in q:
        a = torch.softmax(torch.stack([word @ key / tau for key in k]), 0)
        c = sum(w * key for w, key in zip(a, k))
        contexts.append(c / c.norm())
    a = [(word * c) / (word * c).norm() for word, c in zip(q, contexts)]
    mean = sum(a) / len(a)
    # nn.MultiheadAttention's attention of one query: in-projections, scaled dot products.
    w_q, w_k, _ = weighting.in_proj_weight.double().chunk(3)
    b_q, b_k, _ = weighting.in_proj_bias.double().chunk(3)
    query = w_q @ mean + b_q
    scores = torch.stack([(query @ (w_k @ x + b_k)) / math.sqrt(len(query)) for x in a])
    weights = torch.softmax(scores, 0)
    total = 0.0
    for n, word in enumerate(q):
        row = torch.stack([word @ c / tau for c in contexts])
        column = torch.stack([other @ contexts[n] / tau for other in q])
        ce_row = torch.logsumexp(row, 0) - row[n]
        ce_column = torch.logsumexp(column, 0) - column[n]
        total += float(weights[n]) * float(ce_row + ce_column) / 2
    return total


def _weighted_features(g, absent_lateral=(2,)):
    from vlp.models.encoders import TokenSegment

    words = torch.randn(3, 5, 8, generator=g)
    word_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    patches = torch.randn(3, 6, 8, generator=g)  # 4 frontal + 2 lateral tokens
    layout = (TokenSegment("frontal", 0, 0, (2, 2)), TokenSegment("lateral", 0, 4, (1, 2)))
    lateral = torch.tensor([[i not in absent_lateral] for i in range(3)])
    batch = {
        "keys": ["a", "b", "c"],
        "view_mask": {"frontal": torch.ones(3, 1, dtype=torch.bool), "lateral": lateral},
    }
    features = {
        "image_local": patches,
        "image_layout": layout,
        "report_words": words,
        "report_word_mask": word_mask,
    }
    return features, batch


def test_weighted_local_alignment_matches_a_token_by_token_loop():
    objective = build_objective(
        ObjectiveSpec("weighted_local_alignment", 1.0, {}), FeatureDims(8, 8, 8)
    )
    features, batch = _weighted_features(torch.Generator().manual_seed(2))
    out = objective(features, batch)
    words, wmask = features["report_words"], features["report_word_mask"]
    patches = features["image_local"]
    total = 0.0
    for i in range(3):
        pmask = torch.ones(6, dtype=torch.bool)
        if i == 2:
            pmask[4:] = False  # sample 2 has no lateral: its lateral patches are left out
        word = _loop_weighted_direction(
            words[i], wmask[i], patches[i], pmask, objective.word_weighting, 0.1
        )
        patch = _loop_weighted_direction(
            patches[i], pmask, words[i], wmask[i], objective.patch_weighting, 0.1
        )
        total += (word + patch) / 2
    assert out.losses["local"].item() == pytest.approx(total / 3, abs=1e-5)
    # Gradients are finite despite padded words and absent views, and reach the weighting.
    out.losses["local"].backward()
    grad = objective.word_weighting.in_proj_weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@torch.no_grad()
def test_weighted_local_alignment_leaves_absent_views_out_and_rewards_alignment():
    objective = build_objective(
        ObjectiveSpec("weighted_local_alignment", 1.0, {}), FeatureDims(8, 8, 8)
    )
    features, batch = _weighted_features(torch.Generator().manual_seed(3))
    loss = float(objective(features, batch).losses["local"])
    # Whatever an absent lateral's tokens hold, the loss is the same.
    noisy = dict(features, image_local=features["image_local"].clone())
    noisy["image_local"][2, 4:] = 100.0
    assert float(objective(noisy, batch).losses["local"]) == pytest.approx(loss, abs=1e-6)
    # ... unless the recipe follows MedST's code and keeps them.
    keeping = build_objective(
        ObjectiveSpec("weighted_local_alignment", 1.0, {"mask_absent_views": False}),
        FeatureDims(8, 8, 8),
    )
    keeping.load_state_dict(objective.state_dict())
    assert float(keeping(noisy, batch).losses["local"]) != pytest.approx(loss, abs=1e-3)
    # Words that are copies of distinct patches of their own image pair better than
    # words that all look alike.
    patches = features["image_local"]
    aligned = dict(
        features, report_words=patches[:, :5], report_word_mask=torch.ones(3, 5, dtype=torch.bool)
    )
    alike = dict(aligned, report_words=patches[:, :1].expand(-1, 5, -1) + 0.01 * patches[:, :5])
    assert objective(aligned, batch).losses["local"] < objective(alike, batch).losses["local"]
