"""Scale on paper: the per-sample work of three recipes, counted, and what it implies for
one 8-GPU H100 node and for 64 of them.

What is *measured* here (on the CPU, one study, ``torch.utils.flop_counter``): the forward
FLOPs of each recipe's image encoder on one study (the views it reads) and of its text
tower on one report and one sentence, at the recipe's sizes. Everything else is
arithmetic on those counts with the assumptions printed beside it:

* training costs 3× the forward pass (forward + backward ≈ 2× forward) for trained parts;
* an H100 SXM gives 989 TFLOP/s dense bf16; sustained model FLOP utilisation (MFU) is
  taken as 35 % for these small-batch vision towers (``--mfu``), so samples/s per GPU =
  0.35 · 989e12 / training FLOPs per sample;
* the anchor against that assumption: open_clip's ViT-B/16 ran at ≈ 338 samples/s per
  A100-40GB over LAION-400M (``docs/PRETRAINED.md``: 176 GPUs, 10,700 GPU-hours, 32
  epochs), I/O and evaluation included;
* CPU decode rates per core are this project's measured loader figures
  (``benchmarks/README.md``, 512-px JPEGs to the training size): 396 studies/s for one
  view and 186/s for three views per core (``--per-core-1``, ``--per-core-3``);
* the gathered bytes per step follow from the objectives' code: ``clip`` all-gathers the
  image and report embeddings (``local_loss`` + ``gather_with_grad``: B·W rows of
  ``embed_dim`` each, and the same back in the backward pass); ``local_mi`` all-gathers
  every rank's local region features (B·W·R rows of ``local_dim``) and scores each rank's
  sentences against all of them.

Run: ``python benchmarks/scale_plan.py`` (about a minute on two cores). It prints the
table that ``benchmarks/README.md`` holds.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
H100_BF16 = 989e12  # dense bf16 FLOP/s, H100 SXM
NVLINK_GBPS = 450.0  # per GPU, each direction (NVLink 4: 900 GB/s both ways)
IB_GBPS_PER_GPU = 50.0  # one 400 Gb/s NIC per GPU

#: (name, recipe, overrides, images per sample, text encodings per sample, views per sample)
ARMS = [
    # local MI: one frontal, its sentences (each encoded alone).
    ("local_mi", "local_mi.yaml", [], 1, ("sentence", 6), 1),
    # CLIP with the ViT-B/16 of the scale question at 224 px.
    (
        "clip ViT-B/16",
        "clip.yaml",
        ["model.encoders.image.tower.name=vit_base_patch16_224"],
        1,
        ("report", 1),
        1,
    ),
    # Med-ST: MoVE over frontal + lateral at the current study and 3 priors (the temporal
    # cycle reads image_global_series and report_series over T = 4 steps).
    ("med_st", "med_st.yaml", [], 4, ("report", 4), 8),
]

REPORT_TOKENS, SENTENCE_TOKENS = 128, 32  # padded lengths of a typical batch


def forward_flops(arm) -> tuple[float, float, int, dict]:
    """Forward FLOPs of the image encoder on one study and of the text encoding of one
    report or sentence; the recipe's embed/local dims and the local grid size."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vlp.config import load_recipe
    from vlp.data.batch import batch_from_images
    from vlp.training.module import build_pretraining_module

    name, recipe, overrides, *_ = arm
    cfg = load_recipe(REPO / "recipes" / recipe, overrides)
    module = build_pretraining_module(cfg.model, cfg.objectives, cfg.data.image_size).eval()
    size = cfg.data.image_size
    views = {v: torch.zeros(1, 1, size, size, dtype=torch.uint8) for v in cfg.data.views}
    batch = batch_from_images(views)
    encoder = module.model.encoders["image"]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoding = encoder(batch)
    image = counter.get_total_flops()
    text_encoder = module.model.encoders["text"]
    kind, _ = arm[4]
    tokens = REPORT_TOKENS if kind == "report" else SENTENCE_TOKENS
    ids = torch.full((1, tokens), 100, dtype=torch.long)
    mask = torch.ones_like(ids)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if kind == "report":
            text_encoder.encode_reports(ids, mask)
        else:
            text_encoder.encode_sentences(ids, mask)
    text = counter.get_total_flops()
    dims = {
        "embed_dim": cfg.model.embed_dim,
        "local_dim": cfg.model.local_dim,
        "regions": int(encoding.local.shape[1]),
        "batch": cfg.data.batch_size,
        "text_lr": cfg.optim.group_lr.get("text", cfg.optim.lr),
    }
    return float(image), float(text), len(cfg.data.views), dims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mfu", type=float, default=0.35, help="model FLOP utilisation")
    parser.add_argument("--per-core-1", type=float, default=396.0, help="1-view studies/s/core")
    parser.add_argument("--per-core-3", type=float, default=186.0, help="3-view studies/s/core")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()

    rows = []
    for arm in ARMS:
        name, _, _, images, (kind, texts), decoded_views = arm
        image, text, _, dims = forward_flops(arm)
        text_factor = 3.0 if dims["text_lr"] > 0 else 1.0  # a frozen tower runs forward only
        train = 3.0 * images * image + text_factor * texts * text
        per_gpu = args.mfu * H100_BF16 / train
        # Decode cost per sample in "single-view studies": 3-view rate for 3 images.
        per_core = args.per_core_1 if decoded_views == 1 else args.per_core_3 * 3 / decoded_views
        rows.append((name, image, text, kind, texts, images, train, per_gpu, per_core, dims))

    print(f"assumptions: H100 {H100_BF16 / 1e12:.0f} TFLOP/s bf16 at MFU {args.mfu:.0%}; "
          f"report {REPORT_TOKENS} tokens, sentence {SENTENCE_TOKENS}; train = 3x forward")  # fmt: skip
    print()
    print("| recipe | image fwd GFLOP/encoding | text fwd GFLOP/encoding | train GFLOP/sample "
          "| samples/s per H100 | per 8-GPU node | per 64 nodes | loader cores per GPU (CPU decode) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, image, text, kind, texts, images, train, per_gpu, per_core, _dims in rows:
        print(
            f"| {name} | {image / 1e9:.2f} (×{images}) | {text / 1e9:.3f} ({kind} ×{texts}) "
            f"| {train / 1e9:.1f} | {per_gpu:,.0f} | {8 * per_gpu:,.0f} | {512 * per_gpu:,.0f} "
            f"| {per_gpu / per_core:.1f} |"
        )
    print()
    print(
        "| recipe | batch/GPU | world | gathered per step (fwd), MB per GPU | time on NVLink / IB |"
    )
    print("|---|---|---|---|---|")
    for name, *_, dims in rows:
        b = dims["batch"]
        for nodes in args.nodes:
            world = 8 * nodes
            if name.startswith("local_mi"):
                rows_in = (world - 1) * b * dims["regions"]
                width = dims["local_dim"]
            else:
                rows_in = 2 * (world - 1) * b  # image and report embeddings
                width = dims["embed_dim"]
            mb = rows_in * width * 2 / 1e6  # bf16
            link = NVLINK_GBPS if nodes == 1 else IB_GBPS_PER_GPU
            print(f"| {name} | {b} | {world} | {mb:.2f} | {mb / 1e3 / link * 1e3:.3f} ms |")


if __name__ == "__main__":
    main()
