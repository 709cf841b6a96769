"""Image↔report retrieval: Recall@1/5/10 and median rank, computed in chunks.

Each study contributes one image (frontal) and one report; the report of study i is the
only correct match for image i and vice versa. Images and reports are compared by the
model's scorer (:func:`vlp.evaluation.features.scorer_of`): for a contrastive model the
cosine of the projected global image and report embeddings (CLIP-style retrieval, Radford
et al. 2021; ConVIRT, Zhang et al. 2020); for a scorer that reads sentences (the local-MI
critic, Liao et al. 2021) a report's score with an image is the mean of its sentences'
scores (a report without sentences is scored as one sentence). The rank of a query is
``1 +`` the number of candidates scoring strictly higher than the correct one (ties
resolved in the query's favour). Scores are computed one image batch at a time against
every report, so only ``batch × N`` scores are computed at once (the N×N matrix itself is
kept: N floats per study).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlp.evaluation import figures as plots
from vlp.evaluation import metrics
from vlp.evaluation.features import (
    EvaluationInputError,
    cache_folder,
    eval_loader,
    extract_features,
    image_features,
    model_device,
    progress,
    scorer_of,
    text_embeddings,
)
from vlp.evaluation.report import Table, write_results

KS = (1, 5, 10)


def ranks(queries: torch.Tensor, gallery: torch.Tensor, chunk_size: int = 1024) -> np.ndarray:
    """1-based rank of gallery item i for query i (cosine similarity), chunked over queries."""
    if queries.shape != gallery.shape:
        raise ValueError(
            f"retrieval needs one gallery item per query, got {tuple(queries.shape)} and "
            f"{tuple(gallery.shape)}"
        )
    q = F.normalize(queries.float(), dim=-1)
    g = F.normalize(gallery.float(), dim=-1)
    out = []
    for start in range(0, q.shape[0], chunk_size):
        block = q[start : start + chunk_size] @ g.T  # chunk × N
        rows = torch.arange(block.shape[0], device=block.device)
        correct = block[rows, rows + start]
        out.append((block > correct[:, None]).sum(1) + 1)
    return torch.cat(out).cpu().numpy()


def ranks_from_scores(scores: torch.Tensor) -> np.ndarray:
    """1-based rank of column i in row i of a square score matrix (ties in the row's favour)."""
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"retrieval needs a square score matrix, got {tuple(scores.shape)}")
    correct = scores.diagonal()
    return ((scores > correct[:, None]).sum(1) + 1).cpu().numpy()


def recall_at(rank: np.ndarray, k: int) -> float:
    return float(np.mean(rank <= k))


def median_rank(rank: np.ndarray) -> float:
    return float(np.median(rank))


def rank_metrics(rank: np.ndarray, bootstrap: int, seed: int) -> dict:
    """Recall@K and median rank with bootstrap CIs over queries (gallery fixed)."""
    out = {
        f"R@{k}": metrics.with_ci(
            lambda r, k=k: recall_at(r, k), rank, n_resamples=bootstrap, seed=seed
        )
        for k in KS
    }
    out["median_rank"] = metrics.with_ci(median_rank, rank, n_resamples=bootstrap, seed=seed)
    return out


def evaluate(
    model,
    data,
    out,
    *,
    figures: bool = False,
    seed: int = 0,
    bootstrap: int = 1000,
    batch_size: int = 32,
    chunk_size: int = 1024,
    cache_dir=None,
    objective: str | None = None,
) -> dict:
    """Retrieval on ``data``; writes results into ``out`` (``figures``: recall@K curves).

    Features are cached in ``cache_dir`` (default ``out/cache``), keyed by the model's
    weights and the data, so evaluators sharing a cache folder extract them once.
    """
    out = Path(out)
    scorer = scorer_of(model, objective)
    if scorer.text_kind not in ("report", "sentence"):
        raise EvaluationInputError(
            f"retrieval: the score of objective {objective!r} reads {scorer.text_kind} "
            "features; retrieval ranks report or sentence embeddings (choose another --objective)"
        )
    device = model_device(model)
    if scorer.text_kind == "report":
        feats = extract_features(
            model,
            data,
            batch_size=batch_size,
            reports=True,
            cache_dir=cache_folder(out, cache_dir),
            desc="retrieval features",
        )
        reports = torch.from_numpy(feats.report).to(device)
        count, skipped = len(feats), feats.skipped
        if set(scorer.image_keys) <= {"image_global"}:
            # A score of the global embedding: the cached features are all it needs.
            images = torch.from_numpy(feats.image_global).to(device)
            scores = torch.cat(
                [
                    scorer.scores({"image_global": images[i : i + chunk_size]}, reports)
                    for i in range(0, count, chunk_size)
                ]
            )
        else:
            scores, _ = _score_images(model, data, scorer, batch_size, lambda feats: reports)
    else:
        scores, count, skipped = _sentence_report_scores(model, data, scorer, batch_size)
    note = f"score: {scorer.description}" + (
        "; a report scores the mean of its sentences' scores"
        if scorer.text_kind == "sentence"
        else ""
    )
    results = {
        "task": "retrieval",
        "data": str(data),
        "samples": count,
        "skipped_samples": skipped,
        "similarity_note": note,
        "chance_R@1": 1.0 / max(1, count),
        "chance_R@5": min(5, count) / max(1, count),
        "seed": seed,
        "bootstrap": bootstrap,
    }
    by_direction = {
        "image_to_report": ranks_from_scores(scores),
        "report_to_image": ranks_from_scores(scores.T),
    }
    for direction, rank in by_direction.items():
        results[direction] = rank_metrics(rank, bootstrap, seed)
    if figures:
        out.mkdir(parents=True, exist_ok=True)
        curves = {d.replace("_to_", " → "): r for d, r in by_direction.items()}
        path = plots.recall_curves(
            curves, out / "recall_at_k.png", f"Retrieval among {count} studies"
        )
        results["figures"] = {"recall_at_k": str(path)}
    header = ["direction", *[f"R@{k}" for k in KS], "median rank"]
    rows = [
        [direction.replace("_", " ")]
        + [results[direction][f"R@{k}"] for k in KS]
        + [results[direction]["median_rank"]]
        for direction in ("image_to_report", "report_to_image")
    ]
    tables = [Table(f"Retrieval among {count} studies", header, rows, note=note)]
    write_results(out, results, "Image-report retrieval", tables)
    return results


@torch.no_grad()
def _score_images(model, data, scorer, batch_size: int, texts_for):
    """Scores of every image of ``data`` (rows, loader order) against ``texts_for(...)``."""
    device = model_device(model)
    loader = eval_loader(model, data, batch_size=batch_size)
    rows, metas = [], []
    for batch in progress(loader, data, batch_size, "retrieval: images"):
        feats = image_features(model, batch, device)
        rows.append(scorer.scores(feats, texts_for(feats)).float())
        metas += batch["meta"]
    if not rows:
        raise EvaluationInputError(
            f"{data}: no readable study (skipped {loader.stats.samples_skipped})"
        )
    return torch.cat(rows), (metas, loader.stats.samples_skipped)


@torch.no_grad()
def _sentence_report_scores(model, data, scorer, batch_size: int):
    """N×N scores of images against reports, a report scoring the mean over its sentences."""
    device = model_device(model)
    loader = eval_loader(model, data, batch_size=batch_size)
    texts, owner = [], []
    count = 0
    for batch in progress(loader, data, batch_size, "retrieval: sentences"):
        for record in batch["meta"]:
            sentences = [s for s in record.get("sentences") or [] if str(s).strip()]
            if not sentences:
                sentences = [record.get("report") or ""]
            texts += sentences
            owner += [count] * len(sentences)
            count += 1
    if not count:
        raise EvaluationInputError(
            f"{data}: no readable study (skipped {loader.stats.samples_skipped})"
        )
    embedded = text_embeddings(model, texts, "sentence").to(device)
    owner_t = torch.tensor(owner, device=device)
    # Mean over each report's sentences: a count-normalised S→N sum.
    members = torch.zeros(len(texts), count, device=device)
    members[torch.arange(len(texts), device=device), owner_t] = 1.0
    members /= members.sum(0, keepdim=True)
    sentence_scores, (_, skipped) = _score_images(
        model, data, scorer, batch_size, lambda feats: embedded
    )
    return sentence_scores @ members, count, skipped
