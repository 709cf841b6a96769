"""The local-MI objective learns, and its collapse metrics tell learning from collapse.

A synthetic task with exact ground truth: each image is a grid of region features, one or
two "findings" drawn among K sit in random regions (a finding's region is its feature
vector plus noise, other regions are noise), and each image has one sentence per finding
(its text vector plus noise) and one generic sentence that every image shares ("No
pneumothorax."). Small encoders map regions and sentences into the objective's inputs.
Training must raise the bound far above chance (0 nats), put each finding's sentence on
its region, and keep the critic away from the collapsed state (scores equal for positive
and negative images, a map that ignores the sentence).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlp.objectives.base import FeatureDims, ObjectiveSpec, build_objective

K, REGIONS, REGION_DIM, TEXT_DIM, WIDTH, BATCH = 8, 9, 16, 12, 32, 16


class SyntheticTask:
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.finding_region = torch.randn(K, REGION_DIM, generator=self.generator)
        self.finding_text = torch.randn(K, TEXT_DIM, generator=self.generator)
        self.generic_text = torch.randn(TEXT_DIM, generator=self.generator)

    def batch(self):
        g = self.generator
        regions = 0.5 * torch.randn(BATCH, REGIONS, REGION_DIM, generator=g)
        sentences, index, truth = [], [], []  # truth: region of the finding, -1 generic
        for b in range(BATCH):
            count = 1 + int(torch.randint(0, 2, (1,), generator=g))
            findings = torch.randperm(K, generator=g)[:count]
            places = torch.randperm(REGIONS, generator=g)[:count]
            for finding, place in zip(findings.tolist(), places.tolist()):
                regions[b, place] += self.finding_region[finding]
                sentences.append(self.finding_text[finding])
                index.append(b)
                truth.append(place)
            sentences.append(self.generic_text)
            index.append(b)
            truth.append(-1)
        sentences = torch.stack(sentences) + 0.3 * torch.randn(len(index), TEXT_DIM, generator=g)
        return regions, sentences, torch.tensor(index), torch.tensor(truth)


def _features(image_net, text_net, regions, sentences, index):
    return {
        "image_local": image_net(regions),
        "sentence": text_net(sentences),
        "sentence_index": index,
        "study_id": torch.arange(BATCH),
    }


def _train(params: dict, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    task = SyntheticTask(seed)
    image_net = nn.Sequential(nn.Linear(REGION_DIM, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH))
    text_net = nn.Linear(TEXT_DIM, WIDTH)
    dims = FeatureDims(embed_dim=WIDTH, local_dim=WIDTH, sentence_dim=WIDTH)
    objective = build_objective(ObjectiveSpec("local_mi", params=params), dims)
    parameters = [*image_net.parameters(), *text_net.parameters(), *objective.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=3e-3)

    def evaluate():
        with torch.no_grad():
            outs, hits, total = [], 0, 0
            for _ in range(4):
                regions, sentences, index, truth = task.batch()
                features = _features(image_net, text_net, regions, sentences, index)
                outs.append(objective(features, {}).metrics)
                best = objective.region_scores(features).argmax(1)
                found = truth >= 0
                hits += int((best[found] == truth[found]).sum())
                total += int(found.sum())
        metrics = {k: float(torch.stack([o[k] for o in outs]).mean()) for k in outs[0]}
        metrics["localisation"] = hits / total
        return metrics

    before = evaluate()
    for _ in range(steps):
        regions, sentences, index, _ = task.batch()
        loss = objective(_features(image_net, text_net, regions, sentences, index), {}).losses
        optimizer.zero_grad()
        loss["mi"].backward()
        optimizer.step()
    return before, evaluate()


@pytest.fixture(autouse=True)
def _one_thread():
    # Many tiny ops: one thread avoids oversubscription on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("estimator", ["cpc", "mine"])
def test_default_local_mi_learns_and_does_not_collapse(estimator):
    before, after = _train({"estimator": estimator}, steps=150)
    chance = 1.0 / BATCH
    # Before training: the bound sits at chance and the positive image scores no higher.
    assert abs(before["bound"]) < 0.3 and abs(before["score_gap"]) < 0.3
    # After: clearly above chance. The ceiling is below log(16) = 2.77 nats because the
    # generic sentence and shared findings cannot single out their image.
    assert after["bound"] > 0.8, after
    assert after["top1"] > 3 * chance, after
    assert after["score_gap"] > 1.0, after
    # Not an image-only map: a region's score depends on the sentence at least as much as
    # a sentence's score depends on the region.
    assert after["spread_ratio"] < 1.5, after
    # Each finding's sentence peaks on the region that holds it (chance 1/9).
    assert after["localisation"] > 0.8, after


def test_collapse_metrics_flag_a_sentence_blind_critic():
    """An image-only critic (text ignored) is what the metrics must call collapsed."""
    torch.manual_seed(0)
    dims = FeatureDims(embed_dim=WIDTH, local_dim=WIDTH, sentence_dim=WIDTH)
    params = {"critic": {"kind": "concat", "hidden_dims": [16]}}
    objective = build_objective(ObjectiveSpec("local_mi", params=params), dims)
    with torch.no_grad():
        objective.critic.text_in.weight.zero_()  # T(x, y) = MLP(W_x x + c): no text
        # Units 0-4 can never fire (bias -100, no weights), units 5-15 always do.
        objective.critic.image_in.weight[:5] = 0.0
        objective.critic.image_in.bias[:5] = -100.0
        objective.critic.image_in.weight[5:] *= 0.01
        objective.critic.image_in.bias[5:] = 100.0
    _, _, index, _ = SyntheticTask(0).batch()
    features = {
        "image_local": torch.randn(BATCH, REGIONS, WIDTH),
        "sentence": torch.randn(len(index), WIDTH),
        "sentence_index": index,
        "study_id": torch.arange(BATCH),
    }
    metrics = objective(features, {}).metrics
    assert float(metrics["spread_across_sentences"]) < 1e-6
    assert float(metrics["spread_ratio"]) > 1e3
    assert float(metrics["critic_inactive_units"]) == pytest.approx(5 / 16)
    assert abs(float(metrics["score_gap"])) < 1.0


@pytest.mark.parametrize("pool", ["mean", "logsumexp"])
def test_pooled_scores_match_a_loop(pool):
    torch.manual_seed(0)
    dims = FeatureDims(embed_dim=6, local_dim=5, sentence_dim=7)
    params = {"region_pool": pool, "region_temperature": 0.5, "chunk_size": 7}
    objective = build_objective(ObjectiveSpec("local_mi", params=params), dims)
    local = torch.randn(3, 4, 5, requires_grad=True)
    sentence = torch.randn(4, 7)
    index = torch.tensor([0, 0, 1, 2])
    features = {"image_local": local, "sentence": sentence, "sentence_index": index,
                "study_id": torch.tensor([1, 2, 3])}  # fmt: skip
    scores, _, _, _ = objective.scores(features)
    critic = objective.critic
    for s in range(4):
        candidates = [int(index[s]), 0, 1, 2]
        for c, b in enumerate(candidates):
            regions = torch.stack([critic(local[b, r], sentence[s]) for r in range(4)])
            if pool == "mean":
                expected = regions.mean()
            else:
                expected = 0.5 * (torch.logsumexp(regions / 0.5, 0) - math.log(4))
            assert torch.allclose(scores[s, c], expected, atol=1e-5)
    scores.sum().backward()
    assert (local.grad.abs().sum(-1) > 0).all()  # every region gets gradient


def test_separable_critic_is_a_scaled_cosine():
    dims = FeatureDims(embed_dim=6, local_dim=5, sentence_dim=7)
    params = {"critic": {"kind": "separable", "dim": 4, "temperature": 0.25}}
    critic = build_objective(ObjectiveSpec("local_mi", params=params), dims).critic
    x, y = torch.randn(3, 5), torch.randn(2, 7)
    (fx,) = [m for m in critic.image_net if isinstance(m, nn.Linear)]
    (gy,) = [m for m in critic.text_net if isinstance(m, nn.Linear)]
    for i in range(3):
        for j in range(2):
            a, b = fx.weight @ x[i] + fx.bias, gy.weight @ y[j] + gy.bias
            expected = 4.0 * torch.dot(a, b) / (a.norm() * b.norm())
            assert torch.allclose(critic.pair_scores(x, y)[i, j], expected, atol=1e-5)
