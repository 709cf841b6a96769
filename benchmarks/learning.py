"""Evidence that pretraining learns: the demo pipeline for each objective, with intervals.

One phantom dataset (seed 0) is generated and converted once. Then each arm is pretrained
with the demo's towers, data, seed and number of steps; only the objectives differ. Each
arm is evaluated on the test split: zero-shot AUROC per finding and mean, linear probe
against the randomly initialised encoder, retrieval R@5, grounding CNR and edema ordinal
AUCs, each with a 95 % bootstrap interval. Writes ``OUT/learning.md`` and
``OUT/learning.json`` and prints the table. Results accumulate across runs, so
``--only`` reruns some arms.

Arms:

``clip``
    Global contrastive (CLIP/BioViL), the baseline. Its global embedding is the mean of the
    projected patches (BioViL), so its patches can be grounded.
``global_mi_cpc``, ``global_mi_mine``
    Liao et al. 2021 global MI with the separable critic.
``local_mi_cpc``, ``local_mi_mine``
    Liao et al. 2021 local MI as ``recipes/local_mi.yaml`` sets it: separable critic,
    smooth max over regions.
``local_mi_paper``
    Local MI with the paper's concatenation critic and max over regions
    (``recipes/local_mi_paper.yaml``), to show what does not learn.
``biovil_l``
    The ``clip`` arm plus BioViL-L's local word-region alignment (``recipes/biovil_l.yaml``'s
    objectives, words projected to the local width).
``biovil_t``
    The ``clip`` arm with BioViL-T's multi-image encoder (``recipes/biovil_t.yaml``): the
    demo's CNN on the current frontal and its prior, fused (width 128, 3 blocks, 4 heads).
``recipes/demo.yaml`` is the ``local_mi_cpc`` arm.

Every arm is also evaluated on temporal progression (``vlp eval temporal``: a linear SVM
on [current, prior] global embeddings, cross-validated macro-accuracy per finding).

Liao et al.'s orderings to check: local MI grounds better than global MI and CLIP;
local MI's edema ordinal AUCs are at least global MI's. Issue 13's: ``biovil_l`` grounds
better than ``clip`` (BioViL global); ``biovil_t`` beats ``clip`` on temporal progression.

    python benchmarks/learning.py --out runs/learning --minutes 10
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

LOCAL = "{name: local_mi, weight: 1.0, estimator: %s}"
GLOBAL = "{name: global_mi, weight: 1.0, estimator: %s}"
CLIP = [
    "objectives=[{name: clip, weight: 1.0}]",
    "model.global_head=mean_local",
    "model.local_dim=768",
]
ARMS = {
    "clip": CLIP,
    "biovil_l": [
        *CLIP,
        "model.word_dim=768",
        "objectives=[{name: clip, weight: 1.0}, {name: local_alignment, weight: 1.0}]",
    ],
    "biovil_t": [
        *CLIP,
        "model.encoders.image.kind=biovil_t",
        "model.encoders.image.dim=128",
        "model.encoders.image.heads=4",
        "data.priors=1",
        "data.prior_views=[frontal]",
        "data.prior_text=false",
    ],
    "global_mi_cpc": [f"objectives=[{GLOBAL % 'cpc'}]"],
    "global_mi_mine": [f"objectives=[{GLOBAL % 'mine'}]"],
    "local_mi_cpc": [f"objectives=[{LOCAL % 'cpc'}]"],
    "local_mi_mine": [f"objectives=[{LOCAL % 'mine'}]"],
    "local_mi_paper": [
        "objectives=[{name: local_mi, weight: 1.0, estimator: cpc, region_pool: max, "
        "critic: {kind: concat, hidden_dims: [512, 256]}}]"
    ],
}
#: the progression findings the phantom labels.
TEMPORAL_FINDINGS = ("pleural_effusion", "edema", "consolidation", "pneumothorax")
COLUMNS = (
    "zero-shot AUROC Pleural Effusion",
    "zero-shot AUROC Cardiomegaly",
    "zero-shot AUROC Pneumothorax",
    "zero-shot AUROC Edema",
    "zero-shot AUROC Consolidation",
    "zero-shot AUROC Atelectasis",
    "zero-shot mean AUROC",
    "linear probe 10% labels, mean AUROC (pretrained)",
    "linear probe 10% labels, mean AUROC (random init)",
    "retrieval image_to_report R@5",
    "grounding mean CNR",
    "edema ordinal AUC 0v123",
    "edema ordinal AUC 01v23",
    "edema ordinal AUC 012v3",
    *(f"temporal macro-accuracy {f}" for f in TEMPORAL_FINDINGS),
    "temporal mean macro-accuracy",
)


def _cell(entry: dict, column: str) -> str:
    value = entry["metrics"].get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    ci = entry.get("intervals", {}).get(column)
    if ci and all(isinstance(v, float) and math.isfinite(v) for v in ci):
        return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    return f"{value:.3f}"


def table_markdown(table: dict, header: str) -> str:
    arms = [name for name in ARMS if name in table]
    lines = [header, "", "| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for column in COLUMNS:
        lines.append(f"| {column} | " + " | ".join(_cell(table[a], column) for a in arms) + " |")
    chance = [table[a].get("chance_R@5") for a in arms]
    if any(chance):
        lines.append(
            "| retrieval R@5 chance | " + " | ".join(f"{c:.3f}" if c else "" for c in chance) + " |"
        )
    lines.append(
        "| wall time (s) | " + " | ".join(f"{table[a]['elapsed_s']:.0f}" for a in arms) + " |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/learning")
    parser.add_argument("--minutes", type=float, default=10.0, help="demo budget per arm")
    parser.add_argument("--only", nargs="*", default=list(ARMS), choices=list(ARMS))
    args = parser.parse_args()

    from vlp.demo import _phantom_shards, plan, run_demo
    from vlp.evaluation import run_evaluator

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    p = plan(args.minutes, tiny=False)
    shards = _phantom_shards(out, p, time.perf_counter())
    saved = out / "learning.json"
    table = json.loads(saved.read_text()) if saved.is_file() else {}
    for name in args.only:
        print(f"\n##### arm {name} #####", flush=True)
        # Same steps for every arm whatever the load: no time limit.
        overrides = [*ARMS[name], "train.time_limit_minutes=0"]
        summary = run_demo(
            out / name, minutes=args.minutes, extra_overrides=overrides, shards=shards
        )
        retrieval = json.loads((out / name / "eval" / "retrieval" / "results.json").read_text())
        metrics, cis = dict(summary["metrics"]), dict(summary["intervals"])
        temporal = run_evaluator(
            "temporal",
            out / name / "run" / "export",
            shards / "test",
            out / name / "eval" / "temporal",
            bootstrap=p.bootstrap,
        )
        for finding in TEMPORAL_FINDINGS:
            entry = temporal["macro_accuracy"].get(finding, {})
            metrics[f"temporal macro-accuracy {finding}"] = entry.get("value", math.nan)
            cis[f"temporal macro-accuracy {finding}"] = entry.get("ci")
        metrics["temporal mean macro-accuracy"] = temporal["mean_macro_accuracy"]
        table[name] = {
            "metrics": metrics,
            "intervals": cis,
            "elapsed_s": summary["elapsed_s"],
            "steps": p.steps,
            "chance_R@5": retrieval.get("chance_R@5"),
        }
        saved.write_text(json.dumps(table, indent=2))
    header = (
        f"Phantom seed 0, {p.patients} patients at {p.image_size} px, {p.steps} steps per arm "
        f"(the demo's budget of {args.minutes:g} min), the demo's towers (frozen MiniLM, "
        "4-stage half-width Liao ResNet, 8×8 local grid), train seed 0; test split; 95 % "
        "bootstrap intervals in brackets."
    )
    text = table_markdown(table, header)
    (out / "learning.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
