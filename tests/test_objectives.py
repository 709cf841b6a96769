"""Objectives against independent computations: loops, closed forms, known MI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlp.objectives.base import FeatureDims, ObjectiveSpec, build_objective
from vlp.objectives.contrastive import pick_random_sentence
from vlp.objectives.mi import ConcatCritic, dv_bound, infonce_bound

DIMS = FeatureDims(embed_dim=6, local_dim=5, sentence_dim=7)
#: Liao et al.'s local MI as published: the max over regions (Eq. 5).
PAPER = {"region_pool": "max"}


# ----------------------------------------------------------------------------- bounds


def test_bounds_match_explicit_formulas_with_masks():
    torch.manual_seed(0)
    scores = torch.randn(4, 6) * 3
    positive = torch.zeros(4, 6, dtype=torch.bool)
    positive[torch.arange(4), torch.tensor([0, 2, 1, 5])] = True
    excluded = {(0, 3), (2, 4), (3, 0)}  # e.g. same-study pairs
    negative = ~positive
    for i, j in excluded:
        negative[i, j] = False
    rows, pos_values, neg_values = [], [], []
    for i in range(4):
        p = float(scores[i][positive[i]])
        negs = [float(scores[i, j]) for j in range(6) if negative[i, j]]
        pos_values.append(p)
        neg_values += negs
        candidates = [p] + negs
        rows.append(p - math.log(sum(math.exp(v) for v in candidates)) + math.log(len(candidates)))
    expected_infonce = sum(rows) / len(rows)
    expected_dv = sum(pos_values) / len(pos_values) - math.log(
        sum(math.exp(v) for v in neg_values) / len(neg_values)
    )
    assert math.isclose(
        float(infonce_bound(scores, positive, negative)), expected_infonce, abs_tol=1e-5
    )
    assert math.isclose(float(dv_bound(scores, positive, negative)), expected_dv, abs_tol=1e-5)


def test_infonce_never_exceeds_log_n():
    torch.manual_seed(1)
    for n in (2, 8, 33):
        for _ in range(50):
            scores = torch.randn(n, n) * 20
            scores.diagonal().add_(torch.rand(n) * 50)  # strongly favour positives
            assert float(infonce_bound(scores)) <= math.log(n) + 1e-5


def test_infonce_requires_one_positive_per_row():
    with pytest.raises(ValueError, match="exactly one positive"):
        infonce_bound(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))


def _correlated_gaussians(n, d, rho, generator):
    x = torch.randn(n, d, generator=generator)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=generator)
    return x, y


def _train_critic(estimator, d, rho, batch, steps, seed=0):
    # Many tiny ops: one thread avoids oversubscription on a shared CPU (seconds vs minutes).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_critic_single_thread(estimator, d, rho, batch, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train_critic_single_thread(estimator, d, rho, batch, steps, seed):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    critic = ConcatCritic(d, d, [32, 32])
    optimizer = torch.optim.Adam(critic.parameters(), lr=2e-3)
    bound_fn = infonce_bound if estimator == "cpc" else dv_bound
    for _ in range(steps):
        x, y = _correlated_gaussians(batch, d, rho, generator)
        loss = -bound_fn(critic.pair_scores(x, y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        estimates = [
            float(bound_fn(critic.pair_scores(*_correlated_gaussians(batch, d, rho, generator))))
            for _ in range(20)
        ]
    return sum(estimates) / len(estimates)


@pytest.mark.parametrize("estimator, tolerance", [("cpc", 0.15), ("mine", 0.2)])
def test_estimators_recover_known_gaussian_mi(estimator, tolerance):
    d, rho = 2, 0.8
    true_mi = -d / 2 * math.log(1 - rho**2)  # 1.02 nats
    estimate = _train_critic(estimator, d, rho, batch=128, steps=400)
    assert abs(estimate - true_mi) < tolerance, (estimate, true_mi)


def test_cpc_saturates_at_log_n_for_high_mi():
    d, rho, n = 4, 0.99, 16
    true_mi = -d / 2 * math.log(1 - rho**2)  # 7.8 nats, far above log 16 = 2.77
    estimate = _train_critic("cpc", d, rho, batch=n, steps=600)
    assert true_mi > math.log(n) + 3
    assert math.log(n) - 0.6 < estimate <= math.log(n) + 1e-6


# ----------------------------------------------------------------------------- local MI


def _local_features(seed=0, sentences_per_image=(2, 0, 3, 1, 2), studies=(10, 11, 12, 12, 13)):
    g = torch.Generator().manual_seed(seed)
    b, r = len(studies), 4
    index = torch.tensor([i for i, n in enumerate(sentences_per_image) for _ in range(n)])
    return {
        "image_local": torch.randn(b, r, DIMS.local_dim, generator=g).requires_grad_(),
        "sentence": torch.randn(len(index), DIMS.sentence_dim, generator=g).requires_grad_(),
        "sentence_index": index,
        "study_id": torch.tensor(studies),
    }


def _loop_local_mi(critic, features, estimator):
    """Eq. 5 written out: explicit concatenation, one critic call per region."""
    weight, bias = critic.first_layer()

    def score(x, y):
        return critic.rest(weight @ torch.cat([x, y]) + bias).squeeze()

    local, sentence = features["image_local"], features["sentence"]
    index, study = features["sentence_index"], features["study_id"]
    positives, negatives_per_row = [], []
    for s in range(sentence.shape[0]):
        if index[s] < 0:
            continue

        def image_score(b, s=s):
            return torch.stack(
                [score(local[b, r], sentence[s]) for r in range(local.shape[1])]
            ).max()

        own = int(index[s])
        positives.append(image_score(own))
        negatives_per_row.append(
            [image_score(b) for b in range(local.shape[0]) if study[b] != study[own]]
        )
    if estimator == "cpc":
        rows = [
            p - torch.logsumexp(torch.stack([p, *n]), 0) + math.log(1 + len(n))
            for p, n in zip(positives, negatives_per_row)
        ]
        return -torch.stack(rows).mean()
    all_negatives = torch.stack([v for n in negatives_per_row for v in n])
    dv = torch.stack(positives).mean() - (
        torch.logsumexp(all_negatives, 0) - math.log(len(all_negatives))
    )
    return -dv


@pytest.mark.parametrize("estimator", ["cpc", "mine"])
@pytest.mark.parametrize("chunk_size", [5, 100000])
def test_local_mi_equals_loop_values_and_gradients(estimator, chunk_size):
    torch.manual_seed(0)
    params = {
        **PAPER,
        "estimator": estimator,
        "critic": {"kind": "concat", "hidden_dims": [16, 8]},
        "chunk_size": chunk_size,
    }
    objective = build_objective(ObjectiveSpec("local_mi", params=params), DIMS)
    features = _local_features()
    loss = objective(features, {}).losses["mi"]
    grads = torch.autograd.grad(
        loss, [features["image_local"], features["sentence"], *objective.parameters()]
    )
    expected = _loop_local_mi(objective.critic, features, estimator)
    expected_grads = torch.autograd.grad(
        expected, [features["image_local"], features["sentence"], *objective.parameters()]
    )
    assert torch.allclose(loss, expected, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-5)


def test_region_scores_and_picked_region():
    torch.manual_seed(0)
    objective = build_objective(
        ObjectiveSpec(
            "local_mi", params={**PAPER, "critic": {"kind": "concat", "hidden_dims": [16]}}
        ),
        DIMS,
    )
    features = _local_features()
    weight, bias = objective.critic.first_layer()
    grid = objective.region_scores(features)
    index = features["sentence_index"]
    for s in range(len(index)):
        for r in range(4):
            x = torch.cat([features["image_local"][index[s], r], features["sentence"][s]])
            expected = objective.critic.rest(weight @ x + bias).squeeze()
            assert torch.allclose(grid[s, r], expected, atol=1e-5)
    _, _, _, best = objective.scores(features)
    assert torch.equal(best[:, 0], grid.argmax(1))


def test_loss_backpropagates_only_through_the_picked_regions():
    torch.manual_seed(0)
    objective = build_objective(
        ObjectiveSpec(
            "local_mi", params={**PAPER, "critic": {"kind": "concat", "hidden_dims": [16]}}
        ),
        DIMS,
    )
    # one sentence, of image 0; images 1 and 2 are negatives
    features = _local_features(sentences_per_image=(1, 0, 0), studies=(1, 2, 3))
    scores, _, negative, best = objective.scores(features)
    loss = objective(features, {}).losses["mi"]
    (grad,) = torch.autograd.grad(loss, features["image_local"])
    grid = objective.region_scores(features)
    assert int(best[0, 0]) == int(grid[0].argmax())
    nonzero_rows = {b: set(grad[b].abs().sum(-1).nonzero().flatten().tolist()) for b in range(3)}
    assert nonzero_rows[0] == {int(best[0, 0])}
    columns = [1, 2, 3]  # own image first, then images 0, 1, 2 (image 0 masked: same study)
    for col, image in zip(columns, range(3)):
        if image:
            assert bool(negative[0, col])
            assert nonzero_rows[image] == {int(best[0, col])}


def test_local_mi_sampled_negatives_are_valid_and_distinct():
    objective = build_objective(
        ObjectiveSpec(
            "local_mi",
            params={**PAPER, "num_negatives": 3, "critic": {"kind": "concat", "hidden_dims": [8]}},
        ),
        DIMS,
    )
    studies = torch.tensor([5, 5, 6, 7, 8, 9])
    own = torch.tensor([0, 0, 1, 2, 5])
    columns, negative = objective._candidates(own, studies[own], studies)
    assert columns.shape == (5, 4) and torch.equal(columns[:, 0], own)
    for row in range(5):
        picked = columns[row, 1:][negative[row, 1:]]
        assert len(set(picked.tolist())) == len(picked) == 3
        assert all(studies[c] != studies[own[row]] for c in picked)
    features = _local_features(
        sentences_per_image=(1, 1, 1, 1, 1, 1), studies=tuple(studies.tolist())
    )
    loss = objective(features, {}).losses["mi"]
    assert torch.isfinite(loss)


def test_local_mi_without_sentences_is_a_connected_zero():
    objective = build_objective(
        ObjectiveSpec(
            "local_mi", params={**PAPER, "critic": {"kind": "concat", "hidden_dims": [8]}}
        ),
        DIMS,
    )
    features = _local_features(sentences_per_image=(0, 0, 0, 0, 0))
    loss = objective(features, {}).losses["mi"]
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert features["image_local"].grad is not None


def test_local_mi_ignores_padding_sentences():
    torch.manual_seed(0)
    objective = build_objective(
        ObjectiveSpec(
            "local_mi", params={**PAPER, "critic": {"kind": "concat", "hidden_dims": [8]}}
        ),
        DIMS,
    )
    features = _local_features()
    padded = dict(features)
    padded["sentence"] = torch.cat([features["sentence"], torch.randn(2, DIMS.sentence_dim)])
    padded["sentence_index"] = torch.cat([features["sentence_index"], torch.tensor([-1, -1])])
    a = objective(features, {}).losses["mi"]
    b = objective(padded, {}).losses["mi"]
    assert torch.allclose(a, b)
    assert torch.isnan(objective.region_scores(padded)[-2:]).all()


# ----------------------------------------------------------------------------- global MI


@pytest.mark.parametrize("estimator", ["cpc", "mine"])
def test_global_mi_equals_loop_and_excludes_same_study(estimator):
    torch.manual_seed(0)
    params = {"estimator": estimator, "critic": {"kind": "concat", "hidden_dims": [16, 8]}}
    objective = build_objective(ObjectiveSpec("global_mi", params=params), DIMS)
    g = torch.Generator().manual_seed(3)
    image = torch.randn(5, 6, generator=g)
    report = torch.randn(5, 6, generator=g)
    study = torch.tensor([1, 2, 2, 3, 4])  # samples 1 and 2 share a study
    features = {"image_global": image, "report": report, "study_id": study}
    loss = objective(features, {}).losses["mi"]
    weight, bias = objective.critic.first_layer()

    def score(i, j):
        return objective.critic.rest(weight @ torch.cat([image[i], report[j]]) + bias).squeeze()

    pos = [score(i, i) for i in range(5)]
    negs = [[score(i, j) for j in range(5) if study[j] != study[i]] for i in range(5)]
    if estimator == "cpc":
        rows = [
            p - torch.logsumexp(torch.stack([p, *n]), 0) + math.log(1 + len(n))
            for p, n in zip(pos, negs)
        ]
        expected = -torch.stack(rows).mean()
    else:
        flat = torch.stack([v for n in negs for v in n])
        expected = -(torch.stack(pos).mean() - torch.logsumexp(flat, 0) + math.log(len(flat)))
    assert torch.allclose(loss, expected, atol=1e-5)


# ----------------------------------------------------------------------------- CLIP


def test_clip_matches_symmetric_cross_entropy():
    torch.manual_seed(0)
    objective = build_objective(ObjectiveSpec("clip"), DIMS)
    image, report = torch.randn(6, 6), torch.randn(6, 6)
    scale = torch.tensor(12.0)
    with torch.no_grad():  # the objective owns its (learnable, log-space) logit scale
        objective.logit_scale.log_scale.fill_(math.log(12.0))
    out = objective({"image_global": image, "report": report}, {})
    a, b = F.normalize(image, dim=-1), F.normalize(report, dim=-1)
    logits = scale * a @ b.T
    rows = [-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(6)]
    cols = [-(logits[i, i] - torch.logsumexp(logits[:, i], 0)) for i in range(6)]
    expected = (torch.stack(rows).mean() + torch.stack(cols).mean()) / 2
    assert torch.allclose(out.losses["contrastive"], expected, atol=1e-5)
    assert math.isclose(float(out.metrics["logit_scale"]), 12.0, rel_tol=1e-6)


def test_random_sentence_belongs_to_its_sample_or_falls_back_to_report():
    torch.manual_seed(0)
    report = torch.randn(3, 4)
    sentence = torch.randn(5, 4)
    index = torch.tensor([0, 0, 2, 2, 2])
    seen = {0: set(), 2: set()}
    for _ in range(40):
        picked = pick_random_sentence(
            {"report": report, "sentence": sentence, "sentence_index": index}
        )
        assert torch.equal(picked[1], report[1])
        for sample in (0, 2):
            matches = [s for s in range(5) if torch.equal(picked[sample], sentence[s])]
            assert len(matches) == 1 and index[matches[0]] == sample
            seen[sample].add(matches[0])
    assert seen == {0: {0, 1}, 2: {2, 3, 4}}
