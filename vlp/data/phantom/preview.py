"""Preview sheet of a phantom dataset: frontal/lateral pairs with boxes and sentences.

One job: draw a PNG a person can look at to judge realism and check the ground truth,
optionally beside a real radiograph for comparison.
"""

from __future__ import annotations

import tempfile
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

_COLOURS = ["#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa"]


def _pick_studies(records: list[dict], n: int) -> list[dict]:
    """Prefer studies with findings and a lateral view, most varied first."""
    ranked = sorted(
        records,
        key=lambda r: (-(r["views"]["lateral"] is not None), -len(r["findings"]), r["study_id"]),
    )
    seen, out = set(), []
    for r in ranked:
        key = frozenset(r["findings"])
        if key in seen and len(out) < n // 2:
            continue
        seen.add(key)
        out.append(r)
        if len(out) == n:
            break
    return out


def write_preview(data_dir_or_config, out_png, n_studies: int = 6, real_reference=None) -> Path:
    """Write a grid of ``n_studies`` studies (frontal | lateral, boxes, sentences).

    ``data_dir_or_config`` is a written dataset directory or a ``PhantomConfig`` (a small
    dataset is then generated in a temporary directory). ``real_reference``: optional path
    of a real radiograph shown in an extra first row for comparison.
    """
    from vlp.data.phantom.generate import PhantomConfig, generate, read_truth

    if isinstance(data_dir_or_config, PhantomConfig):
        tmp = tempfile.mkdtemp(prefix="phantom-preview-")
        generate(tmp, data_dir_or_config, progress=False)
        data_dir = Path(tmp)
    else:
        data_dir = Path(data_dir_or_config)
    records = _pick_studies(read_truth(data_dir), n_studies)
    rows = len(records) + (1 if real_reference else 0)
    fig, axes = plt.subplots(
        rows, 3, figsize=(15, 5.6 * rows), gridspec_kw={"width_ratios": [1, 1, 1.3]}
    )
    axes = np.atleast_2d(axes)
    r0 = 0
    if real_reference:
        ref = np.asarray(Image.open(real_reference).convert("L"))
        axes[0, 0].imshow(ref, cmap="gray", vmin=0, vmax=255)
        axes[0, 0].set_title(f"real: {Path(real_reference).name}", fontsize=9)
        for ax in axes[0]:
            ax.axis("off")
        r0 = 1
    for i, rec in enumerate(records):
        row = axes[r0 + i]
        study = data_dir / Path(rec["report_path"]).with_suffix("")
        lines = []
        kinds = sorted(rec["findings"])
        colour = {k: _COLOURS[j % len(_COLOURS)] for j, k in enumerate(kinds)}
        for col, key in enumerate(("frontal", "lateral")):
            ax = row[col]
            ax.axis("off")
            v = rec["views"][key]
            if v is None:
                ax.set_title(f"{key}: none", fontsize=9)
                continue
            path = study / f"{v['dicom_id']}.jpg"
            if path.is_file():
                img = np.asarray(Image.open(path))
            else:  # a phantom written as DICOM (image_format dcm)
                from vlp.data.convert.dicom import read_display_pixels

                img = read_display_pixels(str(path.with_suffix(".dcm")))
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{v['view_position']}  s{rec['study_id']}", fontsize=9)
            for kind in kinds:
                for b in rec["findings"][kind]["boxes"].get(key, []):
                    if b is None:
                        continue
                    ax.add_patch(
                        Rectangle(
                            (b[0], b[1]),
                            b[2],
                            b[3],
                            fill=False,
                            edgecolor=colour[kind],
                            linewidth=1.2,
                        )
                    )
        for s in rec["sentences"]:
            mark = {1: "+", -1: "?", 0: "-"}[s["polarity"]]
            tag = f"[{s['finding']}]" if s["finding"] else ""
            lines.append(f"{mark} {s['text']} {tag}")
        ax = row[2]
        ax.axis("off")
        wrapped = "\n".join(textwrap.fill(t, 62, subsequent_indent="   ") for t in lines)
        ax.text(
            0,
            1,
            wrapped,
            va="top",
            ha="left",
            fontsize=7.5,
            family="monospace",
            transform=ax.transAxes,
        )
        for j, kind in enumerate(kinds):
            f = rec["findings"][kind]
            desc = f"{kind} sev={f['severity']} {f.get('side') or ''} {f.get('lobe') or ''}"
            ax.text(
                0,
                -0.02 - 0.035 * j,
                desc,
                color=colour[kind],
                fontsize=8,
                transform=ax.transAxes,
                va="top",
            )
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=70)
    plt.close(fig)
    return out_png


def write_signal_figure(out_png, image_size: int = 256) -> Path:
    """What the phantom gives multi-view and temporal methods, as one PNG.

    Row 1, the lateral-only finding: a small (severity-1) right effusion on the frontal and
    the lateral view, each beside its difference from the same view without it (the
    frontal difference is zero). Row 2, progression: the same frontal (same patient and
    acquisition) with the effusion at three continuous levels (``findings.level``): a prior
    early in grade 2, a worsening within grade 2 (the report says "slightly increased",
    the grade word stays "moderate"), a worsening to grade 3, each labelled as a
    radiologist comparing with the prior would (the MS-CXR-T classes), and the difference
    the within-grade worsening makes.
    """
    from vlp.data.phantom.acquisition import Acquisition
    from vlp.data.phantom.anatomy import Anatomy
    from vlp.data.phantom.render import PatientRenderer

    renderer = PatientRenderer(Anatomy(), image_size)

    def effusion(severity: int, extent: float = 0.5) -> dict:
        if not severity:
            return {}
        finding = {"type": "pleural_effusion", "severity": severity, "side": "right"}
        finding.update(lobe=None, params={"height": 1.0, "meniscus": 0.4, "extent": extent})
        return {"pleural_effusion": finding}

    views = {"frontal": Acquisition(view="PA", noise=0.0), "lateral": Acquisition(view="LATERAL")}
    fig, axes = plt.subplots(2, 4, figsize=(13, 7))
    for col, (view, acq) in enumerate(views.items()):
        with_it, boxes = renderer.render(view, effusion(1), acq, 1.0)
        without, _ = renderer.render(view, {}, acq, 1.0)
        difference = with_it.astype(float) - without.astype(float)
        axes[0, 2 * col].imshow(with_it, cmap="gray", vmin=0, vmax=255)
        axes[0, 2 * col].set_title(f"{view}, small effusion", fontsize=9)
        for b in boxes.get("pleural_effusion", []):
            axes[0, 2 * col].add_patch(
                Rectangle((b[0], b[1]), b[2], b[3], fill=False, edgecolor="#ff3b30", lw=1.2)
            )
        axes[0, 2 * col + 1].imshow(difference, cmap="magma", vmin=0, vmax=40)
        peak = float(np.abs(difference).max())
        axes[0, 2 * col + 1].set_title(f"{view}: with − without (max {peak:.0f})", fontsize=9)
    acq = views["frontal"]
    # (severity, extent): levels 1.6, 2.3 and 3.0.
    course = [(2, 0.1), (2, 0.8), (3, 0.5)]
    series = [renderer.render("frontal", effusion(*g), acq, 1.0)[0] for g in course]
    labels = ["level 1.6, moderate (prior)", "2.3, moderate: worsening", "3.0, large: worsening"]
    for col, (image, label) in enumerate(zip(series, labels)):
        axes[1, col].imshow(image, cmap="gray", vmin=0, vmax=255)
        axes[1, col].set_title(f"effusion {label}", fontsize=9)
    axes[1, 3].imshow(series[1].astype(float) - series[0].astype(float), cmap="magma")
    axes[1, 3].set_title("within grade 2: level 2.3 − 1.6", fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("Phantom: a lateral-only finding, and progression the frontal shows", fontsize=11)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png
