"""Phrase grounding: similarity maps of (image, sentence) pairs against true boxes (MS-CXR style).

For each study and each distinct box phrase of its frontal view (boxes sharing a phrase are
one target, their union; Boecking et al., ECCV 2022, MS-CXR), a similarity map over the
image's region grid is computed:

the model's scorer's region scores (:func:`vlp.evaluation.features.scorer_of`): for local-MI
models (Liao et al., MICCAI 2021) the critic's score of each region with the sentence (the
statistic the objective pools over regions); for contrastive models the cosine of each
projected local feature with the phrase embedding (BioViL grounding, Boecking et al. 2022)
when local features share the text space; for BioViL-L's local alignment the phrase's
words attending over the regions (GLoRIA's localisation maps, Huang et al. 2021); a scorer
without region scores is reported as unsupported.

The map is upsampled bilinearly to the model's input size and compared with the box mask in
the same pixel frame. Boxes are stored in the pixels of the stored image; the loader takes
the centred square of that image and resizes it (``vlp.data.transforms.center_square_box``),
so boxes are shifted and scaled the same way and clipped to the crop (boxes entirely
outside it are dropped and counted).

Metrics per target, then averaged per category and over categories:

* CNR = |μ_in − μ_out| / sqrt(σ²_in + σ²_out + ε) with population variances and
  ε = :data:`CNR_EPS` (so a map equal to the box indicator, σ = 0, scores 1/sqrt(ε) instead of
  dividing by zero; a constant map scores 0). CNR is invariant to shifting and positively
  scaling the map, so critic scores and cosines are comparable.
* mIoU: the map min–max normalised to [0, 1], binarised at thresholds 0.1, 0.2, …, 0.9, IoU
  of each binary map with the box mask, averaged over thresholds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlp.data.batch import batch_images
from vlp.data.transforms import center_square_box
from vlp.evaluation import figures as plots
from vlp.evaluation import metrics
from vlp.evaluation.features import (
    eval_loader,
    image_features,
    image_size_of,
    model_device,
    progress,
    scorer_of,
    text_embeddings,
)
from vlp.evaluation.report import Table, write_results

CNR_EPS = 1e-8


def frontal_tokens(feats: dict) -> dict:
    """The image features with the local tokens of the current frontal view only (boxes
    are drawn on it): an encoder whose layout holds more segments (a lateral, a prior) is
    grounded on its frontal segment."""
    layout = feats.get("image_layout") or ()
    if len(layout) <= 1:
        return feats
    for segment in layout:
        if segment.view == "frontal" and segment.time == 0:
            local = feats["image_local"][:, segment.start : segment.stop]
            return dict(feats, image_local=local, image_grid=segment.grid)
    raise ValueError("grounding: the image encoder's layout has no current frontal segment")


IOU_THRESHOLDS = tuple(np.round(np.arange(0.1, 1.0, 0.1), 2))
FIGURE_SAMPLES = 8


# --------------------------------------------------------------------------- geometry


def box_to_input(box: dict, stored_hw, image_size: int) -> tuple[float, float, float, float] | None:
    """A stored-pixel box ``{x, y, w, h}`` → ``(x0, y0, x1, y1)`` in model-input pixels,
    clipped to the centre crop; None when nothing of it is inside."""
    height, width = stored_hw
    left, top, right, _ = center_square_box(width, height)
    scale = image_size / (right - left)
    x0 = (float(box["x"]) - left) * scale
    y0 = (float(box["y"]) - top) * scale
    x1 = x0 + float(box["w"]) * scale
    y1 = y0 + float(box["h"]) * scale
    x0, y0 = max(0.0, x0), max(0.0, y0)
    x1, y1 = min(float(image_size), x1), min(float(image_size), y1)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def box_mask(boxes: list[tuple[float, float, float, float]], image_size: int) -> np.ndarray:
    """Union mask of boxes: pixel (i, j) is inside when its centre is."""
    centres = np.arange(image_size) + 0.5
    mask = np.zeros((image_size, image_size), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        rows = (centres >= y0) & (centres < y1)
        cols = (centres >= x0) & (centres < x1)
        mask |= rows[:, None] & cols[None, :]
    return mask


# --------------------------------------------------------------------------- metrics


def cnr(heat: np.ndarray, mask: np.ndarray, eps: float = CNR_EPS) -> float:
    """Contrast-to-noise ratio of a map inside vs outside ``mask`` (module docstring)."""
    heat = np.asarray(heat, dtype=np.float64)
    inside, outside = heat[mask], heat[~mask]
    if inside.size == 0 or outside.size == 0:
        raise metrics.MetricUndefined("CNR needs pixels inside and outside the box")
    return float(
        abs(inside.mean() - outside.mean()) / math.sqrt(inside.var() + outside.var() + eps)
    )


def mean_iou(heat: np.ndarray, mask: np.ndarray, thresholds=IOU_THRESHOLDS) -> float:
    """IoU of the min–max normalised map binarised at each threshold, averaged."""
    heat = np.asarray(heat, dtype=np.float64)
    span = heat.max() - heat.min()
    norm = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    ious = []
    for t in thresholds:
        pred = norm >= t
        union = np.logical_or(pred, mask).sum()
        ious.append(np.logical_and(pred, mask).sum() / union if union else 0.0)
    return float(np.mean(ious))


def macro_mean(values: np.ndarray, categories: np.ndarray) -> float:
    """Mean over categories of the per-category mean (categories present in the sample)."""
    return float(np.mean([values[categories == c].mean() for c in np.unique(categories)]))


# --------------------------------------------------------------------------- maps


def _targets(record: dict, image_size: int, counters: dict) -> list[dict]:
    """Box phrases of one study's frontal view, boxes mapped into the input frame."""
    labels = record.get("labels") or {}
    frontal = record.get("frontal") or {}
    stored = frontal.get("size")
    grouped: dict[str, dict] = {}
    for box in labels.get("boxes") or []:
        if box.get("view", "frontal") != "frontal":
            counters["non_frontal_boxes"] += 1
            continue
        if not stored:
            raise ValueError(
                f"study {record.get('study_id')}: json frontal.size is missing; cannot map boxes"
            )
        mapped = box_to_input(box, stored, image_size)
        if mapped is None:
            counters["boxes_outside_crop"] += 1
            continue
        phrase = str(box.get("phrase") or box.get("category") or "")
        target = grouped.setdefault(
            phrase, {"phrase": phrase, "category": str(box.get("category")), "boxes": []}
        )
        target["boxes"].append(mapped)
    return list(grouped.values())


@torch.no_grad()
def evaluate(
    model,
    data,
    out,
    *,
    figures: bool = False,
    seed: int = 0,
    bootstrap: int = 1000,
    batch_size: int = 32,
    objective: str | None = None,
) -> dict:
    """Grounding CNR and mIoU on the boxes of ``data``; writes results into ``out``."""
    out = Path(out)
    scorer = scorer_of(model, objective, regions=True)
    kind = scorer.text_kind
    explanation = scorer.description
    if not scorer.has_regions:
        explanation += ": no region scores (local features share no space with the texts)"
    results: dict = {
        "task": "grounding",
        "data": str(data),
        "similarity": explanation,
        "seed": seed,
        "bootstrap": bootstrap,
        "cnr_eps": CNR_EPS,
        "iou_thresholds": list(IOU_THRESHOLDS),
    }
    if not scorer.has_regions:
        results["status"] = "unsupported: " + explanation
        write_results(
            out, results, "Phrase grounding", [Table("Status", ["status"], [[results["status"]]])]
        )
        return results
    size = image_size_of(model)
    device = model_device(model)
    counters = defaultdict(int)
    cnrs, ious, categories = [], [], []
    rng = np.random.default_rng(seed)
    samples: list[dict] = []  # reservoir of figure items
    seen = 0
    loader = eval_loader(model, data, batch_size=batch_size)
    for batch in progress(loader, data, batch_size, "grounding"):
        targets, index = [], []
        for b, record in enumerate(batch["meta"]):
            for target in _targets(record, size, counters):
                targets.append(target)
                index.append(b)
        if not targets:
            continue
        feats = frontal_tokens(image_features(model, batch, device))
        gh, gw = feats["image_grid"]
        text = text_embeddings(model, [t["phrase"] for t in targets], kind).to(device)
        # Region scores T×R: target t is phrase t on image index[t].
        scores = scorer.region_scores(feats, text, torch.tensor(index, device=device))
        heat = (
            F.interpolate(
                scores.float().view(-1, 1, gh, gw),
                size=(size, size),
                mode="bilinear",
                align_corners=False,
            )[:, 0]
            .cpu()
            .numpy()
        )
        for t, target in enumerate(targets):
            mask = box_mask(target["boxes"], size)
            try:
                value = cnr(heat[t], mask)
            except metrics.MetricUndefined:
                counters["targets_without_outside"] += 1
                continue
            cnrs.append(value)
            ious.append(mean_iou(heat[t], mask))
            categories.append(target["category"])
            if figures:
                item = {
                    "image": batch_images(batch, "frontal", 0)[index[t], 0].numpy(),
                    "heat": heat[t],
                    "boxes": [(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in target["boxes"]],
                    "sentence": target["phrase"],
                    "cnr": value,
                }
                seen += 1
                if len(samples) < FIGURE_SAMPLES:
                    samples.append(item)
                else:
                    slot = int(rng.integers(0, seen))
                    if slot < FIGURE_SAMPLES:
                        samples[slot] = item
    results.update(
        {
            "targets": len(cnrs),
            "skipped_samples": loader.stats.samples_skipped,
            "dropped": dict(counters),
        }
    )
    if not cnrs:
        results["status"] = "no boxes in the data (labels.boxes empty for every frontal view)"
        write_results(
            out, results, "Phrase grounding", [Table("Status", ["status"], [[results["status"]]])]
        )
        return results
    cnrs, ious, categories = np.asarray(cnrs), np.asarray(ious), np.asarray(categories)
    per_category = {}
    rows = []
    for category in sorted(set(categories.tolist())):
        sel = categories == category
        per_category[category] = {
            "n": int(sel.sum()),
            "cnr": metrics.with_ci(np.mean, cnrs[sel], n_resamples=bootstrap, seed=seed),
            "miou": metrics.with_ci(np.mean, ious[sel], n_resamples=bootstrap, seed=seed),
        }
        rows.append(
            [
                category,
                int(sel.sum()),
                per_category[category]["cnr"],
                per_category[category]["miou"],
            ]
        )
    results["per_category"] = per_category
    results["mean_cnr"] = metrics.with_ci(
        macro_mean, cnrs, categories, n_resamples=bootstrap, seed=seed
    )
    results["mean_miou"] = metrics.with_ci(
        macro_mean, ious, categories, n_resamples=bootstrap, seed=seed
    )
    results["micro_cnr"] = float(cnrs.mean())
    results["micro_miou"] = float(ious.mean())
    rows.append(["mean over categories", len(cnrs), results["mean_cnr"], results["mean_miou"]])
    tables = [
        Table(
            "Phrase grounding (test)",
            ["category", "targets", "CNR", "mIoU"],
            rows,
            note=f"map: {explanation}, bilinear upsampling to {size}px; "
            f"CNR with eps={CNR_EPS:g}; mIoU over thresholds 0.1-0.9 of the min-max "
            f"normalised map; dropped: {dict(counters) or 'none'}.",
        )
    ]
    if figures and samples:
        out.mkdir(parents=True, exist_ok=True)
        path = plots.grounding_overlays(samples, out / "grounding_overlays.png")
        results["figures"] = {"overlays": str(path)}
    write_results(out, results, "Phrase grounding", tables)
    return results
