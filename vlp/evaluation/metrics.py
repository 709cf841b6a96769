"""Classification and ranking metrics with seeded bootstrap 95% confidence intervals.

Point estimates are scikit-learn's (``roc_auc_score``, ``f1_score``, ``accuracy_score``,
``balanced_accuracy_score``). Confidence intervals are percentile bootstraps over the
evaluation samples (Efron & Tibshirani 1993): ``n`` resamples of the sample indices drawn
with replacement from ``numpy.random.default_rng(seed)``, the metric recomputed on each,
and the 2.5th/97.5th percentiles reported. Resamples on which a metric is undefined (an
AUROC with one class only) are dropped and counted (``ci_dropped``).

For AUROC the resamples use :func:`fast_auroc`, the Mann–Whitney U statistic on midranks,
which equals scikit-learn's trapezoidal ROC area exactly (ties included) and is ~50×
cheaper per call.

Edema severity (Chauhan et al., MICCAI 2020; Liao et al., MICCAI 2021): ordinal AUCs
``0v123``, ``01v23``, ``012v3`` from ``P(sev ≥ k) = Σ_{c≥k} p_c`` of a 4-class softmax, and
pairwise AUCs ``ivj`` on the expected severity ``E[sev] = Σ c·p_c`` restricted to classes
i and j (:func:`ordinal_aucs`, :func:`pairwise_aucs`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

#: Ordinal edema splits: name -> k, positives are severities >= k.
ORDINAL_SPLITS = {"0v123": 1, "01v23": 2, "012v3": 3}
SEVERITY_PAIRS = tuple((i, j) for i in range(4) for j in range(i + 1, 4))


class MetricUndefined(ValueError):
    """The metric has no value on these samples (e.g. AUROC with a single class)."""


# --------------------------------------------------------------------------- point metrics


def _binary_arrays(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=float).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("binary labels must be 0 or 1 (drop uncertain/blank labels first)")
    return y, s


def auroc(y_true, scores) -> float:
    """scikit-learn's ROC AUC; raises :class:`MetricUndefined` when one class is missing."""
    y, s = _binary_arrays(y_true, scores)
    if y.size == 0 or y.min() == y.max():
        raise MetricUndefined(
            "AUROC needs both classes, got " + (f"only {int(y[0])}" if y.size else "no samples")
        )
    return float(roc_auc_score(y, s))


def fast_auroc(y_true, scores) -> float:
    """AUROC as the Mann–Whitney statistic on midranks (equals :func:`auroc`)."""
    y, s = _binary_arrays(y_true, scores)
    positives = int(y.sum())
    negatives = y.shape[0] - positives
    if positives == 0 or negatives == 0:
        raise MetricUndefined("AUROC needs both classes")
    ranks = rankdata(s)
    u = ranks[y == 1].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def _nonempty(y_true) -> np.ndarray:
    y = np.asarray(y_true)
    if y.shape[0] == 0:
        raise MetricUndefined("no labelled samples")
    return y


def f1(y_true, y_pred) -> float:
    return float(f1_score(_nonempty(y_true), np.asarray(y_pred), zero_division=0))


def accuracy(y_true, y_pred) -> float:
    return float(accuracy_score(_nonempty(y_true), np.asarray(y_pred)))


def macro_f1(y_true, y_pred, labels=None) -> float:
    return float(
        f1_score(
            np.asarray(y_true), np.asarray(y_pred), average="macro", labels=labels, zero_division=0
        )
    )


def macro_accuracy(y_true, y_pred) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (scikit-learn's balanced
    accuracy), MS-CXR-T's macro-accuracy."""
    with warnings.catch_warnings():
        # Predictions of a class absent from y_true (common in bootstrap resamples) are
        # simply wrong predictions; sklearn's warning about them is noise here.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(np.asarray(y_true), np.asarray(y_pred)))


def f1_threshold(y_true, scores) -> float:
    """The score threshold (predict positive when ``score >= t``) maximising F1.

    Candidates are the distinct scores; ties in F1 go to the highest threshold.
    """
    y, s = _binary_arrays(y_true, scores)
    if y.sum() == 0:
        raise MetricUndefined("no positive sample to choose an F1 threshold on")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    true_pos = np.cumsum(y_sorted)
    predicted = np.arange(1, len(y) + 1)
    # Only the last index of each run of equal scores is a realisable cut.
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    f1s = 2 * true_pos / (predicted + y.sum())
    f1s = np.where(last, f1s, -1.0)
    best = int(np.argmax(f1s))  # first maximum = highest threshold
    return float(s_sorted[best])


# --------------------------------------------------------------------------- edema


def _severity_arrays(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[1] != 4 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be N×4 for N={y.shape[0]} labels, got {p.shape}")
    if not np.isin(y, (0, 1, 2, 3)).all():
        raise ValueError("edema severities must be 0-3 (drop unknown -1 first)")
    return y, p


def ordinal_aucs(y_true, probs, auc: Callable = auroc) -> dict[str, float]:
    """AUCs of ``P(sev ≥ k)`` for the splits 0v123, 01v23, 012v3 (NaN when undefined)."""
    y, p = _severity_arrays(y_true, probs)
    out = {}
    for name, k in ORDINAL_SPLITS.items():
        try:
            out[name] = auc((y >= k).astype(float), p[:, k:].sum(1))
        except MetricUndefined:
            out[name] = float("nan")
    return out


def expected_severity(probs) -> np.ndarray:
    p = np.asarray(probs, dtype=float)
    return p @ np.arange(p.shape[1], dtype=float)


def pairwise_aucs(y_true, probs, auc: Callable = auroc) -> dict[str, float]:
    """AUCs of the expected severity between each pair of classes i < j (NaN when empty)."""
    y, p = _severity_arrays(y_true, probs)
    score = expected_severity(p)
    out = {}
    for i, j in SEVERITY_PAIRS:
        keep = (y == i) | (y == j)
        try:
            out[f"{i}v{j}"] = auc((y[keep] == j).astype(float), score[keep])
        except MetricUndefined:
            out[f"{i}v{j}"] = float("nan")
    return out


# --------------------------------------------------------------------------- bootstrap


def bootstrap_indices(n_samples: int, n_resamples: int, seed: int) -> np.ndarray:
    """``n_resamples × n_samples`` indices drawn with replacement (one generator call)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_samples, size=(n_resamples, n_samples))


def bootstrap_ci(
    metric: Callable[..., float],
    *arrays,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[list[float], int]:
    """Percentile CI of ``metric(*arrays)`` over bootstrap resamples of the rows.

    Returns ``([low, high], dropped)``; ``dropped`` counts resamples where the metric was
    undefined (:class:`MetricUndefined`) or NaN. ``[nan, nan]`` when ``n_resamples`` is 0 or
    every resample was dropped.
    """
    arrays = [np.asarray(a) for a in arrays]
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(f"bootstrap arrays differ in length: {[a.shape[0] for a in arrays]}")
    if n_resamples <= 0 or n == 0:
        return [float("nan"), float("nan")], 0
    values = []
    dropped = 0
    for rows in bootstrap_indices(n, n_resamples, seed):
        try:
            value = metric(*(a[rows] for a in arrays))
        except MetricUndefined:
            dropped += 1
            continue
        if np.isnan(value):
            dropped += 1
            continue
        values.append(value)
    if not values:
        return [float("nan"), float("nan")], dropped
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [float(low), float(high)], dropped


def with_ci(
    metric: Callable[..., float],
    *arrays,
    n_resamples: int = 1000,
    seed: int = 0,
    ci_metric: Callable[..., float] | None = None,
) -> dict:
    """``{"value", "ci": [lo, hi], "n", "ci_dropped"}``; value NaN when undefined.

    ``ci_metric`` (same result as ``metric``, e.g. :func:`fast_auroc`) is used for the
    resamples when given.
    """
    n = int(np.asarray(arrays[0]).shape[0])
    try:
        value = float(metric(*arrays))
    except MetricUndefined as exc:
        return {"value": float("nan"), "ci": [float("nan")] * 2, "n": n, "undefined": str(exc)}
    ci, dropped = bootstrap_ci(ci_metric or metric, *arrays, n_resamples=n_resamples, seed=seed)
    return {"value": value, "ci": ci, "n": n, "ci_dropped": dropped}


def auroc_with_ci(y_true, scores, n_resamples: int = 1000, seed: int = 0) -> dict:
    """AUROC (scikit-learn) with a bootstrap CI (fast midrank AUROC on the resamples)."""
    y, s = _binary_arrays(y_true, scores)
    return with_ci(auroc, y, s, n_resamples=n_resamples, seed=seed, ci_metric=fast_auroc)


def mean_auroc(labels, scores) -> float:
    """Mean over columns of the AUROC of ``scores[:, k]`` on the rows labelled 1 or 0 in
    ``labels[:, k]`` (CheXpert values; -1 and NaN excluded); columns with NaN scores, or
    without both classes, are left out. Raises :class:`MetricUndefined` if none is left."""
    labels, scores = np.asarray(labels, dtype=float), np.asarray(scores, dtype=float)
    values = []
    for k in range(labels.shape[1]):
        mask, y = binary_labels(labels[:, k])
        mask &= ~np.isnan(scores[:, k])
        y = labels[mask, k]
        if y.size and y.min() != y.max():
            values.append(fast_auroc(y, scores[mask, k]))
    if not values:
        raise MetricUndefined("no column with both classes")
    return float(np.mean(values))


def mean_auroc_with_ci(labels, scores, n_resamples: int = 1000, seed: int = 0) -> dict:
    """:func:`mean_auroc` with a bootstrap CI over rows (studies resampled jointly for all
    columns, so the interval reflects the mean, not each AUROC alone)."""
    return with_ci(mean_auroc, labels, scores, n_resamples=n_resamples, seed=seed)


def binary_labels(column) -> tuple[np.ndarray, np.ndarray]:
    """CheXpert column → ``(mask, y)``: rows labelled 1 or 0 and their 0/1 values.

    Uncertain (-1) and blank (NaN) rows are excluded; evaluators state this rule.
    """
    column = np.asarray(column, dtype=float)
    mask = (column == 1.0) | (column == 0.0)
    return mask, column[mask]
