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

from tests.helpers.training import check_trains_and_resumes
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


def test_biovil_l_trains_under_deepspeed_and_resumes_exactly(tmp_path, phantom_cache):
    check_trains_and_resumes(tmp_path, phantom_cache, str(ROOT / "recipes" / "biovil_l.yaml"))
