"""Image↔report retrieval: Recall@1/5/10 and median rank, computed in chunks.

Each study contributes one image (frontal, global embedding) and one report (report
embedding); the report of study i is the only correct match for image i and vice versa.
Similarity is the cosine of the projected embeddings (CLIP-style retrieval, Radford et al.
2021; ConVIRT, Zhang et al. 2020). The rank of a query is ``1 +`` the number of candidates
scoring strictly higher than the correct one (ties resolved in the query's favour). The
similarity matrix is computed ``chunk_size`` queries at a time, so an N×N matrix never
exists in memory; only ``chunk_size × N`` does.

For models trained only with a mutual-information objective the global heads are not
trained to align, which the results say (``similarity_note``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlp.evaluation import metrics
from vlp.evaluation.features import extract_features, model_device, similarity_mode
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
) -> dict:
    """Retrieval on ``data``; writes results into ``out`` (``figures`` has no plot here).

    Features are cached in ``cache_dir`` (default ``out/cache``), keyed by the model's
    weights and the data, so evaluators sharing a cache folder extract them once.
    """
    out = Path(out)
    feats = extract_features(
        model,
        data,
        batch_size=batch_size,
        reports=True,
        cache_dir=Path(cache_dir) if cache_dir is not None else out / "cache",
        desc="retrieval features",
    )
    device = model_device(model)
    images = torch.from_numpy(feats.image_global).to(device)
    reports = torch.from_numpy(feats.report).to(device)
    mode = similarity_mode(model)
    note = (
        "cosine of image_global and report embeddings"
        if mode == "cosine"
        else f"cosine of image_global and report embeddings; this model was trained with a "
        f"critic ({mode}), not a contrastive loss, so its global heads are not aligned and "
        "retrieval near chance is expected"
    )
    results = {
        "task": "retrieval",
        "data": str(data),
        "samples": len(feats),
        "skipped_samples": feats.skipped,
        "similarity_note": note,
        "chance_R@1": 1.0 / max(1, len(feats)),
        "seed": seed,
        "bootstrap": bootstrap,
        "image_to_report": rank_metrics(ranks(images, reports, chunk_size), bootstrap, seed),
        "report_to_image": rank_metrics(ranks(reports, images, chunk_size), bootstrap, seed),
    }
    header = ["direction", *[f"R@{k}" for k in KS], "median rank"]
    rows = [
        [direction.replace("_", " ")]
        + [results[direction][f"R@{k}"] for k in KS]
        + [results[direction]["median_rank"]]
        for direction in ("image_to_report", "report_to_image")
    ]
    tables = [Table(f"Retrieval among {len(feats)} studies", header, rows, note=note)]
    write_results(out, results, "Image-report retrieval", tables)
    return results
