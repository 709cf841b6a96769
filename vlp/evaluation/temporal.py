"""Temporal progression classification (MS-CXR-T style) from current and prior embeddings.

Bannur et al., CVPR 2023 (BioViL-T) define MS-CXR-T: per finding (consolidation, edema,
pleural effusion, pneumonia, pneumothorax), whether it is improving, stable or worsening
between a study and its prior. Following Med-ST's protocol (Yang et al., ICML 2024,
``temporal_test.py``): the feature of a pair is ``[emb(current), emb(prior)]`` (global image
embeddings of the frozen encoder), the classifier a linear SVM (scikit-learn ``LinearSVC``
on standardised features, solved to its optimum: :func:`cross_validated_predictions`), and
the score the k-fold cross-validated macro-accuracy (mean per-class recall) per finding,
over the studies of ``data`` that have a prior and a progression label. Folds are
stratified and seeded; k is ``folds`` (Med-ST: 5 and 10), lowered to the smallest class
count when a class has fewer studies (at least 2). The CI is a bootstrap over the
out-of-fold predictions; the mean over findings has its own, from one bootstrap over the
studies shared by every finding (findings of one study resample together, since their
predictions come from the same embeddings).

``embedding="current"`` gives the SVM the current study's embedding alone, on the same
studies: a single-image encoder then sees nothing of the prior and reads progression only
through what the present state implies, while a multi-image encoder (BioViL-T's, Bannur et
al. 2023, whose fused embedding is meant to carry the change itself) sees its fusion of
the two. The gap between the two settings is what the fused embedding holds of the change.

Needs shards converted with ``--priors 1`` (the ``prior1.frontal.jpg`` member).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from vlp.data.schema import PROGRESSION_CLASSES, PROGRESSION_FINDINGS
from vlp.evaluation import figures as plots
from vlp.evaluation import metrics
from vlp.evaluation.evaluators import TEMPORAL_EMBEDDINGS
from vlp.evaluation.features import EvaluationInputError, cache_folder, extract_features
from vlp.evaluation.report import Table, write_results

#: per-study targets and out-of-fold predictions (-1: unlabelled or undefined), written
#: beside ``results.json``.
PREDICTIONS = "predictions.npz"


def progression_targets(meta: list[dict], prior_mask: np.ndarray, finding: str):
    """Rows with a prior and a progression label for ``finding``, and class indices."""
    rows, targets = [], []
    for i, record in enumerate(meta):
        progression = ((record.get("labels") or {}).get("progression")) or {}
        label = progression.get(finding)
        if label is None or not prior_mask[i]:
            continue
        if label not in PROGRESSION_CLASSES:
            raise ValueError(
                f"study {record.get('study_id')}: progression[{finding!r}] = {label!r}, "
                f"expected one of {PROGRESSION_CLASSES}"
            )
        rows.append(i)
        targets.append(PROGRESSION_CLASSES.index(label))
    return np.asarray(rows, dtype=int), np.asarray(targets, dtype=int)


def cross_validated_predictions(x, y, folds: int, seed: int) -> tuple[np.ndarray, int, int]:
    """Out-of-fold LinearSVC predictions; returns ``(predictions, folds used, folds whose
    SVM did not converge)``.

    The SVM (squared hinge, L2, C = 1: scikit-learn's default, as Med-ST uses it) is solved
    in the primal (liblinear's trust-region Newton, ``dual=False``). Its optimum is unique,
    so the solver does not change the classifier, only whether it is reached: with more
    feature dimensions than pairs (1536-d pairs of 768-d embeddings, a few hundred pairs per
    finding) the default dual coordinate descent stopped at 10 000 iterations on 23 of 25
    folds of the learning benchmark's CLIP arm and took 13× longer (273 s against 21 s).
    A fold that still stops at the limit is counted in the results, not warned."""
    counts = np.bincount(y, minlength=len(PROGRESSION_CLASSES))
    present = counts[counts > 0]
    # A finding without any labelled pair is undefined too (not a numpy error).
    k = int(min(folds, present.min())) if present.size else 0
    if k < 2 or present.size < 2:
        raise metrics.MetricUndefined(
            f"need two classes with >= 2 studies each, got counts {counts.tolist()}"
        )
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    model = make_pipeline(
        StandardScaler(), LinearSVC(dual=False, random_state=seed, max_iter=10000)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        predicted = cross_val_predict(model, x, y, cv=splitter)
    unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return predicted, k, unconverged


def mean_macro_accuracy(targets: np.ndarray, predictions: np.ndarray) -> float:
    """Mean over findings (columns) of the macro-accuracy on the rows labelled for each;
    ``targets`` is -1 where a study has no label for a finding. Columns without a label
    are left out; raises :class:`metrics.MetricUndefined` when none is left."""
    values = [
        metrics.macro_accuracy(targets[labelled, k], predictions[labelled, k])
        for k in range(targets.shape[1])
        if (labelled := targets[:, k] >= 0).any()
    ]
    if not values:
        raise metrics.MetricUndefined("no finding has a labelled study")
    return float(np.mean(values))


def evaluate(
    model,
    data,
    out,
    *,
    folds: int = 5,
    figures: bool = False,
    seed: int = 0,
    bootstrap: int = 1000,
    batch_size: int = 32,
    cache_dir=None,
    embedding: str = "pair",
) -> dict:
    """Cross-validated progression macro-accuracy per finding; writes results into ``out``.

    ``embedding`` is ``pair`` ([current, prior]) or ``current`` (module docstring).

    Features are cached in ``cache_dir`` (default ``out/cache``), keyed by the model's
    weights and the data, so evaluators sharing a cache folder extract them once.
    """
    if embedding not in TEMPORAL_EMBEDDINGS:
        raise EvaluationInputError(
            f"temporal: embedding must be one of {sorted(TEMPORAL_EMBEDDINGS)}, got {embedding!r}"
        )
    out = Path(out)
    feats = extract_features(
        model,
        data,
        batch_size=batch_size,
        priors=True,
        cache_dir=cache_folder(out, cache_dir),
        desc="temporal features",
    )
    if not feats.prior_mask.any():
        raise ValueError(
            f"{data}: no study has a prior1.frontal.jpg; convert the shards with --priors 1"
        )
    if embedding == "pair":
        inputs = np.concatenate([feats.image_global, feats.prior_global], 1)
    else:
        inputs = feats.image_global
    results: dict = {
        "task": "temporal",
        "data": str(data),
        "samples": len(feats),
        "with_prior": int(feats.prior_mask.sum()),
        "skipped_samples": feats.skipped,
        "embedding": embedding,
        "protocol": f"LinearSVC on standardised {TEMPORAL_EMBEDDINGS[embedding]} global "
        f"embeddings, stratified {folds}-fold CV (seed {seed}), macro-accuracy",
        "seed": seed,
        "bootstrap": bootstrap,
        "macro_accuracy": {},
        "counts": {},
        "folds": {},
        "folds_not_converged": {},
    }
    rows, confusions = [], {}
    # Study × finding targets and out-of-fold predictions (-1: unlabelled or undefined),
    # for the mean's joint bootstrap.
    all_targets = np.full((len(inputs), len(PROGRESSION_FINDINGS)), -1)
    all_predicted = np.full_like(all_targets, -1)
    for column, finding in enumerate(PROGRESSION_FINDINGS):
        sel, y = progression_targets(feats.meta, feats.prior_mask, finding)
        counts = {c: int((y == k).sum()) for k, c in enumerate(PROGRESSION_CLASSES)}
        results["counts"][finding] = counts
        try:
            predicted, k, unconverged = cross_validated_predictions(inputs[sel], y, folds, seed)
        except metrics.MetricUndefined as exc:
            results["macro_accuracy"][finding] = {
                "value": float("nan"),
                "ci": [float("nan")] * 2,
                "n": int(y.size),
                "undefined": str(exc),
            }
            rows.append([finding, *counts.values(), "", results["macro_accuracy"][finding]])
            continue
        results["folds"][finding] = k
        results["folds_not_converged"][finding] = unconverged
        all_targets[sel, column], all_predicted[sel, column] = y, predicted
        results["macro_accuracy"][finding] = metrics.with_ci(
            metrics.macro_accuracy, y, predicted, n_resamples=bootstrap, seed=seed
        )
        rows.append([finding, *counts.values(), k, results["macro_accuracy"][finding]])
        classes = range(len(PROGRESSION_CLASSES))
        confusions[finding] = np.array(
            [[int(((y == t) & (predicted == p)).sum()) for p in classes] for t in classes]
        )
    labelled = (all_targets >= 0).any(1)
    mean = metrics.with_ci(
        mean_macro_accuracy,
        all_targets[labelled],
        all_predicted[labelled],
        n_resamples=bootstrap,
        seed=seed,
    )
    results["mean_macro_accuracy"] = mean["value"]
    results["mean_macro_accuracy_ci"] = mean["ci"]
    # Per-study targets and out-of-fold predictions, so that two encoders evaluated on the
    # same studies can be compared paired (``paired_difference``).
    out.mkdir(parents=True, exist_ok=True)
    np.savez(
        out / PREDICTIONS,
        study_id=np.array([int(m["study_id"]) for m in feats.meta]),
        targets=all_targets,
        predictions=all_predicted,
        findings=np.array(PROGRESSION_FINDINGS),
    )
    rows.append(["mean", "", "", "", "", mean])
    tables = [
        Table(
            "Progression classification (cross-validated)",
            ["finding", *PROGRESSION_CLASSES, "folds", "macro-accuracy"],
            rows,
            note=results["protocol"] + "; chance macro-accuracy is 1/(classes present).",
        )
    ]
    results["confusion"] = {f: m.tolist() for f, m in confusions.items()}  # rows true
    if figures and confusions:
        out.mkdir(parents=True, exist_ok=True)
        path = plots.confusion_matrices(
            confusions, list(PROGRESSION_CLASSES), out / "confusion.png"
        )
        results["figures"] = {"confusion": str(path)}
    write_results(out, results, "Temporal progression", tables)
    return results


def paired_difference(baseline, other, *, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Mean macro-accuracy of ``other`` minus ``baseline``, two ``vlp eval temporal`` output
    folders of the same studies (two encoders on the same shards), with an interval from
    one bootstrap over the studies that resamples both together.

    Paired, the encoders' shared difficulty (which studies are hard) cancels, so the
    interval of the difference is narrower than the two intervals side by side suggest;
    it is the interval to read when asking whether one encoder beats the other.
    """
    loaded = []
    for folder in (baseline, other):
        path = Path(folder) / PREDICTIONS
        if not path.is_file():
            raise EvaluationInputError(
                f"{path}: missing; run `vlp eval temporal` into {folder} (it writes the "
                "per-study predictions a paired comparison needs)"
            )
        with np.load(path) as saved:
            loaded.append({key: saved[key] for key in saved.files})
    a, b = loaded
    for key in ("study_id", "targets", "findings"):
        if a[key].shape != b[key].shape or (a[key] != b[key]).any():
            raise EvaluationInputError(
                f"{baseline} and {other}: their {key} differ; a paired comparison needs both "
                "encoders evaluated on the same shards"
            )
    labelled = (a["targets"] >= 0).any(1)
    targets, base, new = (
        a["targets"][labelled],
        a["predictions"][labelled],
        b["predictions"][labelled],
    )

    def difference(t, p_base, p_new):
        return mean_macro_accuracy(t, p_new) - mean_macro_accuracy(t, p_base)

    return metrics.with_ci(difference, targets, base, new, n_resamples=bootstrap, seed=seed)
