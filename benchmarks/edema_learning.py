"""Edema severity on the phantom: Chauhan et al.'s joint model against CLIP's probe, and
Liao et al. 2019's semi-supervised M2 against its labelled-only twin (issue 15).

On the learning benchmark's phantom shards (``benchmarks/learning.py`` builds them; seed 0,
450 patients; about 57 % of the studies carry an edema severity, 0–3), every arm trains the
same image tower (the demo's half-width Liao ResNet at 256 px), batch 16, ``--steps``
steps, lr 1e-3:

* ``clip``: recipes/clip.yaml with the demo's frozen MiniLM; scored by the edema probe
  (a multinomial logistic regression on its frozen features, every training label);
* ``joint_edema``: recipes/joint_edema.yaml with the same towers; the ranking loss alone
  for the first half, then + severity cross-entropy; scored by its own image head
  (``--classifier objective``) and by the same probe as CLIP;
* ``edema_semisup`` (M2) and ``edema_supervised`` (its twin) at ``data.label_fraction``
  0.05 and 0.2: only that fraction of the training studies keeps its label; scored by
  their own classifier (the probe would see every label); and M2 at 0.2 with 10× the
  recipe's classification weight α.

Metrics on the test split (``vlp eval edema``): ordinal AUCs 0v123, 01v23, 012v3, their
mean, accuracy, with 95 % bootstrap intervals. Writes ``OUT/edema_learning.md`` (and
``.json``) and prints it.

    python benchmarks/edema_learning.py --shards runs/learning/shards --out runs/edema
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch import DEMO_IMAGE_TOWER, DEMO_TEXT_TOWER, export, pretrain, with_ci  # noqa: E402

COMMON = [
    DEMO_IMAGE_TOWER,
    "data.image_size=256",
    "data.batch_size=16",
    "data.workers=1",
    "data.augment={enabled: true, crop_scale: [0.8, 1.0], degrees: 10.0, translate: 0.05}",
    "model.embed_dim=128",
    "model.local_dim=128",
    "model.projection={kind: linear}",
    "optim.lr=1.0e-3",
    "optim.warmup_steps=20",
    "optim.weight_decay=1.0e-4",
    "deepspeed.zero_stage=0",
    "train.log_every=50",
]
WITH_TEXT = [DEMO_TEXT_TOWER, "optim.group_lr={text: 0.0}"]


def arms(steps: int) -> dict:
    """name → (recipe, overrides, classifiers scored)."""
    out = {
        "clip": ("clip.yaml", WITH_TEXT, ("probe",)),
        "joint_edema": (
            "joint_edema.yaml",
            [*WITH_TEXT, f"objectives[1].start_step={steps // 2}"],
            ("objective", "probe"),
        ),
    }
    for fraction in (0.05, 0.2):
        for recipe in ("edema_semisup", "edema_supervised"):
            out[f"{recipe} {fraction:.0%}"] = (
                f"{recipe}.yaml",
                [f"data.label_fraction={fraction}"],
                ("objective",),
            )
    # M2's classification weight α against the summed-pixel bound: the recipe's 100 and 10×.
    out["edema_semisup 20% alpha 1000"] = (
        "edema_semisup.yaml",
        ["data.label_fraction=0.2", "objectives[0].alpha=1000.0"],
        ("objective",),
    )
    return out


METRICS = ("mean_ordinal_auc", "0v123", "01v23", "012v3", "accuracy")


def summarise(results: dict) -> dict:
    row = {"mean_ordinal_auc": {"value": results["mean_ordinal_auc"]}}
    for name in ("0v123", "01v23", "012v3"):
        row[name] = results["ordinal_auc"][name]
    row["accuracy"] = results["accuracy"]
    row["confusion"] = results["confusion"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", default="runs/learning/shards")
    parser.add_argument("--out", default="runs/edema")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--only", nargs="*", default=None, help="arm names (default: all)")
    args = parser.parse_args()
    out, shards = Path(args.out), Path(args.shards)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "edema_learning.json"
    table = json.loads(saved.read_text()) if saved.is_file() else {}

    from vlp.evaluation import run_evaluator

    for name, (recipe, overrides, classifiers) in arms(args.steps).items():
        if args.only and name not in args.only:
            continue
        print(f"\n##### arm {name} #####", flush=True)
        run_dir = out / name.replace(" ", "_").replace("%", "pc")
        pretrain(
            recipe,
            run_dir / "run",
            [
                *COMMON,
                *overrides,
                f"data.shards={shards / 'train'}",
                f"train.steps={args.steps}",
                f"checkpoint.every={args.steps}",
            ],
        )
        exported = export(run_dir / "run", None, run_dir / "export")
        for classifier in classifiers:
            results = run_evaluator(
                "edema",
                exported,
                shards / "test",
                run_dir / f"eval-{classifier}",
                classifier=classifier,
                bootstrap=args.bootstrap,
                figures=True,
            )
            table[f"{name} ({'own head' if classifier == 'objective' else 'probe'})"] = summarise(
                results
            )
        saved.write_text(json.dumps(table, indent=2))

    lines = [
        f"Phantom seed 0 (train split; tested on the test split), {args.steps} steps per arm, "
        "batch 16, the demo's half-width Liao ResNet at 256 px (frozen MiniLM where there is "
        f"text), lr 1e-3; {args.bootstrap} bootstrap resamples. `probe`: logistic regression "
        "on frozen features with every training label; `own head`: the classifier the recipe "
        "trained, with the labels its recipe kept.",
        "",
        "| arm | mean ordinal AUC | 0v123 | 01v23 | 012v3 | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | "
            + " | ".join(with_ci(row[m]["value"], row[m].get("ci")) for m in METRICS)
            + " |"
        )
    text = "\n".join(lines)
    (out / "edema_learning.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
