"""MoPoE's latent representation per modality subset, and what its decoders generate.

One job: evaluate a model trained with the ``mopoe`` objective (``vlp/objectives/mopoe.py``)
the way Sutter et al. (ICLR 2021, "Generalized Multimodal ELBO", §4 latent
representation) and Klug et al. (MoPoE on MIMIC-CXR) do, on our splits:

* **Subset probes.** For each of the 7 subsets F, L, T, F+L, F+T, L+T, F+L+T (frontal,
  lateral, text) the posterior mean of that subset (the product of its experts, no prior
  expert) for every study that has all of its modalities. Per CheXpert label a logistic
  regression (scikit-learn, L-BFGS, ``max_iter`` 1000, C = 1 as MoPoE's
  ``LogisticRegression``; features standardised on the training rows) is trained on the
  train split and scored on the test split. Per label the rows labelled 1 or 0 are used
  (uncertain −1 and blank excluded, as ``linear_probe.py``); a label is scored when both
  the training and the test rows hold both classes. Metric: average precision (MoPoE's
  ``average_precision_score``) per label and its mean over the scored labels, with seeded
  bootstrap 95 % intervals over test studies (``vlp.evaluation.metrics``). MoPoE trains on
  500 samples (``num_training_samples_lr``) and scores 3 labels; here every training study
  (``train_samples`` caps it) and all 14 labels.
* The subsets with the lateral are scored on fewer studies (those that have one): the
  table gives n per subset, and a second mean AP on the studies that have all three
  modalities, where every subset is scored on the same rows.
* **Generated samples** (always written): ``subset_probe_samples.png``, for the first
  test studies that have a lateral, rows real frontal / frontal decoded from F+L+T /
  frontal generated from the report alone / lateral generated from the frontal alone /
  real lateral; and ``subset_probe_texts.txt``, the real report (the word pieces the
  model reads) beside the report decoded from the frontal image alone (argmax per
  position, cut at the first [SEP], through the model's tokenizer). Latents are the
  posterior means, so the samples are deterministic.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.preprocessing import StandardScaler

from vlp.data.batch import batch_to
from vlp.data.schema import CHEXPERT_LABELS
from vlp.evaluation import metrics
from vlp.evaluation.features import (
    eval_loader,
    model_device,
    model_of,
    progress,
    resolve_split,
    tokenizer_of,
)
from vlp.evaluation.report import Table, write_results
from vlp.objectives.mopoe import MODALITIES, SUBSETS, subset_mask, subset_name

#: studies in the sample grid and in the text file.
SAMPLE_STUDIES = 6
TEXT_STUDIES = 4


# --------------------------------------------------------------------------- metrics


def average_precision(y_true, scores) -> float:
    """scikit-learn's average precision; :class:`metrics.MetricUndefined` without both
    classes (with no positive AP is undefined, with no negative it is trivially 1)."""
    y, s = np.asarray(y_true, dtype=float), np.asarray(scores, dtype=float)
    if y.size == 0 or y.min() == y.max():
        raise metrics.MetricUndefined("average precision needs both classes")
    return float(average_precision_score(y, s))


def fast_average_precision(y_true, scores) -> float:
    """:func:`average_precision` without scikit-learn's overhead (for bootstrap resamples):
    ``Σ_n (R_n − R_{n−1}) P_n`` over the distinct score thresholds, ties kept together."""
    y, s = np.asarray(y_true, dtype=float), np.asarray(scores, dtype=float)
    positives = y.sum()
    if y.size == 0 or positives == 0 or positives == y.size:
        raise metrics.MetricUndefined("average precision needs both classes")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last row of each run of equal scores
    true_pos = np.cumsum(y)[last]
    predicted = np.arange(1, y.size + 1)[last]
    recall = true_pos / positives
    precision = true_pos / predicted
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(labels, scores) -> float:
    """Mean over columns of the AP of ``scores[:, k]`` on the rows labelled 1 or 0 in
    ``labels[:, k]`` and scored (not NaN); columns without both classes are left out;
    :class:`metrics.MetricUndefined` when none is left."""
    labels, scores = np.asarray(labels, dtype=float), np.asarray(scores, dtype=float)
    values = []
    for k in range(labels.shape[1]):
        mask, _ = metrics.binary_labels(labels[:, k])
        mask &= ~np.isnan(scores[:, k])
        y = labels[mask, k]
        if y.size and y.min() != y.max():
            values.append(fast_average_precision(y, scores[mask, k]))
    if not values:
        raise metrics.MetricUndefined("no label with both classes")
    return float(np.mean(values))


# --------------------------------------------------------------------------- extraction


def mopoe_objective(model, name: str | None = None):
    """The training module's MoPoE objective: ``name``, else the first objective that
    gives subset posteriors."""
    objectives = dict(getattr(model, "objectives", {}).items())
    if name is not None:
        if name not in objectives:
            raise ValueError(
                f"subset-probe: the model has no objective {name!r} (it has {sorted(objectives)})"
            )
        found = objectives[name]
        if not hasattr(found, "subset_posterior"):
            raise ValueError(f"subset-probe: objective {name!r} has no subset posteriors")
        return found
    for objective in objectives.values():
        if hasattr(objective, "subset_posterior") and hasattr(objective, "experts"):
            return objective
    raise ValueError(
        "subset-probe needs a model trained with the mopoe objective (recipes/mopoe.yaml); "
        f"this one has the objectives {sorted(objectives)}"
    )


@torch.no_grad()
def extract_experts(model, objective, data, *, batch_size: int, samples: int = 0, desc: str):
    """The experts ``(μ, log σ²)`` of every study of ``data``, its presence mask and labels;
    with ``samples`` > 0 also the image targets and token ids of the first ``samples``
    studies that have every modality (for the generated samples)."""
    net = model_of(model)
    device = model_device(model)
    loader = eval_loader(model, data, batch_size=batch_size)
    need = objective.required_features
    experts: dict[str, list] = {m: [] for m in MODALITIES}
    present, labels, keys = [], [], []
    kept: dict[str, list] = {"frontal": [], "lateral": [], "ids": [], "mask": [], "keys": []}
    for batch in progress(loader, data, batch_size, desc):
        on_device = batch_to(batch, device)
        features = net.encode(on_device, need)
        for modality, (mu, logvar) in objective.experts(features).items():
            experts[modality].append((mu.float().cpu(), logvar.float().cpu()))
        rows = objective.presence(on_device).cpu()
        present.append(rows)
        labels.append(batch["labels"][:, 0].numpy())
        keys += batch["keys"]
        full = rows.all(1).nonzero().squeeze(1)
        wanted = samples - len(kept["keys"])
        if wanted > 0 and full.numel():
            take = full[:wanted]
            for modality in ("frontal", "lateral"):
                kept[modality].append(objective.image_target(on_device, modality).cpu()[take])
            ids, mask = objective.text_tokens(on_device)
            kept["ids"] += [ids.cpu()[i] for i in take]
            kept["mask"] += [mask.cpu()[i] for i in take]
            kept["keys"] += [batch["keys"][i] for i in take]
    if not keys:
        raise ValueError(f"subset-probe: {data} holds no readable study")
    out = {
        m: (torch.cat([a for a, _ in rows]), torch.cat([b for _, b in rows]))
        for m, rows in experts.items()
    }
    kept_images = {m: torch.cat(v) if v else None for m, v in kept.items() if m in MODALITIES}
    return {
        "experts": out,
        "present": torch.cat(present),
        "labels": np.concatenate(labels),
        "keys": keys,
        "samples": {**kept_images, **{k: kept[k] for k in ("ids", "mask", "keys")}},
    }


def subset_means(objective, split: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """subset name → (posterior means ``n×D`` of the studies that have the subset, their
    row indices in the split)."""
    available = subset_mask(split["present"]).numpy()
    out = {}
    for s, subset in enumerate(SUBSETS):
        rows = np.nonzero(available[:, s])[0]
        experts = {m: (mu[rows], lv[rows]) for m, (mu, lv) in split["experts"].items()}
        mean, _ = objective.subset_posterior(experts, subset)
        out[subset_name(subset)] = (mean.numpy(), rows)
    return out


# --------------------------------------------------------------------------- probes


def probe_subset(x_train, y_train, x_test, y_test, *, seed: int, bootstrap: int) -> dict:
    """Per-label logistic regressions on one subset's latents; test AP per label and a
    ``N×14`` score matrix (NaN where a label has no probe or a row no label)."""
    scores = np.full(y_test.shape, np.nan)
    ap = {}
    for j, name in enumerate(CHEXPERT_LABELS):
        mask, y = metrics.binary_labels(y_train[:, j])
        test_mask, yt = metrics.binary_labels(y_test[:, j])
        if y.size == 0 or y.min() == y.max():
            ap[name] = _undefined(yt.size, "training rows have one class")
            continue
        if yt.size == 0 or yt.min() == yt.max():
            ap[name] = _undefined(yt.size, "test rows have one class")
            continue
        scaler = StandardScaler().fit(x_train[mask])
        clf = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000, random_state=seed)
        clf.fit(scaler.transform(x_train[mask]), y)
        score = clf.decision_function(scaler.transform(x_test[test_mask]))
        scores[test_mask, j] = score
        ap[name] = metrics.with_ci(
            average_precision,
            yt,
            score,
            n_resamples=bootstrap,
            seed=seed,
            ci_metric=fast_average_precision,
        )
    return {"ap": ap, "scores": scores}


def _undefined(n: int, reason: str) -> dict:
    return {"value": float("nan"), "ci": [float("nan")] * 2, "n": int(n), "undefined": reason}


def _mean(ap: dict) -> float:
    values = [v["value"] for v in ap.values() if not math.isnan(v["value"])]
    return float(np.mean(values)) if values else float("nan")


# --------------------------------------------------------------------------- samples


@torch.no_grad()
def generated_samples(objective, split: dict, tokenizer) -> dict:
    """Images and texts decoded from posterior means of the kept test studies."""
    kept = split["samples"]
    if not kept["keys"]:
        return {}
    index = {k: i for i, k in enumerate(split["keys"])}
    rows = torch.tensor([index[k] for k in kept["keys"]])
    experts = {m: (mu[rows], lv[rows]) for m, (mu, lv) in split["experts"].items()}
    device = next(objective.parameters()).device
    experts = {m: (mu.to(device), lv.to(device)) for m, (mu, lv) in experts.items()}

    def mean(subset):
        return objective.subset_posterior(experts, subset)[0]

    images = {
        "real frontal": kept["frontal"],
        "frontal from F+L+T": objective.decode_image(mean(MODALITIES), "frontal").cpu(),
        "frontal from text alone": objective.decode_image(mean(("text",)), "frontal").cpu(),
        "lateral from frontal alone": objective.decode_image(mean(("frontal",)), "lateral").cpu(),
        "real lateral": kept["lateral"],
    }
    texts = []
    logits = objective.decode_text(mean(("frontal",))).cpu()
    for i, key in enumerate(kept["keys"][:TEXT_STUDIES]):
        real = kept["ids"][i][kept["mask"][i]].tolist()
        texts.append(
            {
                "key": key,
                "real": _decode(tokenizer, real),
                "from_frontal": _decode(tokenizer, logits[i].argmax(-1).tolist()),
            }
        )
    return {"keys": kept["keys"], "images": images, "texts": texts}


def _decode(tokenizer, ids: list[int]) -> str:
    """Word pieces → text: everything after the first [CLS], up to the first [SEP]."""
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is not None and ids and ids[0] == cls:
        ids = ids[1:]
    if sep is not None and sep in ids:
        ids = ids[: ids.index(sep)]
    if tokenizer is None:
        return " ".join(map(str, ids))
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def sample_grid(images: dict, keys: list[str], path: Path) -> Path:
    """One row per ``name → N×1×s×s`` tensor in [0, 1] (clipped), one column per study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(images)
    n = len(keys)
    fig, axes = plt.subplots(len(names), n, figsize=(1.9 * n + 1.6, 1.95 * len(names)), dpi=100)
    axes = np.array(axes).reshape(len(names), n)
    for r, name in enumerate(names):
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(images[name][c, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            if r == 0:
                ax.set_title(keys[c], fontsize=6)
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.suptitle("MoPoE: decoded from posterior means (test studies with a lateral)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- entry point


def evaluate(
    model,
    data,
    out,
    *,
    train_data="auto",
    objective: str | None = None,
    train_samples: int | None = None,
    figures: bool = False,
    seed: int = 0,
    bootstrap: int = 1000,
    batch_size: int = 32,
) -> dict:
    """Subset probes and generated samples (module docstring); writes results into ``out``.

    ``train_samples`` caps the training studies (a seeded subset; MoPoE uses 500); None
    uses all. ``figures`` changes nothing: the sample grid is always written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_data = resolve_split(data, train_data, "train", required=True)
    mopoe = mopoe_objective(model, objective)
    was_training = model.training
    model.eval()
    train = extract_experts(model, mopoe, train_data, batch_size=batch_size, desc="train latents")
    test = extract_experts(
        model, mopoe, data, batch_size=batch_size, samples=SAMPLE_STUDIES, desc="test latents"
    )
    train_means, test_means = subset_means(mopoe, train), subset_means(mopoe, test)
    full_test = np.nonzero(test["present"].all(1).numpy())[0]
    results: dict = {
        "task": "subset-probe",
        "data": str(data),
        "train_data": train_data,
        "seed": seed,
        "bootstrap": bootstrap,
        "label_rule": "per label, studies labelled 1 or 0; uncertain (-1) and blank excluded",
        "classifier": "standardised features, LogisticRegression(C=1, lbfgs, max_iter=1000)",
        "latent": "posterior mean of the subset's product of experts",
        "subsets": {},
    }
    rows_md, label_rows = [], {name: [name] for name in CHEXPERT_LABELS}
    for subset in SUBSETS:
        name = subset_name(subset)
        x_train, train_rows = train_means[name]
        x_test, test_rows = test_means[name]
        if train_samples is not None and train_samples < len(train_rows):
            pick = np.sort(np.random.default_rng(seed).permutation(len(train_rows))[:train_samples])
            x_train, train_rows = x_train[pick], train_rows[pick]
        y_train, y_test = train["labels"][train_rows], test["labels"][test_rows]
        probe = probe_subset(x_train, y_train, x_test, y_test, seed=seed, bootstrap=bootstrap)
        mean_ci = metrics.with_ci(
            mean_average_precision, y_test, probe["scores"], n_resamples=bootstrap, seed=seed
        )
        # The same probes on the studies that have every modality: one set of rows for all.
        common = np.isin(test_rows, full_test)
        common_ci = metrics.with_ci(
            mean_average_precision,
            y_test[common],
            probe["scores"][common],
            n_resamples=bootstrap,
            seed=seed,
        )
        results["subsets"][name] = {
            "modalities": list(subset),
            "train_studies": int(len(train_rows)),
            "test_studies": int(len(test_rows)),
            "ap": probe["ap"],
            "mean_ap": mean_ci,
            "mean_ap_all_modalities": common_ci,
            "labels_scored": int(sum(not math.isnan(v["value"]) for v in probe["ap"].values())),
        }
        rows_md.append(
            [name, mean_ci, len(train_rows), len(test_rows), common_ci, int(common.sum())]
        )
        for label in CHEXPERT_LABELS:
            label_rows[label].append(probe["ap"][label])
    results["mean_ap"] = {k: v["mean_ap"]["value"] for k, v in results["subsets"].items()}
    tokenizer = tokenizer_of(model)
    samples = generated_samples(mopoe, test, tokenizer)
    if samples:
        grid = sample_grid(samples["images"], samples["keys"], out / "subset_probe_samples.png")
        text_path = out / "subset_probe_texts.txt"
        blocks = [
            f"study {t['key']}\n  real report:         {t['real']}\n"
            f"  decoded from frontal: {t['from_frontal']}\n"
            for t in samples["texts"]
        ]
        header = (
            "MoPoE: the report decoded from the frontal image alone (posterior mean of F, "
            "argmax word piece per position, cut at the first [SEP]) beside the real one.\n\n"
        )
        text_path.write_text(header + "\n".join(blocks), encoding="utf-8")
        results["figures"] = {"samples": str(grid)}
        results["texts"] = {"file": str(text_path), "studies": samples["texts"]}
    else:
        results["figures"] = {}
        results["samples_note"] = "no test study has every modality: no generated samples"
    model.train(was_training)
    tables = [
        Table(
            "Mean average precision per modality subset (test)",
            [
                "subset",
                "mean AP [95% CI]",
                "train studies",
                "test studies",
                "mean AP on studies with F+L+T",
                "n (F+L+T)",
            ],
            rows_md,
            note=results["label_rule"]
            + "; a label counts when its training and test rows hold both classes. "
            "F frontal, L lateral, T report; each subset's latent is the posterior mean of "
            "its product of experts, on the studies that have all of its modalities.",
        ),
        Table(
            "Average precision per label and subset (test)",
            ["label", *(subset_name(s) for s in SUBSETS)],
            list(label_rows.values()),
        ),
    ]
    notes = []
    if samples:
        notes.append(
            f"Generated samples: {out / 'subset_probe_samples.png'}; texts decoded from the "
            f"frontal image: {out / 'subset_probe_texts.txt'}."
        )
    write_results(out, results, "MoPoE subset probes", tables, notes)
    return results
