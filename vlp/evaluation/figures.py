"""PNG figures of evaluation results (matplotlib, Agg backend: no display needed).

ROC curves per label, confusion matrices for multi-class tasks (one, or a grid of them),
recall-at-K curves for retrieval, and grounding overlays (image, similarity heat map, true
boxes, sentence).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def roc_curves(curves: dict[str, tuple], path: str | Path, title: str = "ROC") -> Path:
    """``curves``: label → (y_true, scores, auroc). One panel, one line per label."""
    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=110)
    drawn = 0
    for label, (y, s, auc) in curves.items():
        y = np.asarray(y)
        if y.size == 0 or y.min() == y.max():
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1.5, label=f"{label} ({auc:.2f})")
        drawn += 1
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    if drawn:
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no label has both classes\nin the evaluation data", ha="center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def confusion_matrix(matrix, labels: list[str], path: str | Path, title: str) -> Path:
    """Counts matrix (rows true, columns predicted) with numbers in the cells."""
    return confusion_matrices({title: matrix}, labels, path)


def confusion_matrices(
    matrices: dict[str, np.ndarray], labels: list[str], path: str | Path, columns: int = 4
) -> Path:
    """One panel per ``title → counts matrix`` (rows true, columns predicted), side by side."""
    n = max(1, len(matrices))
    cols = min(columns, n)
    rows = -(-n // cols)
    side = 1.2 * len(labels) + 2
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, (side - 0.3) * rows), dpi=110)
    axes = np.atleast_1d(axes).ravel()
    for ax in axes[len(matrices) :]:
        ax.axis("off")
    for ax, (title, matrix) in zip(axes, matrices.items()):
        _draw_confusion(ax, np.asarray(matrix), labels, title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _draw_confusion(ax, matrix: np.ndarray, labels: list[str], title: str) -> None:
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    peak = matrix.max() if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            colour = "white" if peak and matrix[i, j] > peak / 2 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=colour, fontsize=9)


def recall_curves(ranks: dict[str, np.ndarray], path: str | Path, title: str) -> Path:
    """Recall@K against K (log axis) per direction, with chance (K / N) for reference."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    n = 1
    for name, rank in ranks.items():
        rank = np.sort(np.asarray(rank))
        n = max(n, rank.size)
        k = np.arange(1, rank.size + 1)
        recall = np.searchsorted(rank, k, side="right") / max(1, rank.size)
        ax.plot(k, recall, lw=1.5, label=name)
    k = np.arange(1, n + 1)
    ax.plot(k, k / n, ls="--", color="grey", lw=1, label="chance")
    ax.set(xscale="log", xlabel="K", ylabel="recall@K", title=title, ylim=(0, 1.01))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def grounding_overlays(items: list[dict], path: str | Path, columns: int = 4) -> Path:
    """Grid of overlays. Each item: ``image`` H×W uint8, ``heat`` H×W float, ``boxes``
    list of (x, y, w, h) in image pixels, ``sentence`` str, ``cnr`` float."""
    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), dpi=100)
    axes = np.atleast_1d(axes).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, item in zip(axes, items):
        ax.imshow(item["image"], cmap="gray", vmin=0, vmax=255)
        heat = np.asarray(item["heat"], dtype=float)
        span = heat.max() - heat.min()
        heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
        ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        for x, y, w, h in item["boxes"]:
            ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, edgecolor="lime", lw=1.5))
        caption = textwrap.fill(item["sentence"], 38)
        ax.set_title(f"{caption}\nCNR {item['cnr']:.2f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
