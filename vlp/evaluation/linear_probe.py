"""Linear probe of a frozen image encoder on CheXpert labels (and optional fine-tuning).

Protocol (after MGCA's ``--data_pct`` probes, Wang et al., NeurIPS 2022, with scikit-learn's
logistic regression in place of their SGD head):

* Global image features of the train, validation and test splits are extracted once from
  the frozen encoder and cached (``out/cache``, keyed by weights and data fingerprints).
* Label fractions 1%, 10%, 100%: the training *studies* are subsampled once per fraction
  with ``numpy.random.default_rng(seed)`` (at least two studies), the same subset for all
  labels.
* Per label, the rows labelled 1 or 0 are used (uncertain −1 and blank excluded); features
  are standardised on the training subset; ``LogisticRegression(solver="lbfgs")`` is fitted
  for each C in :data:`C_GRID` and the C with the best validation AUROC is kept (C = 1 when
  the validation split has no usable labels for it). Test AUROC with a bootstrap 95% CI,
  and accuracy at the probe's own 0.5 threshold (mean over the labels with a probe).
* ``random_init=True`` repeats everything with a randomly initialised copy of the encoder
  (same architecture, PyTorch default initialisers), the usual "is pretraining worth
  anything" baseline.
* ``finetune=True`` also trains encoder + linear head end to end with a plain PyTorch loop
  (AdamW, masked binary cross-entropy over the labelled entries, no augmentation, 100% of
  the training studies, ``finetune_epochs`` epochs) and reports its test AUROC. It is a
  small baseline loop, not a tuned fine-tuning recipe.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from vlp.data.schema import CHEXPERT_LABELS
from vlp.evaluation import figures as plots
from vlp.evaluation import metrics
from vlp.evaluation.features import (
    cache_folder,
    eval_loader,
    extract_features,
    image_features,
    model_device,
    model_of,
    progress,
    random_init_copy,
    resolve_split,
)
from vlp.evaluation.report import Table, write_results

FRACTIONS = (0.01, 0.1, 1.0)
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def fraction_name(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def subsample(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded ``fraction`` of ``n`` studies (at least 2)."""
    count = min(n, max(2, int(math.ceil(fraction * n))))
    return np.sort(np.random.default_rng(seed).permutation(n)[:count])


def fit_probe(x_train, y_train, x_val=None, y_val=None, seed: int = 0):
    """Standardise, fit logistic regression for each C, keep the best by validation AUROC.

    Returns ``(predict_scores, C, rule)``; ``predict_scores(x)`` gives decision scores.
    """
    scaler = StandardScaler().fit(x_train)
    xt = scaler.transform(x_train)
    usable_val = y_val is not None and y_val.size and 0 < y_val.sum() < y_val.size
    best = (None, -1.0, 1.0)
    candidates = C_GRID if usable_val else (1.0,)
    for c in candidates:
        clf = LogisticRegression(C=c, solver="lbfgs", max_iter=1000, random_state=seed)
        clf.fit(xt, y_train)
        if not usable_val:
            best = (clf, float("nan"), c)
            break
        score = metrics.fast_auroc(y_val, clf.decision_function(scaler.transform(x_val)))
        if score > best[1]:
            best = (clf, score, c)
    clf, _, c = best
    rule = "best validation AUROC" if usable_val else "C=1 (no usable validation labels)"
    return (lambda x: clf.decision_function(scaler.transform(x))), c, rule


def probe_labels(train, val, test, fraction, seed, bootstrap, labels=CHEXPERT_LABELS) -> dict:
    """Per-label test AUROC of probes trained on ``fraction`` of ``train``."""
    rows = subsample(len(train), fraction, seed)
    x_train, y_all = train.image_global[rows], train.labels[rows]
    result = {"train_studies": int(rows.size), "auroc": {}, "accuracy": {}, "C": {}, "curves": {}}
    score_matrix = np.full(test.labels.shape, np.nan)  # test scores of every probe
    for name in labels:
        j = CHEXPERT_LABELS.index(name)
        mask, y = metrics.binary_labels(y_all[:, j])
        test_mask, y_test = metrics.binary_labels(test.labels[:, j])
        if y.size == 0 or y.min() == y.max():
            result["auroc"][name] = _undefined(y_test.size, "training subset has one class")
            continue
        if y_test.size == 0 or y_test.min() == y_test.max():
            result["auroc"][name] = _undefined(y_test.size, "test split has one class")
            continue
        x_val = y_val = None
        if val is not None:
            val_mask, y_val = metrics.binary_labels(val.labels[:, j])
            x_val = val.image_global[val_mask]
        predict, c, rule = fit_probe(x_train[mask], y, x_val, y_val, seed)
        score = predict(test.image_global[test_mask])
        score_matrix[test_mask, j] = score
        result["auroc"][name] = metrics.auroc_with_ci(y_test, score, bootstrap, seed)
        # Accuracy at the probe's own threshold (probability 0.5: decision score 0).
        result["accuracy"][name] = float(np.mean((score > 0) == (y_test > 0.5)))
        result["C"][name] = {"value": c, "rule": rule}
        result["curves"][name] = (y_test, score, result["auroc"][name]["value"])
    defined = [v["value"] for v in result["auroc"].values() if not math.isnan(v["value"])]
    result["mean_auroc"] = float(np.mean(defined)) if defined else float("nan")
    result["mean_auroc_ci"] = metrics.mean_auroc_with_ci(test.labels, score_matrix, bootstrap, seed)
    accuracies = list(result["accuracy"].values())
    result["mean_accuracy"] = float(np.mean(accuracies)) if accuracies else float("nan")
    return result


def _undefined(n: int, reason: str) -> dict:
    return {"value": float("nan"), "ci": [float("nan")] * 2, "n": int(n), "undefined": reason}


def finetune_auroc(
    model,
    train_data,
    test_data,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    bootstrap: int,
    lr: float = 1e-4,
) -> dict:
    """Encoder + linear head trained end to end (module docstring); per-label test AUROC."""
    torch.manual_seed(seed)
    net = copy.deepcopy(model).train()
    device = model_device(net)
    head = torch.nn.Linear(model_of(net).dims.embed_dim, len(CHEXPERT_LABELS)).to(device)
    params = model_of(net).image_parameters() + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    for epoch in range(epochs):
        loader = eval_loader(net, train_data, batch_size=batch_size)
        for batch in progress(loader, train_data, batch_size, f"finetune epoch {epoch + 1}"):
            labels = batch["labels"][:, 0].to(device)
            known = (labels == 0) | (labels == 1)
            if not bool(known.any()):
                continue
            logits = head(image_features(net, batch, device)["image_global"])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[known], labels[known]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    scores, labels = [], []
    with torch.no_grad():
        loader = eval_loader(net, test_data, batch_size=batch_size)
        for batch in progress(loader, test_data, batch_size, "finetune test"):
            out = head(image_features(net, batch, device)["image_global"])
            scores.append(out.float().cpu().numpy())
            labels.append(batch["labels"][:, 0].numpy())
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    result = {"epochs": epochs, "lr": lr, "auroc": {}, "accuracy": {}}
    for j, name in enumerate(CHEXPERT_LABELS):
        mask, y = metrics.binary_labels(labels[:, j])
        result["auroc"][name] = metrics.auroc_with_ci(y, scores[mask, j], bootstrap, seed)
        if y.size:
            result["accuracy"][name] = float(np.mean((scores[mask, j] > 0) == (y > 0.5)))
    defined = [v["value"] for v in result["auroc"].values() if not math.isnan(v["value"])]
    result["mean_auroc"] = float(np.mean(defined)) if defined else float("nan")
    accuracies = list(result["accuracy"].values())
    result["mean_accuracy"] = float(np.mean(accuracies)) if accuracies else float("nan")
    return result


def evaluate(
    model,
    data,
    out,
    *,
    train_data="auto",
    val_data="auto",
    fractions=FRACTIONS,
    random_init: bool = False,
    finetune: bool = False,
    finetune_epochs: int = 2,
    figures: bool = False,
    seed: int = 0,
    bootstrap: int = 1000,
    batch_size: int = 32,
    cache_dir=None,
) -> dict:
    """Linear probes at each label fraction; writes results into ``out``.

    Features are cached in ``cache_dir`` (default ``out/cache``), keyed by the model's
    weights and the data, so evaluators sharing a cache folder extract them once.
    """
    out = Path(out)
    train_data = resolve_split(data, train_data, "train", required=True)
    val_data = resolve_split(data, val_data, "validate", required=False)
    cache = cache_folder(out, cache_dir)
    encoders = {"pretrained": model}
    if random_init:
        encoders["random_init"] = random_init_copy(model, seed)
    results: dict = {
        "task": "linear-probe",
        "data": str(data),
        "train_data": train_data,
        "validation_data": val_data,
        "fractions": [fraction_name(f) for f in fractions],
        "seed": seed,
        "bootstrap": bootstrap,
        "label_rule": "per label, studies labelled 1 or 0; uncertain (-1) and blank excluded",
        "C_grid": list(C_GRID),
    }
    tables, curves_for_figure = [], {}
    for encoder_name, encoder in encoders.items():
        splits = {
            name: extract_features(
                encoder,
                path,
                batch_size=batch_size,
                cache_dir=cache,
                desc=f"{encoder_name} features: {name}",
            )
            if path is not None
            else None
            for name, path in (("train", train_data), ("validate", val_data), ("test", data))
        }
        per_fraction = {}
        for fraction in fractions:
            probe = probe_labels(
                splits["train"], splits["validate"], splits["test"], fraction, seed, bootstrap
            )
            if encoder_name == "pretrained":
                curves_for_figure[fraction_name(fraction)] = probe.pop("curves")
            else:
                probe.pop("curves")
            per_fraction[fraction_name(fraction)] = probe
        results[encoder_name] = {
            "auroc": {k: v["auroc"] for k, v in per_fraction.items()},
            "mean_auroc": {k: v["mean_auroc"] for k, v in per_fraction.items()},
            "mean_auroc_ci": {k: v["mean_auroc_ci"] for k, v in per_fraction.items()},
            "accuracy": {k: v["accuracy"] for k, v in per_fraction.items()},
            "mean_accuracy": {k: v["mean_accuracy"] for k, v in per_fraction.items()},
            "train_studies": {k: v["train_studies"] for k, v in per_fraction.items()},
            "C": {k: v["C"] for k, v in per_fraction.items()},
            "samples": {k: len(v) for k, v in splits.items() if v is not None},
            "skipped_samples": {k: v.skipped for k, v in splits.items() if v is not None},
        }
    results["auroc"] = results["pretrained"]["auroc"]
    results["mean_auroc"] = results["pretrained"]["mean_auroc"]
    fraction_keys = [fraction_name(f) for f in fractions]
    for encoder_name in encoders:
        block = results[encoder_name]
        rows = [
            [name] + [block["auroc"][k][name] for k in fraction_keys] for name in CHEXPERT_LABELS
        ]
        rows.append(["mean"] + [block["mean_auroc"][k] for k in fraction_keys])
        rows.append(["mean accuracy"] + [block["mean_accuracy"][k] for k in fraction_keys])
        rows.append(["training studies"] + [block["train_studies"][k] for k in fraction_keys])
        tables.append(
            Table(
                f"Linear probe AUROC, {encoder_name.replace('_', ' ')} encoder",
                ["label"] + [f"{k} labels" for k in fraction_keys],
                rows,
                note=results["label_rule"] + "; C chosen on validation AUROC.",
            )
        )
    if finetune:
        results["finetune"] = finetune_auroc(
            model,
            train_data,
            data,
            epochs=finetune_epochs,
            batch_size=batch_size,
            seed=seed,
            bootstrap=bootstrap,
        )
        rows = [[n, results["finetune"]["auroc"][n]] for n in CHEXPERT_LABELS]
        rows.append(["mean", results["finetune"]["mean_auroc"]])
        rows.append(["mean accuracy", results["finetune"]["mean_accuracy"]])
        tables.append(
            Table(
                "Fine-tuned encoder + linear head (100% labels)",
                ["label", "AUROC"],
                rows,
                note=f"plain PyTorch loop, AdamW lr {results['finetune']['lr']}, "
                f"{finetune_epochs} epochs, no augmentation",
            )
        )
    if figures:
        out.mkdir(parents=True, exist_ok=True)
        results["figures"] = {}
        for key, curves in curves_for_figure.items():
            path = out / f"linear_probe_roc_{key.rstrip('%')}pct.png"
            plots.roc_curves(curves, path, f"Linear probe ROC, {key} labels")
            results["figures"][key] = str(path)
    write_results(out, results, "Linear probe", tables)
    return results
