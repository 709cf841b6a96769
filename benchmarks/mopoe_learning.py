"""Does MoPoE learn on the phantom? Subset probes of its latent after CPU-sized training.

Trains ``recipes/mopoe.yaml`` shrunk to CPU size (two ResNet-18 towers at 64 px, the MiniLM
text tower trainable at its recipe rate, 64-px decoders 16 channels wide, the first 64
word pieces, batch 16) on the learning benchmark's phantom shards (``benchmarks/learning.py``
builds them: ``--shards`` holds ``train``/``validate``/``test``), exports the run, and runs
``vlp eval subset-probe`` on the test split with probes trained on the train split: mean
average precision over the CheXpert labels per modality subset (F, L, T, F+L, F+T, L+T,
F+L+T) with 95 % bootstrap intervals, and the decoded samples.

Writes ``OUT/mopoe_learning.md`` (and ``OUT/subset-probe/``) and prints the table.

    python benchmarks/mopoe_learning.py --shards runs/learning/shards --out runs/mopoe --steps 800
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch import export, pretrain, with_ci  # noqa: E402

OVERRIDES = [
    "data.image_size=64",
    "data.batch_size=16",
    "data.workers=1",
    "data.max_text_length=64",
    "model.encoders.image.tower.name=resnet18",
    "model.encoders.lateral.tower.name=resnet18",
    "objectives=[{name: mopoe, weight: 1.0, latent_dim: 64, beta: 5.0, decoder_size: 64, "
    "decoder_width: 16, max_text_tokens: 64}]",
    "train.log_every=20",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", default="runs/learning/shards")
    parser.add_argument("--out", default="runs/mopoe")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides"
    )
    args = parser.parse_args()
    out, shards = Path(args.out), Path(args.shards)
    for split in ("train", "test"):
        if not (shards / split / "manifest.json").is_file():
            sys.exit(
                f"{shards / split}: no manifest.json (build the shards with benchmarks/learning.py)"
            )
    run_dir = out / "run"
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*OVERRIDES, f"data.shards={shards / 'train'}", f"train.steps={args.steps}"]
    overrides += [f"checkpoint.every={max(1, args.steps // 4)}", *args.set]
    pretrain("mopoe.yaml", run_dir, overrides)
    export(run_dir, None, run_dir / "export")

    from vlp.evaluation import subset_probe
    from vlp.training.export import load_model

    model, _ = load_model(run_dir / "export")
    results = subset_probe.evaluate(
        model,
        shards / "test",
        out / "subset-probe",
        train_data=shards / "train",
        bootstrap=args.bootstrap,
    )
    lines = [
        f"MoPoE on the phantom ({shards}), {args.steps} steps, batch 16, ResNet-18 towers at "
        "64 px, MiniLM text, 64-px decoders; probes trained on train, scored on test.",
        "",
        "| subset | mean AP [95% CI] | train studies | test studies "
        "| mean AP on studies with F+L+T |",
        "|---|---|---|---|---|",
    ]
    for name, entry in results["subsets"].items():
        mean_ap, on_all = entry["mean_ap"], entry["mean_ap_all_modalities"]
        lines.append(
            f"| {name} | {with_ci(mean_ap['value'], mean_ap['ci'])} | {entry['train_studies']} "
            f"| {entry['test_studies']} | {with_ci(on_all['value'], on_all['ci'])} |"
        )
    figures = sorted(
        (run_dir / "figures").glob("mopoe_samples_step-*.png"),
        key=lambda path: int(path.stem.rsplit("-", 1)[1]),
    )
    lines += [
        "",
        f"Samples: {results['figures'].get('samples', 'none')}; texts: "
        f"{results.get('texts', {}).get('file', 'none')}; training figure: "
        f"{figures[-1] if figures else 'none'}",
    ]
    text = "\n".join(lines)
    (out / "mopoe_learning.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
