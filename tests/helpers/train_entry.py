"""Entry point the trainer tests launch (directly or under torchrun).

``--synthetic`` replaces the shard loader with deterministic global batches: rank r of W
receives rows [r·b, (r+1)·b) of the same global batch a single process receives whole, so
a W-rank run and a 1-process run see identical data per step.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from vlp.data.batch import batch_from_images

SENTENCES = [
    "Small left pleural effusion.",
    "The heart size is normal.",
    "No pneumothorax.",
    "Mild pulmonary edema.",
    "Right lower lobe consolidation.",
    "Lungs are clear.",
    "Stable cardiomegaly.",
    "Endotracheal tube in place.",
]


def synthetic_batches(
    rank: int, world: int, tokenizer, global_batch: int, image_size: int, seed: int = 0
):
    per_rank = global_batch // world
    step = 0
    while True:
        gen = torch.Generator().manual_seed(seed * 100003 + step)
        images = torch.randint(
            0, 256, (global_batch, 1, image_size, image_size), generator=gen, dtype=torch.uint8
        )
        picks = torch.randint(0, len(SENTENCES), (global_batch, 2), generator=gen).tolist()
        rows = range(rank * per_rank, (rank + 1) * per_rank)
        reports = [" ".join(SENTENCES[j] for j in picks[i]) for i in rows]
        sentences = [SENTENCES[j] for i in rows for j in picks[i]]
        rep = tokenizer(reports, padding=True, truncation=True, max_length=32, return_tensors="pt")
        sen = tokenizer(
            sentences, padding=True, truncation=True, max_length=16, return_tensors="pt"
        )
        yield batch_from_images(
            {"frontal": images[rank * per_rank : (rank + 1) * per_rank]},
            keys=[f"s{step}-{i}" for i in rows],
            study_id=torch.tensor(list(rows), dtype=torch.int64) + 1000 * step,
            report_input_ids=rep["input_ids"],
            report_attention_mask=rep["attention_mask"],
            sentence_input_ids=sen["input_ids"],
            sentence_attention_mask=sen["attention_mask"],
            sentence_index=torch.arange(per_rank).repeat_interleave(2),
        )
        step += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True, help="JSON file for this rank's losses")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--reshard", action="store_true")
    parser.add_argument(
        "--synthetic", type=int, default=0, help="global batch size of synthetic data"
    )
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()

    from vlp.config import load_recipe
    from vlp.training.trainer import pretrain

    cfg = load_recipe(args.recipe, args.set)
    source = None
    if args.synthetic:

        def source(rank, world, tokenizer):
            return synthetic_batches(rank, world, tokenizer, args.synthetic, cfg.data.image_size)

    history = pretrain(
        cfg, run_dir=args.run_dir, resume=args.resume, reshard=args.reshard, batch_source=source
    )
    rank = int(os.environ.get("RANK", 0))
    with open(f"{args.out}.rank{rank}", "w") as f:
        json.dump(history, f)


if __name__ == "__main__":
    main()
