"""Zero-shot classification from text prompts: binary per finding and a multi-class task.

Prompts come from a YAML file (the shipped ``prompts/chexpert.yaml`` or the user's; format
in that file). Images and prompts are compared by the model's scorer
(:func:`vlp.evaluation.features.scorer_of`; ``vlp.objectives.scoring``): for a contrastive
model the cosine of the global image embedding and the prompt embedding, with BioViL's
ensemble (Boecking et al., ECCV 2022: a class's prompt embeddings averaged unnormalised, the
mean L2-normalised, :func:`ensemble`); for a mutual-information model its trained critic
(for ``local_mi`` pooled over regions as in training, Liao et al., MICCAI 2021, Eq. 5),
which is not linear in the text embedding, so there the ensemble averages the per-prompt
scores. A binary finding's score is ``positive − negative``.

Binary tasks: studies labelled 1 or 0 for the finding (uncertain −1 and blank excluded);
AUROC with a bootstrap CI, and F1/accuracy at a threshold chosen to maximise F1 on the
validation split (``val_data``, by default the sibling ``validate/`` split); without one,
the rule is "positive when positive > negative" (threshold 0, as in BioViL and Med-ST), or
the median score for a class without negative prompts.

Multi-class task ("5×200" after GLoRIA, Huang et al., ICCV 2021): a study belongs to class
c when its label c is 1 and every other listed label is 0 or blank (studies with an
uncertain −1 on a listed label are excluded); up to ``per_class`` studies per class are
drawn with ``numpy.random.default_rng(seed)``. Prediction: argmax over classes of the
positive-prompt scores, each class's column z-scored over the task's studies first (as
GLoRIA does, so classes with larger score scales do not dominate).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from vlp.data.schema import CHEXPERT_LABELS
from vlp.evaluation import figures as plots
from vlp.evaluation import metrics
from vlp.evaluation.features import (
    EvaluationInputError,
    eval_loader,
    image_features,
    model_device,
    model_of,
    progress,
    scorer_of,
    sibling_split,
    text_embeddings,
)
from vlp.evaluation.report import Table, write_results
from vlp.objectives.scoring import CosineScorer

DEFAULT_PROMPTS = Path(__file__).parent / "prompts" / "chexpert.yaml"


# --------------------------------------------------------------------------- prompts


def load_prompts(path: str | os.PathLike | None = None) -> dict:
    """Read and validate a prompt YAML; errors name the file and the key."""
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read prompt YAML: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), dict) or not raw["classes"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'classes' mapping")
    classes = {}
    for name, entry in raw["classes"].items():
        where = f"{path}: classes.{name}"
        if name not in CHEXPERT_LABELS:
            raise ValueError(f"{where}: not a CheXpert label (expected one of {CHEXPERT_LABELS})")
        if not isinstance(entry, dict) or set(entry) - {"positive", "negative"}:
            raise ValueError(f"{where}: expected keys 'positive' and optionally 'negative'")
        lists = {}
        for polarity in ("positive", "negative"):
            prompts = entry.get(polarity, [])
            if not isinstance(prompts, list) or not all(
                isinstance(p, str) and p.strip() for p in prompts
            ):
                raise ValueError(f"{where}.{polarity}: expected a list of non-empty strings")
            lists[polarity] = [p.strip() for p in prompts]
        if not lists["positive"]:
            raise ValueError(f"{where}.positive: needs at least one prompt")
        classes[name] = lists
    multiclass = raw.get("multiclass")
    if multiclass is not None:
        where = f"{path}: multiclass"
        if not isinstance(multiclass, dict) or not isinstance(multiclass.get("classes"), list):
            raise ValueError(f"{where}: expected a mapping with a 'classes' list")
        missing = [c for c in multiclass["classes"] if c not in classes]
        if missing or len(multiclass["classes"]) < 2:
            raise ValueError(f"{where}.classes: need >= 2 classes, all under classes: ({missing})")
        per_class = multiclass.get("per_class", 200)
        if not isinstance(per_class, int) or per_class < 1:
            raise ValueError(f"{where}.per_class: expected a positive integer, got {per_class!r}")
        multiclass = {
            "name": str(multiclass.get("name", "multiclass")),
            "classes": list(multiclass["classes"]),
            "per_class": per_class,
        }
    return {"source": str(path), "classes": classes, "multiclass": multiclass}


def prompt_columns(prompts: dict) -> list[tuple[str, str, str]]:
    """(class, polarity, prompt) of every prompt, in the order the scorer's columns take."""
    columns = []
    for name, entry in prompts["classes"].items():
        for polarity in ("positive", "negative"):
            columns += [(name, polarity, p) for p in entry[polarity]]
    return columns


def ensemble(embeddings: torch.Tensor) -> torch.Tensor:
    """BioViL prompt ensemble: mean of the (unnormalised) embeddings, then L2-normalised."""
    return F.normalize(embeddings.float().mean(0), dim=-1)


# --------------------------------------------------------------------------- scoring


class PromptScorer:
    """Scores every prompt (and every class ensemble) against batches of images."""

    def __init__(
        self,
        model,
        prompts: dict,
        objective: str | None = None,
        *,
        text: torch.Tensor | None = None,
        scorer=None,
    ):
        """``text`` and ``scorer``: prompt embeddings (rows in :func:`prompt_columns` order)
        and the scorer, given instead of computed from ``model`` (``model`` may then be
        None: features are passed to :meth:`score_features`)."""
        self.model = model
        self.scorer = scorer if scorer is not None else scorer_of(model, objective)
        self.columns = prompt_columns(prompts)
        if text is None:
            texts = [c[2] for c in self.columns]
            text = text_embeddings(model, texts, self.scorer.text_kind).to(model_device(model))
        self.text = text
        self.groups: dict[tuple[str, str], list[int]] = {}
        for i, (name, polarity, _) in enumerate(self.columns):
            self.groups.setdefault((name, polarity), []).append(i)
        if self.scorer.prompt_ensemble == "embedding":
            self.ensembles = torch.stack([ensemble(self.text[ix]) for ix in self.groups.values()])

    @torch.no_grad()
    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        """A loader batch (or uint8 images of the primary encoder's view) → (per-prompt
        scores N×P, per-group ensemble scores N×G)."""
        if isinstance(images, dict):
            feats = image_features(self.model, images, model_device(self.model))
        else:
            feats = model_of(self.model).encode_image(images)
        return self.score_features(feats)

    @torch.no_grad()
    def score_features(self, feats: dict) -> tuple[np.ndarray, np.ndarray]:
        """Image features (``image_global`` and whatever else the scorer reads) → (per-prompt
        scores N×P, per-group ensemble scores N×G)."""
        prompt_scores = self.scorer.scores(feats, self.text)
        if self.scorer.prompt_ensemble == "embedding":
            group_scores = self.scorer.scores(feats, self.ensembles)
        else:
            group_scores = torch.stack(
                [prompt_scores[:, ix].mean(1) for ix in self.groups.values()], 1
            )
        return prompt_scores.float().cpu().numpy(), group_scores.float().cpu().numpy()


def score_split(model, data, scorer: PromptScorer, batch_size: int, desc: str) -> dict:
    """Run the scorer over a split: scores, labels and keys."""
    loader = eval_loader(model, data, batch_size=batch_size)
    prompt_rows, group_rows, labels, keys = [], [], [], []
    for batch in progress(loader, data, batch_size, desc):
        prompt_scores, group_scores = scorer(batch)
        prompt_rows.append(prompt_scores)
        group_rows.append(group_scores)
        labels.append(batch["labels"][:, 0].numpy())
        keys += batch["keys"]
    if not keys:
        raise EvaluationInputError(
            f"{data}: no readable study (skipped {loader.stats.samples_skipped})"
        )
    split = scored_split(scorer, prompt_rows, group_rows, labels)
    return {**split, "keys": keys, "skipped": loader.stats.samples_skipped}


def scored_split(scorer: PromptScorer, prompt_rows, group_rows, labels) -> dict:
    """The split dict the tasks read, from per-batch score and label arrays."""
    groups = np.concatenate(group_rows)
    return {
        "prompt": np.concatenate(prompt_rows),
        "group": {g: groups[:, i] for i, g in enumerate(scorer.groups)},
        "labels": np.concatenate(labels),
    }


def finding_auroc(split: dict, name: str, bootstrap: int, seed: int) -> dict:
    """AUROC (with its bootstrap CI) of finding ``name``'s binary score (positive − negative
    ensemble) on the studies labelled 1 or 0 for it."""
    mask, y = metrics.binary_labels(split["labels"][:, CHEXPERT_LABELS.index(name)])
    return metrics.auroc_with_ci(y, binary_scores(split, name)[mask], bootstrap, seed)


def mean_defined(aurocs: dict) -> float:
    """Mean of the per-finding AUROC values that are defined (NaN where none is)."""
    defined = [v["value"] for v in aurocs.values() if not math.isnan(v["value"])]
    return float(np.mean(defined)) if defined else float("nan")


def aurocs_from_embeddings(
    image: torch.Tensor | np.ndarray,
    text: torch.Tensor | np.ndarray,
    labels: np.ndarray,
    prompts=None,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Zero-shot AUROC per finding and their mean from embeddings computed elsewhere.

    ``image``: N×D global image embeddings; ``text``: P×D prompt embeddings, rows in
    :func:`prompt_columns` order of ``prompts``; ``labels``: N×14 CheXpert labels. Scored
    as :func:`evaluate` scores a contrastive vlp model (cosine, BioViL ensemble, positive −
    negative), so a model from another framework (e.g. open_clip) is measured on the same
    protocol. Returns ``{"auroc": {finding: {value, ci}}, "mean_auroc": float}``.
    """
    spec = prompts if isinstance(prompts, dict) else load_prompts(prompts)
    scorer = PromptScorer(None, spec, text=torch.as_tensor(text), scorer=CosineScorer("report"))
    prompt_scores, group_scores = scorer.score_features({"image_global": torch.as_tensor(image)})
    split = scored_split(scorer, [prompt_scores], [group_scores], [np.asarray(labels)])
    aurocs = {name: finding_auroc(split, name, bootstrap, seed) for name in spec["classes"]}
    return {"auroc": aurocs, "mean_auroc": mean_defined(aurocs)}


def binary_scores(split: dict, name: str) -> np.ndarray:
    score = split["group"][(name, "positive")]
    if (name, "negative") in split["group"]:
        score = score - split["group"][(name, "negative")]
    return score


# --------------------------------------------------------------------------- tasks


def multiclass_selection(labels: np.ndarray, classes: list[str], per_class: int, seed: int):
    """Rows and class indices of the multi-class task (definition in the module docstring)."""
    columns = [CHEXPERT_LABELS.index(c) for c in classes]
    sub = labels[:, columns]
    rng = np.random.default_rng(seed)
    rows, targets, available = [], [], {}
    for k, name in enumerate(classes):
        others = np.delete(sub, k, axis=1)
        eligible = (sub[:, k] == 1) & np.all((others == 0) | np.isnan(others), axis=1)
        candidates = np.flatnonzero(eligible)
        available[name] = int(candidates.size)
        chosen = np.sort(rng.permutation(candidates)[:per_class])
        rows += chosen.tolist()
        targets += [k] * chosen.size
    return np.asarray(rows, dtype=int), np.asarray(targets, dtype=int), available


def _zscore(columns: np.ndarray) -> np.ndarray:
    std = columns.std(0)
    return (columns - columns.mean(0)) / np.where(std > 0, std, 1.0)


def evaluate(
    model,
    data,
    out,
    *,
    prompts=None,
    val_data: str | None = "auto",
    figures: bool = False,
    seed: int = 0,
    bootstrap: int = 1000,
    batch_size: int = 32,
    objective: str | None = None,
    headline_classes: list[str] | None = None,
) -> dict:
    """Zero-shot evaluation of ``model`` on ``data``; writes results into ``out``.

    ``headline_classes``: also report the mean AUROC (with its interval) over these
    classes alone (``results["headline"]``), e.g. the findings a dataset renders.
    """
    out = Path(out)
    prompt_spec = prompts if isinstance(prompts, dict) else load_prompts(prompts)
    scorer = PromptScorer(model, prompt_spec, objective)
    test = score_split(model, data, scorer, batch_size, "zero-shot: test")
    if val_data == "auto":
        val_data = sibling_split(data, "validate")
    val = (
        score_split(model, val_data, scorer, batch_size, "zero-shot: validate")
        if val_data
        else None
    )

    results: dict = {
        "task": "zero-shot",
        "data": str(data),
        "validation_data": val_data,
        "prompts": prompt_spec["source"],
        "similarity": scorer.scorer.description,
        "samples": len(test["keys"]),
        "skipped_samples": test["skipped"],
        "label_rule": "binary tasks use studies labelled 1 (positive) or 0 (negative); "
        "uncertain (-1) and blank labels are excluded",
        "seed": seed,
        "bootstrap": bootstrap,
        "auroc": {},
        "f1": {},
        "accuracy": {},
        "threshold": {},
        "per_prompt_auroc": {},
    }
    binary_rows, prompt_rows, curves = [], [], {}
    for name in prompt_spec["classes"]:
        column = CHEXPERT_LABELS.index(name)
        mask, y = metrics.binary_labels(test["labels"][:, column])
        score = binary_scores(test, name)[mask]
        auc = finding_auroc(test, name, bootstrap, seed)
        has_negative = bool(prompt_spec["classes"][name]["negative"])
        threshold, rule = _threshold(name, val, column, has_negative, binary_scores(test, name))
        predicted = (score >= threshold).astype(float)
        f1 = metrics.with_ci(metrics.f1, y, predicted, n_resamples=bootstrap, seed=seed)
        acc = metrics.with_ci(metrics.accuracy, y, predicted, n_resamples=bootstrap, seed=seed)
        results["auroc"][name] = auc
        results["f1"][name] = f1
        results["accuracy"][name] = acc
        results["threshold"][name] = {"value": threshold, "rule": rule}
        positives = int(y.sum())
        binary_rows.append([name, positives, int(y.size) - positives, auc, f1, acc, rule])
        if not math.isnan(auc["value"]):
            curves[name] = (y, score, auc["value"])
        results["per_prompt_auroc"][name] = {}
        for index, (cls, polarity, text) in enumerate(scorer.columns):
            if cls != name:
                continue
            sign = 1.0 if polarity == "positive" else -1.0
            try:
                value = metrics.auroc(y, sign * test["prompt"][mask, index])
            except metrics.MetricUndefined:
                value = float("nan")
            results["per_prompt_auroc"][name][f"{polarity}: {text}"] = value
            prompt_rows.append([name, polarity, text, value])
    results["mean_auroc"] = mean_defined(results["auroc"])

    # The mean's own interval: studies resampled jointly for every finding.
    def mean_with_ci(names):
        columns = [CHEXPERT_LABELS.index(n) for n in names]
        score_matrix = np.stack([binary_scores(test, n) for n in names], 1)
        return metrics.mean_auroc_with_ci(test["labels"][:, columns], score_matrix, bootstrap, seed)

    results["mean_auroc_ci"] = mean_with_ci(list(prompt_spec["classes"]))
    if headline_classes:
        missing = [c for c in headline_classes if c not in prompt_spec["classes"]]
        if missing:
            raise ValueError(
                f"headline_classes {missing} have no prompts in {prompt_spec['source']}"
            )
        results["headline"] = {
            "classes": list(headline_classes),
            "mean_auroc": mean_with_ci(list(headline_classes)),
        }

    tables = [
        Table(
            "Binary zero-shot classification",
            ["finding", "pos", "neg", "AUROC [95% CI]", "F1", "accuracy", "threshold rule"],
            binary_rows + [["mean", "", "", results["mean_auroc"], "", "", ""]],
            note=results["label_rule"] + f". Score: {scorer.scorer.description}, positive "
            "minus negative prompt ensemble.",
        ),
        Table(
            "AUROC of each single prompt",
            ["finding", "polarity", "prompt", "AUROC"],
            prompt_rows,
            note="Negative prompts are scored with their sign flipped (higher = less likely).",
        ),
    ]
    matrix = None
    if prompt_spec.get("multiclass"):
        mc_results, mc_table, matrix = _multiclass(test, prompt_spec["multiclass"], seed, bootstrap)
        results["multiclass"] = mc_results
        tables.append(mc_table)
    if figures:
        out.mkdir(parents=True, exist_ok=True)
        figs = {"roc": str(plots.roc_curves(curves, out / "zero_shot_roc.png", "Zero-shot ROC"))}
        if prompt_spec.get("multiclass") and matrix is not None:
            figs["confusion"] = str(
                plots.confusion_matrix(
                    matrix,
                    prompt_spec["multiclass"]["classes"],
                    out / "zero_shot_confusion.png",
                    prompt_spec["multiclass"]["name"],
                )
            )
        results["figures"] = figs
    write_results(out, results, "Zero-shot classification", tables)
    return results


def _threshold(name: str, val: dict | None, column: int, has_negative: bool, test_score):
    """Decision threshold and the rule that chose it (module docstring)."""
    if val is not None:
        mask, y = metrics.binary_labels(val["labels"][:, column])
        if y.size and y.sum() > 0:
            return metrics.f1_threshold(y, binary_scores(val, name)[mask]), "max F1 on validation"
    if has_negative:
        return 0.0, "positive > negative (no validation labels)"
    return float(np.median(test_score)), "median test score (no validation labels)"


def _multiclass(test: dict, spec: dict, seed: int, bootstrap: int):
    rows, targets, available = multiclass_selection(
        test["labels"], spec["classes"], spec["per_class"], seed
    )
    definition = {
        "name": spec["name"],
        "classes": spec["classes"],
        "per_class_requested": spec["per_class"],
        "per_class_used": {c: int((targets == k).sum()) for k, c in enumerate(spec["classes"])},
        "per_class_available": available,
        "rule": "label == 1 for the class and 0 or blank for every other listed class; "
        "studies with an uncertain (-1) listed label are excluded",
        "sampling": f"numpy.random.default_rng({seed}).permutation per class, first per_class",
        "prediction": "argmax of positive-ensemble scores, each class column z-scored over "
        "the selected studies",
        "seed": seed,
    }
    table = Table(f"Multi-class task {spec['name']}", ["metric", "value [95% CI]"])
    if rows.size == 0 or len(set(targets.tolist())) < 2:
        definition["status"] = "not enough studies: need two classes with eligible studies"
        table.rows = [["status", definition["status"]]]
        return {"definition": definition}, table, None
    scores = np.stack([test["group"][(c, "positive")][rows] for c in spec["classes"]], 1)
    predicted = _zscore(scores).argmax(1)
    labels = list(range(len(spec["classes"])))
    acc = metrics.with_ci(metrics.accuracy, targets, predicted, n_resamples=bootstrap, seed=seed)
    mf1 = metrics.with_ci(
        lambda t, p: metrics.macro_f1(t, p, labels),
        targets,
        predicted,
        n_resamples=bootstrap,
        seed=seed,
    )
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(targets, predicted, labels=labels)
    table.rows = [
        ["accuracy", acc],
        ["macro-F1", mf1],
        ["studies", int(rows.size)],
        ["chance accuracy", 1.0 / len(spec["classes"])],
    ]
    table.note = f"{definition['rule']}; {definition['sampling']}; {definition['prediction']}."
    result = {
        "definition": definition,
        "accuracy": acc,
        "macro_f1": mf1,
        "confusion": matrix.tolist(),
    }
    return result, table, matrix
