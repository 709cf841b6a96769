"""Prompts against raw radiographs: ``vlp zero-shot --image a.png --prompt ...``.

One job: score a few typed prompts (or a prompt YAML's classes) against image files the
way the trained model compares an image with a text (its objective's
:class:`vlp.objectives.scoring.Scorer`, as every evaluator does), print each prompt's score
and the softmax over the prompts given, and, with ``heatmap``, write one PNG per image and
prompt with the model's region-score map over the image (the map phrase grounding
evaluates). The dataset-level evaluation stays ``vlp eval zero-shot``.

An image goes through the evaluation loader's geometry: grayscale, the centred square crop,
a bilinear resize to the model's ``data.image_size``; DICOM files are windowed as the
converter does (:mod:`vlp.data.convert.images`). The softmax uses the scorer's
``logit_scale`` (CLIP's learned temperature for the cosine; 1 for critic scores, which are
logits already).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlp.data.transforms import center_square_box
from vlp.evaluation.features import (
    image_size_of,
    model_device,
    model_of,
    scorer_of,
    text_embeddings,
)


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """An image file → uint8 ``1×size×size``: grayscale, centred square crop, bilinear
    resize (what the evaluation loader does to a stored radiograph)."""
    try:
        gray = open_grayscale(path)
    except Exception as err:  # PIL's and pydicom's many error types: one line either way
        raise ValueError(f"{path}: cannot read the image ({type(err).__name__}: {err})") from None
    box = center_square_box(*gray.size)
    resized = gray.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return torch.from_numpy(np.array(resized, dtype=np.uint8)).unsqueeze(0)


def open_grayscale(path: str | os.PathLike) -> Image.Image:
    """A PNG/JPEG/... or DICOM file as an 8-bit grayscale PIL image, as the converter
    stores it (16-bit images min–max scaled; DICOM through its modality and VOI LUTs)."""
    from vlp.data.convert.dicom import is_dicom_file, read_display_pixels
    from vlp.data.convert.images import to_grayscale

    if is_dicom_file(str(path)):
        return Image.fromarray(read_display_pixels(str(path)))
    with Image.open(path) as image:
        image.load()
        return to_grayscale(image).copy()


def prompt_columns(prompts: list[str], prompt_file: str | None) -> tuple[list[str], list]:
    """The prompts scored, and the groups the softmax runs over: the typed prompts form one
    group; each class of a prompt YAML (``vlp.evaluation.zero_shot.load_prompts``) is a
    group of its positive and negative ensembles."""
    from vlp.evaluation.zero_shot import load_prompts

    texts, groups = list(prompts), []
    if prompts:
        groups.append(("prompts", [(p, [i]) for i, p in enumerate(prompts)]))
    if prompt_file:
        for name, entry in load_prompts(prompt_file)["classes"].items():
            members = []
            for polarity in ("positive", "negative"):
                start = len(texts)
                texts += list(entry[polarity])
                members.append((f"{polarity}: {name}", list(range(start, len(texts)))))
            groups.append((name, members))
    if not texts:
        raise ValueError("zero-shot: give at least one --prompt or a --prompts YAML")
    return texts, groups


@torch.no_grad()
def score_images(
    model,
    images: list[str],
    prompts: list[str] = (),
    prompt_file: str | None = None,
    objective: str | None = None,
    heatmap: str | os.PathLike | None = None,
) -> list[dict]:
    """Per image: every prompt's score and, per group, the softmax over its members (a
    class's members are its positive and negative prompt ensembles, scored as the scorer
    ensembles prompts). With ``heatmap`` (a folder) one PNG per image and typed prompt."""
    from vlp.evaluation.zero_shot import ensemble

    scorer = scorer_of(model, objective)
    texts, groups = prompt_columns(list(prompts), prompt_file)
    device = model_device(model)
    size = image_size_of(model)
    text = text_embeddings(model, texts, scorer.text_kind).to(device)
    pixels = torch.stack([load_image(path, size) for path in images]).to(device)
    feats = model_of(model).encode_image(pixels)
    scores = scorer.scores(feats, text).float().cpu()
    # Each group's members scored as the scorer ensembles prompts: B×M per group.
    member_scores = {}
    for group, members in groups:
        if scorer.prompt_ensemble == "embedding":
            member_text = torch.stack([ensemble(text[ix]) for _, ix in members])
            member_scores[group] = scorer.scores(feats, member_text).float().cpu()
        else:
            member_scores[group] = torch.stack([scores[:, ix].mean(1) for _, ix in members], 1)
    scale = float(scorer.logit_scale)
    results = []
    for b, path in enumerate(images):
        entry = {"image": str(path), "scores": dict(zip(texts, scores[b].tolist())), "groups": {}}
        for group, members in groups:
            probs = (scale * member_scores[group][b]).softmax(-1)
            entry["groups"][group] = {name: float(p) for (name, _), p in zip(members, probs)}
        results.append(entry)
    if heatmap is not None:
        # The typed prompts come first in ``texts``: their embeddings are the first rows.
        typed = text[: len(prompts)]
        written = write_heatmaps(scorer, feats, pixels, images, list(prompts), typed, heatmap)
        for entry, paths in zip(results, written):
            entry["heatmaps"] = paths
    return results


def write_heatmaps(scorer, feats, pixels, images, prompts, text, folder) -> list[list[str]]:
    """One PNG per image and typed prompt (``text``: their embeddings): the image with the
    scorer's region map over it (bilinear to the image, as grounding evaluates it)."""
    from vlp.evaluation.grounding import frontal_tokens

    if not prompts:
        raise ValueError("zero-shot --heatmap maps the typed --prompt texts; give at least one")
    if not scorer.has_regions:
        raise ValueError(
            f"zero-shot --heatmap: the model's score ({scorer.description}) has no region "
            "map (its local features share no space with the texts)"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = text.device
    frontal = frontal_tokens(feats)
    gh, gw = frontal["image_grid"]
    size = pixels.shape[-1]
    written = []
    for b, path in enumerate(images):
        index = torch.full((len(prompts),), b, device=device)
        maps = scorer.region_scores(frontal, text, index).float().view(-1, 1, gh, gw)
        heat = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
        paths = []
        for p, prompt in enumerate(prompts):
            fig, (left, right) = plt.subplots(1, 2, figsize=(7.6, 4.0), dpi=100)
            picture = pixels[b, 0].cpu().numpy()
            left.imshow(picture, cmap="gray")
            left.set_title(Path(path).name, fontsize=8)
            right.imshow(picture, cmap="gray")
            shown = right.imshow(heat[p, 0].cpu().numpy(), cmap="jet", alpha=0.4)
            fig.colorbar(shown, ax=right, fraction=0.046, pad=0.04, label="region score")
            right.set_title(f"{prompt!r}: region scores", fontsize=8)
            for ax in (left, right):
                ax.axis("off")
            fig.tight_layout()
            out = folder / f"{Path(path).stem}_{_slug(prompt)}.png"
            fig.savefig(out)
            plt.close(fig)
            paths.append(str(out))
        written.append(paths)
    return written


def _slug(text: str) -> str:
    kept = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    return "_".join(part for part in kept.split("_") if part)[:60] or "prompt"


def format_results(results: list[dict]) -> str:
    """Markdown tables: per image, each prompt's score; per group, its softmax."""
    lines = []
    for entry in results:
        lines += [f"### {entry['image']}", "", "| prompt | score |", "|---|---|"]
        lines += [f"| {t} | {s:.4f} |" for t, s in entry["scores"].items()]
        for group, probs in entry["groups"].items():
            lines += ["", f"| {group}: softmax over | probability |", "|---|---|"]
            lines += [f"| {name} | {p:.3f} |" for name, p in probs.items()]
        for path in entry.get("heatmaps", []):
            lines.append(f"\nheatmap: {path}")
        lines.append("")
    return "\n".join(lines)
