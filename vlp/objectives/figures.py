"""Checkpoint-time figures the objectives draw (``Objective.write_figures``): rows of
grayscale images (MAE's reconstructions, M2's and MoPoE's decoded samples)."""

from __future__ import annotations

from pathlib import Path


def image_rows(rows: dict, path: str | Path, title: str) -> Path:
    """One row per ``name → N×H×W`` array (the same N samples in every row), in gray with
    a shared intensity range; NaN pixels are drawn mid-grey (e.g. hidden patches)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(rows)
    n = max(1, max(len(v) for v in rows.values()))
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in rows.values()] or [np.zeros(1)])
    low, high = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    cmap = matplotlib.colormaps["gray"].copy()
    cmap.set_bad("0.5")
    fig, axes = plt.subplots(len(names), n, figsize=(2.4 * n, 2.5 * len(names)), dpi=100)
    axes = np.array(axes).reshape(len(names), n)
    for r, name in enumerate(names):
        for c in range(n):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(rows[name]):
                ax.imshow(np.ma.masked_invalid(rows[name][c]), cmap=cmap, vmin=low, vmax=high)
        axes[r, 0].set_title(name, fontsize=9, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
