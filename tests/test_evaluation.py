"""Fast unit tests of vlp.evaluation: metrics, bootstrap, geometry, retrieval, probes, prompts.

Every expected value comes from an independent computation: scikit-learn, a brute-force
loop, or a closed form.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from vlp.data.schema import CHEXPERT_LABELS
from vlp.evaluation import grounding, metrics, report, retrieval, zero_shot
from vlp.evaluation.features import Features
from vlp.evaluation.linear_probe import probe_labels, subsample


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------- metrics


def test_point_metrics_equal_sklearn(rng):
    y = rng.integers(0, 2, 300).astype(float)
    scores = np.round(rng.normal(size=300) + y, 1)  # rounding creates ties
    predicted = (scores > 0.5).astype(float)
    assert metrics.auroc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert metrics.fast_auroc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert metrics.f1(y, predicted) == pytest.approx(f1_score(y, predicted))
    assert metrics.accuracy(y, predicted) == pytest.approx(accuracy_score(y, predicted))
    classes = rng.integers(0, 4, 300)
    guesses = rng.integers(0, 4, 300)
    assert metrics.macro_f1(classes, guesses) == pytest.approx(
        f1_score(classes, guesses, average="macro")
    )
    assert metrics.macro_accuracy(classes, guesses) == pytest.approx(
        balanced_accuracy_score(classes, guesses)
    )


def test_temporal_mean_macro_accuracy_is_the_mean_of_each_findings_balanced_accuracy(rng):
    from vlp.evaluation.temporal import mean_macro_accuracy

    targets = rng.integers(0, 3, size=(200, 4))
    predictions = rng.integers(0, 3, size=(200, 4))
    targets[rng.uniform(size=targets.shape) < 0.4] = -1  # unlabelled (study, finding)
    targets[:, 3] = -1  # a finding nobody is labelled for is left out
    expected = np.mean(
        [
            balanced_accuracy_score(
                targets[targets[:, k] >= 0, k], predictions[targets[:, k] >= 0, k]
            )
            for k in range(3)
        ]
    )
    assert mean_macro_accuracy(targets, predictions) == pytest.approx(expected, abs=1e-12)
    # Its interval resamples studies (rows), every finding of a study together.
    result = metrics.with_ci(mean_macro_accuracy, targets, predictions, n_resamples=100, seed=3)
    low, high = result["ci"]
    assert low < result["value"] < high
    by_hand = [
        mean_macro_accuracy(targets[rows], predictions[rows])
        for rows in metrics.bootstrap_indices(200, 100, 3)
    ]
    assert [low, high] == pytest.approx(np.percentile(by_hand, [2.5, 97.5]), abs=1e-12)
    with pytest.raises(metrics.MetricUndefined):
        mean_macro_accuracy(np.full((5, 2), -1), np.zeros((5, 2), int))


def test_temporal_paired_difference_resamples_both_encoders_together(tmp_path, rng):
    """``temporal.paired_difference`` of two encoders' saved predictions: the value is the
    difference of the mean over findings of scikit-learn's balanced accuracy; the interval,
    one bootstrap that resamples the studies of both together, is checked against a loop
    that draws the same indices (``metrics.bootstrap_indices``) and reads the two encoders
    from them; folders of other studies are refused."""
    from vlp.evaluation.features import EvaluationInputError
    from vlp.evaluation.temporal import PREDICTIONS, paired_difference

    n, findings = 300, np.array(["edema", "pneumothorax"])
    targets = rng.integers(0, 3, size=(n, 2))
    targets[rng.random((n, 2)) < 0.3] = -1  # unlabelled for that finding
    targets[:5] = -1  # studies without any label are left out
    base = np.where(rng.random((n, 2)) < 0.5, targets, rng.integers(0, 3, size=(n, 2)))
    better = np.where(rng.random((n, 2)) < 0.8, targets, base)
    folders = []
    for name, predicted in (("base", base), ("better", better)):
        folder = tmp_path / name
        folder.mkdir()
        np.savez(
            folder / PREDICTIONS,
            study_id=np.arange(n) + 1000,
            targets=targets,
            predictions=np.where(targets >= 0, predicted, -1),
            findings=findings,
        )
        folders.append(folder)

    def mean_balanced(t, p):
        return np.mean(
            [balanced_accuracy_score(t[t[:, k] >= 0, k], p[t[:, k] >= 0, k]) for k in (0, 1)]
        )

    result = paired_difference(*folders, bootstrap=200, seed=3)
    keep = (targets >= 0).any(1)
    t, a, b = targets[keep], base[keep], better[keep]
    assert result["value"] == pytest.approx(mean_balanced(t, b) - mean_balanced(t, a))
    draws = [
        mean_balanced(t[i], b[i]) - mean_balanced(t[i], a[i])
        for i in metrics.bootstrap_indices(len(t), 200, 3)
    ]
    assert result["ci"] == pytest.approx(list(np.percentile(draws, [2.5, 97.5])))
    assert result["ci"][0] > 0, "80 % against 50 % correct: the better encoder wins"

    other = tmp_path / "other"
    other.mkdir()
    with np.load(folders[0] / PREDICTIONS) as saved:
        arrays = {key: saved[key] for key in saved.files}
    np.savez(other / PREDICTIONS, **{**arrays, "study_id": arrays["study_id"] + 1})
    with pytest.raises(EvaluationInputError, match="study_id differ"):
        paired_difference(folders[0], other)
    with pytest.raises(EvaluationInputError, match="missing"):
        paired_difference(folders[0], tmp_path)


def test_temporal_svm_folds_and_undefined_findings(rng):
    """The fold count is the smallest present class (at most ``folds``); a finding with no
    labelled pair, or one class only, is undefined, not a crash (a split without any
    pneumonia pair raised numpy's empty-reduction error)."""
    from vlp.evaluation.temporal import cross_validated_predictions

    x = rng.normal(size=(9, 4))
    y = np.array([0, 0, 0, 2, 2, 2, 2, 2, 2])  # no "stable" pair: two classes, 3 and 6
    predicted, k, _ = cross_validated_predictions(x, y, folds=5, seed=0)
    assert k == 3 and predicted.shape == y.shape and set(predicted) <= {0, 2}
    for y_bad in (np.array([], dtype=int), np.array([1, 1, 1]), np.array([0, 0, 0, 2])):
        with pytest.raises(metrics.MetricUndefined):
            cross_validated_predictions(x[: y_bad.size], y_bad, folds=5, seed=0)


def test_auroc_undefined_and_bad_labels():
    with pytest.raises(metrics.MetricUndefined):
        metrics.auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.auroc([1, -1, 0], [0.1, 0.2, 0.3])


def test_bootstrap_ci_matches_hand_loop_and_contains_estimate(rng):
    y = rng.integers(0, 2, 120).astype(float)
    scores = rng.normal(size=120) + 0.8 * y
    result = metrics.auroc_with_ci(y, scores, n_resamples=200, seed=7)
    # Hand loop: same generator, same draws, scikit-learn on each resample.
    draws = np.random.default_rng(7).integers(0, 120, size=(200, 120))
    values = [
        roc_auc_score(y[rows], scores[rows]) for rows in draws if 0 < y[rows].sum() < len(rows)
    ]
    expected = np.percentile(values, [2.5, 97.5])
    assert result["ci"] == pytest.approx(expected.tolist(), abs=1e-12)
    assert result["ci"][0] <= result["value"] <= result["ci"][1]
    assert result["value"] == pytest.approx(roc_auc_score(y, scores))


def test_bootstrap_counts_undefined_resamples():
    y = np.array([1.0] + [0.0] * 9)
    scores = np.linspace(0, 1, 10)
    draws = np.random.default_rng(0).integers(0, 10, size=(100, 10))
    expected_dropped = sum(1 for rows in draws if y[rows].sum() in (0, 10))
    result = metrics.auroc_with_ci(y, scores, n_resamples=100, seed=0)
    assert result["ci_dropped"] == expected_dropped > 0


def test_f1_threshold_is_best_over_all_cuts(rng):
    y = rng.integers(0, 2, 80).astype(float)
    scores = np.round(rng.normal(size=80) + y, 1)
    best = max(f1_score(y, scores >= t) for t in np.unique(scores))
    chosen = metrics.f1_threshold(y, scores)
    assert f1_score(y, scores >= chosen) == pytest.approx(best)


def test_ordinal_and_pairwise_aucs_against_hand_computation(rng):
    y = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + np.eye(4)[y] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ordinal = metrics.ordinal_aucs(y, probs)
    for name, k in (("0v123", 1), ("01v23", 2), ("012v3", 3)):
        hand_score = sum(probs[:, c] for c in range(k, 4))
        assert ordinal[name] == pytest.approx(roc_auc_score(y >= k, hand_score))
    expected = probs @ np.arange(4)
    pairwise = metrics.pairwise_aucs(y, probs)
    for i in range(4):
        for j in range(i + 1, 4):
            low, high = expected[y == i], expected[y == j]
            # Mann-Whitney by explicit pair counting (ties count one half).
            wins = sum((h > lo) + 0.5 * (h == lo) for h in high for lo in low)
            assert pairwise[f"{i}v{j}"] == pytest.approx(wins / (len(low) * len(high)))


def test_ordinal_auc_nan_when_a_split_has_one_class():
    y = np.array([0, 0, 1, 1])
    probs = np.full((4, 4), 0.25)
    assert math.isnan(metrics.ordinal_aucs(y, probs)["012v3"])


# --------------------------------------------------------------------------- probes


def _features(x: np.ndarray, labels: np.ndarray) -> Features:
    n = x.shape[0]
    return Features(
        keys=[str(i) for i in range(n)],
        image_global=x.astype(np.float32),
        labels=labels.astype(np.float32),
        edema_severity=np.full(n, -1),
    )


def _synthetic_labels(rng, n: int) -> np.ndarray:
    labels = (rng.random((n, len(CHEXPERT_LABELS))) < 0.35).astype(float)
    labels[rng.random(labels.shape) < 0.1] = np.nan  # blanks are ignored by the probe
    return labels


def test_oracle_encoder_scores_near_one_and_random_near_half(rng):
    train_labels, val_labels, test_labels = (_synthetic_labels(rng, n) for n in (160, 60, 120))

    def oracle(labels):  # features that encode the labels, plus a little noise
        return np.nan_to_num(labels) + 0.05 * rng.normal(size=labels.shape)

    splits = [_features(oracle(lab), lab) for lab in (train_labels, val_labels, test_labels)]
    good = probe_labels(*splits, fraction=1.0, seed=0, bootstrap=0)
    assert good["mean_auroc"] > 0.99

    random_splits = [
        _features(rng.normal(size=(lab.shape[0], 32)), lab)
        for lab in (train_labels, val_labels, test_labels)
    ]
    chance = probe_labels(*random_splits, fraction=1.0, seed=0, bootstrap=0)
    assert 0.4 < chance["mean_auroc"] < 0.6


def test_subsample_is_seeded_and_sized():
    a, b = subsample(1000, 0.1, 3), subsample(1000, 0.1, 3)
    assert np.array_equal(a, b) and a.size == 100 and len(set(a.tolist())) == 100
    assert subsample(50, 0.01, 0).size == 2  # at least two studies


# --------------------------------------------------------------------------- prompts


def test_prompt_ensemble_is_order_invariant_and_normalised_mean(rng):
    embeddings = torch.from_numpy(rng.normal(size=(5, 16))).float()
    permuted = embeddings[torch.randperm(5, generator=torch.Generator().manual_seed(0))]
    assert torch.allclose(zero_shot.ensemble(embeddings), zero_shot.ensemble(permuted), atol=1e-6)
    mean = embeddings.numpy().mean(0)
    assert np.allclose(
        zero_shot.ensemble(embeddings).numpy(), mean / np.linalg.norm(mean), atol=1e-6
    )


def test_shipped_prompts_cover_phantom_findings():
    spec = zero_shot.load_prompts()
    for name in (
        "Pleural Effusion",
        "Cardiomegaly",
        "Pneumothorax",
        "Edema",
        "Consolidation",
        "Atelectasis",
    ):
        assert spec["classes"][name]["positive"] and spec["classes"][name]["negative"]
    assert spec["multiclass"]["classes"][0] in spec["classes"]


def test_bad_prompt_file_names_file_and_key(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("classes:\n  Pleural Efusion:\n    positive: [x]\n")
    with pytest.raises(ValueError, match=r"p\.yaml: classes\.Pleural Efusion: not a CheXpert"):
        zero_shot.load_prompts(path)
    path.write_text("classes:\n  Edema:\n    positive: []\n")
    with pytest.raises(ValueError, match=r"classes\.Edema\.positive"):
        zero_shot.load_prompts(path)


def test_multiclass_selection_rule():
    nan = np.nan
    labels = np.full((6, len(CHEXPERT_LABELS)), nan)
    a, c = CHEXPERT_LABELS.index("Atelectasis"), CHEXPERT_LABELS.index("Cardiomegaly")
    labels[0, [a, c]] = [1, 0]  # atelectasis
    labels[1, [a, c]] = [1, nan]  # atelectasis (blank other counts as 0)
    labels[2, [a, c]] = [1, 1]  # both: excluded
    labels[3, [a, c]] = [1, -1]  # uncertain other: excluded
    labels[4, [a, c]] = [0, 1]  # cardiomegaly
    labels[5, [a, c]] = [-1, 1]  # uncertain other: excluded
    rows, targets, available = zero_shot.multiclass_selection(
        labels, ["Atelectasis", "Cardiomegaly"], per_class=10, seed=0
    )
    assert sorted(zip(rows.tolist(), targets.tolist())) == [(0, 0), (1, 0), (4, 1)]
    assert available == {"Atelectasis": 2, "Cardiomegaly": 1}
    rows, _, _ = zero_shot.multiclass_selection(labels, ["Atelectasis", "Cardiomegaly"], 1, 0)
    assert rows.size == 2


# --------------------------------------------------------------------------- grounding


def test_cnr_closed_forms(rng):
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:20, 4:12] = True
    indicator = mask.astype(float)
    # sigma_in = sigma_out = 0: CNR = |1 - 0| / sqrt(eps).
    assert grounding.cnr(indicator, mask) == pytest.approx(1 / math.sqrt(grounding.CNR_EPS))
    noisy = indicator + 0.1 * rng.normal(size=mask.shape)
    assert grounding.cnr(noisy, mask) < grounding.cnr(indicator, mask)
    assert grounding.cnr(np.full(mask.shape, 3.0), mask) == 0.0
    heat = rng.normal(size=mask.shape)
    inside, outside = heat[mask], heat[~mask]
    hand = abs(inside.mean() - outside.mean()) / math.sqrt(
        inside.var() + outside.var() + grounding.CNR_EPS
    )
    assert grounding.cnr(heat, mask) == pytest.approx(hand)
    # Invariant to shift and positive scale (critic scores vs cosines).
    assert grounding.cnr(5 * heat + 2, mask) == pytest.approx(grounding.cnr(heat, mask), rel=1e-6)


def test_mean_iou_of_indicator_is_one_and_of_complement_zero():
    mask = np.zeros((16, 16), dtype=bool)
    mask[2:6, 3:9] = True
    assert grounding.mean_iou(mask.astype(float), mask) == pytest.approx(1.0)
    assert grounding.mean_iou((~mask).astype(float), mask) == pytest.approx(0.0)


def test_box_mapping_to_centre_crop():
    # Stored image 128 high, 107 wide: the loader keeps rows 10.5..117.5, scales by 64/107.
    box = {"x": 34.0, "y": 57.0, "w": 45.0, "h": 44.0}
    x0, y0, x1, y1 = grounding.box_to_input(box, [128, 107], 64)
    s = 64 / 107
    assert (x0, y0, x1, y1) == pytest.approx((34 * s, (57 - 10.5) * s, 79 * s, (101 - 10.5) * s))
    # A box in the cropped-away top band disappears; one straddling the edge is clipped.
    assert grounding.box_to_input({"x": 0, "y": 0, "w": 10, "h": 10}, [128, 107], 64) is None
    clipped = grounding.box_to_input({"x": 0, "y": 5, "w": 10, "h": 20}, [128, 107], 64)
    assert clipped[1] == 0.0 and clipped[3] == pytest.approx((25 - 10.5) * s)
    mask = grounding.box_mask([(1.0, 2.0, 4.0, 3.0)], 8)  # pixel centres 1.5..3.5 x 2.5
    assert mask.sum() == 3 and mask[2, 1:4].all()


# --------------------------------------------------------------------------- retrieval


def test_retrieval_identical_embeddings_rank_one(rng):
    x = torch.from_numpy(rng.normal(size=(50, 8))).float()
    rank = retrieval.ranks(x, x.clone(), chunk_size=7)
    assert (rank == 1).all() and retrieval.recall_at(rank, 1) == 1.0


def test_retrieval_matches_brute_force_and_chunking(rng):
    q = torch.from_numpy(rng.normal(size=(40, 6))).float()
    g = torch.from_numpy(rng.normal(size=(40, 6))).float()
    qn = q.numpy() / np.linalg.norm(q.numpy(), axis=1, keepdims=True)
    gn = g.numpy() / np.linalg.norm(g.numpy(), axis=1, keepdims=True)
    brute = []
    for i in range(40):
        sims = [float(qn[i] @ gn[j]) for j in range(40)]
        brute.append(1 + sum(s > sims[i] for s in sims))
    full = retrieval.ranks(q, g, chunk_size=1000)
    assert full.tolist() == brute
    assert retrieval.ranks(q, g, chunk_size=3).tolist() == brute
    for k in (1, 5, 10):
        assert retrieval.recall_at(full, k) == pytest.approx(np.mean(np.array(brute) <= k))
    assert retrieval.median_rank(full) == np.median(brute)


# --------------------------------------------------------------------------- report


def test_results_writer_nan_and_ci_cells(tmp_path):
    results = {"a": float("nan"), "b": np.float32(0.5), "c": {"value": 0.8, "ci": [0.7, 0.9]}}
    table = report.Table("T", ["x", "y"], [["a", results["a"]], ["c", results["c"]]])
    report.write_results(tmp_path, results, "Title", [table])
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert loaded["a"] is None and loaded["b"] == 0.5
    text = (tmp_path / "results.md").read_text()
    assert "| a | n/a |" in text and "| c | 0.800 [0.700, 0.900] |" in text
