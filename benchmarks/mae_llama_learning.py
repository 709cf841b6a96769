"""Does aligning MAE with a frozen language model help the 14-label head? (issue 14)

On the learning benchmark's phantom shards (``benchmarks/learning.py`` builds them; seed
0), with the CPU-sized ViT of ``benchmarks/mae_learning.py`` (6-block ViT-Tiny, 32-px
patches at 256 px):

1. ``recipes/mae.yaml`` trains ``--mae-steps + --align-steps`` steps, exported at both ends;
2. ``recipes/mae_llama.yaml`` starts from the MAE export at ``--mae-steps``
   (``train.init_from``) and aligns it ``--align-steps`` steps with the frozen text tower
   through attention pooling (InfoNCE). No LLaMA weights are on these machines: the text
   tower is the shipped MiniLM (``tower.name=minilm``) on the same attention-pooling path;
3. ``vlp eval linear-probe`` (a frozen encoder + linear head with binary cross-entropy,
   scikit-learn's logistic regression per label) on the test split for the three encoders:
   the frozen-MAE baseline at the aligned model's start, the MAE trained for the same total
   number of steps (equal budget), and MAE + text. Mean AUROC with 95 % bootstrap intervals
   and mean accuracy, at 10 % and 100 % of the training labels.

Writes ``OUT/mae_llama_learning.md`` (and ``.json``) and prints it.

    python benchmarks/mae_llama_learning.py --shards runs/learning/shards --out runs/mae_llama
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch import export, pretrain, with_ci  # noqa: E402
from mae_learning import OVERRIDES as MAE_OVERRIDES  # noqa: E402

ALIGN_OVERRIDES = [
    *(o for o in MAE_OVERRIDES if not o.startswith("optim.")),
    "model.encoders.text.tower.name=minilm",
    "model.local_dim=192",
    "model.embed_dim=128",
    "model.attention_pool={queries: 1, heads: 4}",
    "deepspeed.zero_stage=2",
    "optim.lr=1.0e-4",
    "optim.warmup_steps=50",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", default="runs/learning/shards")
    parser.add_argument("--out", default="runs/mae_llama")
    parser.add_argument("--mae-steps", type=int, default=600)
    parser.add_argument("--align-steps", type=int, default=600)
    parser.add_argument("--bootstrap", type=int, default=500)
    args = parser.parse_args()
    out, shards = Path(args.out), Path(args.shards)
    out.mkdir(parents=True, exist_ok=True)
    n, m = args.mae_steps, args.align_steps

    mae_run = out / "mae"
    pretrain(
        "mae.yaml",
        mae_run,
        [
            *MAE_OVERRIDES,
            f"data.shards={shards / 'train'}",
            f"train.steps={n + m}",
            f"checkpoint.every={math.gcd(n, m)}",
            "checkpoint.keep=1000",
        ],
    )
    mae_start = export(mae_run, n, out / f"mae-step-{n}")
    mae_equal = export(mae_run, n + m, out / f"mae-step-{n + m}")

    aligned_run = out / "mae_text"
    pretrain(
        "mae_llama.yaml",
        aligned_run,
        [
            *ALIGN_OVERRIDES,
            f"data.shards={shards / 'train'}",
            f"train.steps={m}",
            f"checkpoint.every={m}",
            f"train.init_from={mae_start}",
        ],
    )
    aligned = export(aligned_run, m, out / "mae_text-export")

    from vlp.evaluation import linear_probe
    from vlp.training.export import load_model

    arms = {
        f"frozen MAE ({n} steps), the baseline": mae_start,
        f"MAE ({n + m} steps, equal budget)": mae_equal,
        f"MAE ({n}) + text alignment ({m}), MiniLM through attention pooling": aligned,
    }
    results = {}
    for name, folder in arms.items():
        model, _ = load_model(folder)
        probe = linear_probe.evaluate(
            model,
            shards / "test",
            out / "probe" / folder.name,
            fractions=(0.1, 1.0),
            bootstrap=args.bootstrap,
        )
        results[name] = {
            key: {
                "mean_auroc": probe["pretrained"]["mean_auroc"][key],
                "ci": probe["pretrained"]["mean_auroc_ci"][key]["ci"],
                "mean_accuracy": probe["pretrained"]["mean_accuracy"][key],
            }
            for key in ("10%", "100%")
        }

    lines = [
        f"Phantom seed 0 (train split; probes tested on the test split), batch 16, 6-block "
        f"ViT-Tiny with 32-px patches at 256 px. MAE: 75 % hidden, lr 1.5e-4. Alignment: "
        f"every patch, frozen MiniLM, attention pooling on both sides (1 query, 4 heads), "
        f"InfoNCE, lr 1e-4. Linear probe: frozen encoder, logistic regression per label "
        f"(C on validation AUROC), uncertain labels left out; {args.bootstrap} bootstrap "
        "resamples.",
        "",
        "| encoder | mean AUROC, 10 % labels | accuracy, 10 % | mean AUROC, 100 % labels "
        "| accuracy, 100 % |",
        "|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        few, full = entry["10%"], entry["100%"]
        lines.append(
            f"| {name} | {with_ci(few['mean_auroc'], few['ci'])} | {few['mean_accuracy']:.3f} | "
            f"{with_ci(full['mean_auroc'], full['ci'])} | {full['mean_accuracy']:.3f} |"
        )
    text = "\n".join(lines)
    (out / "mae_llama_learning.md").write_text(text + "\n")
    (out / "mae_llama_learning.json").write_text(json.dumps(results, indent=2))
    print(text)


if __name__ == "__main__":
    main()
