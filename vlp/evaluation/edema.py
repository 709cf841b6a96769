"""Pulmonary edema severity (0–3) from frozen image features: the Chauhan/Liao protocol.

Chauhan et al., MICCAI 2020 ("Joint modeling of chest radiographs and radiology reports
for pulmonary edema assessment") and Liao et al., MICCAI 2021 evaluate a 4-class severity
classifier (0 none, 1 vascular congestion, 2 interstitial, 3 alveolar) with

* ordinal AUCs 0v123, 01v23, 012v3 on ``P(sev ≥ k) = Σ_{c≥k} p_c`` of the softmax,
* pairwise AUCs on the expected severity ``E[sev] = Σ c·p_c``,
* accuracy and macro-F1 of the argmax.

Here the classifier is a multinomial logistic regression (scikit-learn, L-BFGS) on
standardised global image features of the frozen encoder; C is chosen on the validation
split by log-loss (C = 1 without a validation split). With ``classifier="objective"`` (or
an objective's name) it is instead the severity classifier the recipe trained itself (an
objective's :class:`vlp.objectives.base.LabelPredictor`: the joint model's image head,
M2's q(y|x)), applied to the same cached features; no probe is fitted. Studies with
unknown severity are left out. Metrics use :mod:`vlp.evaluation.metrics`, with bootstrap 95% CIs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, log_loss
from sklearn.preprocessing import StandardScaler

from vlp.evaluation import figures as plots
from vlp.evaluation import metrics
from vlp.evaluation.features import cache_folder, extract_features, resolve_split
from vlp.evaluation.linear_probe import C_GRID
from vlp.evaluation.report import Table, write_results

CLASSES = (0, 1, 2, 3)
CLASS_NAMES = ("0 none", "1 vascular", "2 interstitial", "3 alveolar")


def _known(feats):
    keep = feats.edema_severity >= 0
    return feats.image_global[keep], feats.edema_severity[keep].astype(int)


def fit_severity(x, y, x_val=None, y_val=None, seed: int = 0):
    """Multinomial logistic regression; returns ``(predict_proba N×4, C, rule)``."""
    if len(set(y.tolist())) < 2:
        raise ValueError(f"edema: training split has a single severity class {sorted(set(y))}")
    scaler = StandardScaler().fit(x)
    xs = scaler.transform(x)

    def probs_of(clf, features):
        full = np.zeros((features.shape[0], 4))
        full[:, clf.classes_] = clf.predict_proba(scaler.transform(features))
        return full

    usable_val = y_val is not None and y_val.size > 0
    best = (None, math.inf, 1.0)
    for c in C_GRID if usable_val else (1.0,):
        clf = LogisticRegression(C=c, solver="lbfgs", max_iter=2000, random_state=seed).fit(xs, y)
        if not usable_val:
            best = (clf, math.nan, c)
            break
        # Classes unseen in training get probability 0; floor them so log-loss stays finite.
        probs = np.clip(probs_of(clf, x_val), 1e-12, 1.0)
        loss = log_loss(y_val, probs / probs.sum(1, keepdims=True), labels=list(CLASSES))
        if loss < best[1]:
            best = (clf, loss, c)
    clf, _, c = best
    rule = "lowest validation log-loss" if usable_val else "C=1 (no validation split)"
    return (lambda features: probs_of(clf, features)), c, rule


def objective_classifier(model, objective: str | None):
    """``features → N×4 probabilities`` of the recipe's own severity classifier, applied to
    the primary image encoder's cached global features."""
    import torch

    from vlp.evaluation.features import model_device, predictor_of

    found = predictor_of(model, "edema_severity", objective)
    if found.image_keys != ("image_global",) or found.classes != len(CLASSES):
        raise ValueError(
            f"edema --classifier: the objective's classifier reads {found.image_keys} with "
            f"{found.classes} classes; this evaluator has cached image_global and 4 classes"
        )
    device = model_device(model)

    @torch.no_grad()
    def predict(features: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(features, dtype=torch.float32, device=device)
        return found.probabilities({"image_global": x}).double().cpu().numpy()

    return predict


def severity_metrics(y, probs, bootstrap: int, seed: int) -> dict:
    """All edema metrics with bootstrap CIs (ordinal, pairwise, accuracy, macro-F1)."""
    predicted = probs.argmax(1)
    out = {"ordinal_auc": {}, "pairwise_auc": {}}
    for name in metrics.ORDINAL_SPLITS:
        out["ordinal_auc"][name] = metrics.with_ci(
            lambda t, p, n=name: metrics.ordinal_aucs(t, p, metrics.fast_auroc)[n],
            y,
            probs,
            n_resamples=bootstrap,
            seed=seed,
        )
        out["ordinal_auc"][name]["value"] = metrics.ordinal_aucs(y, probs)[name]
    for i, j in metrics.SEVERITY_PAIRS:
        name = f"{i}v{j}"
        out["pairwise_auc"][name] = metrics.with_ci(
            lambda t, p, n=name: metrics.pairwise_aucs(t, p, metrics.fast_auroc)[n],
            y,
            probs,
            n_resamples=bootstrap,
            seed=seed,
        )
        out["pairwise_auc"][name]["value"] = metrics.pairwise_aucs(y, probs)[name]
    out["accuracy"] = metrics.with_ci(
        metrics.accuracy, y, predicted, n_resamples=bootstrap, seed=seed
    )
    out["macro_f1"] = metrics.with_ci(
        lambda t, p: metrics.macro_f1(t, p, list(CLASSES)),
        y,
        predicted,
        n_resamples=bootstrap,
        seed=seed,
    )
    defined = [v["value"] for v in out["ordinal_auc"].values() if not math.isnan(v["value"])]
    out["mean_ordinal_auc"] = float(np.mean(defined)) if defined else float("nan")
    out["confusion"] = confusion_matrix(y, predicted, labels=list(CLASSES)).tolist()
    return out


def evaluate(
    model,
    data,
    out,
    *,
    train_data="auto",
    val_data="auto",
    figures: bool = False,
    seed: int = 0,
    bootstrap: int = 1000,
    batch_size: int = 32,
    cache_dir=None,
    classifier: str = "probe",
) -> dict:
    """Edema severity probe; writes results into ``out``.

    Features are cached in ``cache_dir`` (default ``out/cache``), keyed by the model's
    weights and the data, so evaluators sharing a cache folder extract them once.
    """
    out = Path(out)
    train_data = resolve_split(data, train_data, "train", required=True)
    val_data = resolve_split(data, val_data, "validate", required=False)
    cache = cache_folder(out, cache_dir)
    feats = {
        name: extract_features(
            model, path, batch_size=batch_size, cache_dir=cache, desc=f"edema features: {name}"
        )
        for name, path in (("train", train_data), ("validate", val_data), ("test", data))
        if path is not None
    }
    x, y = _known(feats["train"])
    x_val, y_val = _known(feats["validate"]) if "validate" in feats else (None, None)
    x_test, y_test = _known(feats["test"])
    if y_test.size == 0:
        raise ValueError(f"{data}: no study with a known edema severity")
    if classifier == "probe":
        predict, c, rule = fit_severity(x, y, x_val, y_val, seed)
        how = f"multinomial logistic regression on frozen features, C={c:g} ({rule})"
    else:
        predict = objective_classifier(model, None if classifier == "objective" else classifier)
        c, rule = None, "the recipe's own classifier"
        how = "the recipe's own severity classifier (no probe fitted)"
    probs = predict(x_test)
    results = {
        "task": "edema",
        "data": str(data),
        "train_data": train_data,
        "validation_data": val_data,
        "seed": seed,
        "bootstrap": bootstrap,
        "classifier": classifier,
        "C": {"value": c, "rule": rule},
        "counts": {
            split: {str(k): int((_known(f)[1] == k).sum()) for k in CLASSES}
            for split, f in feats.items()
        },
        "skipped_samples": {k: v.skipped for k, v in feats.items()},
        **severity_metrics(y_test, probs, bootstrap, seed),
    }
    rows = [[f"ordinal {k}", v] for k, v in results["ordinal_auc"].items()]
    rows += [[f"pairwise {k}", v] for k, v in results["pairwise_auc"].items()]
    rows += [
        ["accuracy", results["accuracy"]],
        ["macro-F1", results["macro_f1"]],
        ["mean ordinal AUC", results["mean_ordinal_auc"]],
    ]
    counts = results["counts"]["test"]
    tables = [
        Table(
            "Edema severity (test)",
            ["metric", "value [95% CI]"],
            rows,
            note=f"{how}; test counts per severity: {counts}; n/a = a class is missing.",
        ),
    ]
    if figures:
        out.mkdir(parents=True, exist_ok=True)
        path = plots.confusion_matrix(
            np.asarray(results["confusion"]),
            list(CLASS_NAMES),
            out / "edema_confusion.png",
            "Edema severity (test)",
        )
        curves = {
            name: (
                (y_test >= k).astype(float),
                probs[:, k:].sum(1),
                results["ordinal_auc"][name]["value"],
            )
            for name, k in metrics.ORDINAL_SPLITS.items()
            if not math.isnan(results["ordinal_auc"][name]["value"])
        }
        roc = plots.roc_curves(curves, out / "edema_ordinal_roc.png", "Edema ordinal ROC (test)")
        results["figures"] = {"confusion": str(path), "ordinal_roc": str(roc)}
    write_results(out, results, "Pulmonary edema severity", tables)
    return results
