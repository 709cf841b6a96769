"""``vlp demo``: the whole product on the embedded phantom, on a laptop CPU, offline.

Stages (each shows progress, and each is skipped on a second run with the same inputs):

1. ``phantom``  — generate a phantom dataset sized to the time budget;
2. ``shards``   — convert it with the same converter as MIMIC-CXR-JPG (``tools/make_shards.py``);
3. ``pretrain`` — ``recipes/demo.yaml`` (extends ``local_mi.yaml``: Liao et al. 2021 local MI
   with the offline MiniLM text tower) under DeepSpeed, then ``vlp export``;
4. ``evaluate`` — zero-shot AUROC per finding, linear probe at 10 % labels against the same
   probe on a randomly initialised encoder, retrieval R@5, grounding CNR, edema ordinal AUCs;
5. ``report``   — a compact table on stdout and ``OUT/report.md`` with the table, ROC curves,
   grounding overlays and the TensorBoard command.

``--tiny`` shrinks every stage (tiny towers, a few steps) for the CI test.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of each stage for a time budget."""

    patients: int
    image_size: int
    steps: int
    recipe: str
    overrides: tuple[str, ...]
    bootstrap: int


def plan(minutes: float, tiny: bool) -> DemoPlan:
    if tiny:
        return DemoPlan(
            patients=40,
            image_size=128,
            steps=3,
            recipe="debug.yaml",
            overrides=("data.image_size=64", "data.workers=0", "checkpoint.every=1000"),
            bootstrap=50,
        )
    # Measured on this project's 2-core machines (quiet), README command (1): 0.54 s per
    # step of demo.yaml (batch 16, frozen and cached MiniLM, 4-stage half-width Liao
    # ResNet at 256 px), and about 90 s for the rest: phantom and conversion, DeepSpeed's
    # start, export and evaluation. Training gets the rest of the budget less a margin. A
    # time limit (checkpoint, then stop) keeps the budget on a slower or busier machine.
    budget_s = max(120.0, 60.0 * minutes)
    fixed_s, margin_s, step_s = 90.0, 50.0, 0.45
    train_s = max(30.0, budget_s - fixed_s - margin_s)
    steps = max(20, int(train_s / step_s))
    limit_minutes = max(0.5, (budget_s - fixed_s - 0.5 * margin_s) / 60.0)
    return DemoPlan(
        patients=int(min(1200, max(150, 0.75 * budget_s))),
        image_size=256,
        steps=steps,
        recipe="demo.yaml",
        overrides=(
            "data.workers=1",
            f"train.time_limit_minutes={limit_minutes:.2f}",
            f"checkpoint.every={max(1, steps // 2)}",
        ),
        bootstrap=200,
    )


def _stage(name: str, t0: float) -> None:
    print(f"\n=== vlp demo: {name} (t+{time.perf_counter() - t0:.0f}s) ===", flush=True)


def _fmt(value) -> str:
    if isinstance(value, dict) and "value" in value:
        value = value["value"]
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return f"{value:.3f}"
    return "n/a"


def _value(value) -> float:
    if isinstance(value, dict):
        value = value.get("value", float("nan"))
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


#: The findings the demo reports, and whose mean zero-shot AUROC is its headline: the
#: phantom's findings that its prompts name and its test split holds both ways. The mean
#: over every class of the prompt file (Pneumonia, Lung Lesion, Support Devices, ... too)
#: is reported beside it.
DEMO_FINDINGS = (
    "Pleural Effusion",
    "Cardiomegaly",
    "Pneumothorax",
    "Edema",
    "Consolidation",
    "Atelectasis",
)


def _interval(value) -> list[float] | None:
    if isinstance(value, dict) and "ci" in value:
        return [float(v) if v is not None else math.nan for v in value["ci"]]
    return None


def headline(results: dict) -> list[tuple[str, object]]:
    """The headline metrics of the demo as (name, raw result): a float or a dict with
    ``value`` and a bootstrap ``ci``."""
    rows: list[tuple[str, object]] = []
    zs = results.get("zero_shot", {})
    for finding in DEMO_FINDINGS:
        if finding in zs.get("auroc", {}):
            rows.append((f"zero-shot AUROC {finding}", zs["auroc"][finding]))
    if "headline" in zs:
        rows.append(("zero-shot mean AUROC", zs["headline"]["mean_auroc"]))
    classes = len(zs.get("auroc", {}))
    rows.append(
        (
            f"zero-shot mean AUROC, all {classes} prompt classes",
            zs.get("mean_auroc_ci", zs.get("mean_auroc")),
        )
    )
    lp = results.get("linear_probe", {})
    for name, block in (
        ("pretrained", lp.get("pretrained", {})),
        ("random init", lp.get("random_init", {})),
    ):
        mean = block.get("mean_auroc_ci", block.get("mean_auroc", {})).get("10%")
        rows.append((f"linear probe 10% labels, mean AUROC ({name})", mean))
    rt = results.get("retrieval", {})
    for direction, block in rt.items():
        if isinstance(block, dict) and "R@5" in block:
            rows.append((f"retrieval {direction} R@5", block["R@5"]))
    gr = results.get("grounding", {})
    rows.append(("grounding mean CNR", gr.get("mean_cnr")))
    ed = results.get("edema", {})
    for name, value in ed.get("ordinal_auc", {}).items():
        rows.append((f"edema ordinal AUC {name}", value))
    return rows


def summarise(results: dict) -> list[tuple[str, float]]:
    """The headline metrics of the demo, as (name, value) rows."""
    return [(name, _value(raw)) for name, raw in headline(results)]


def intervals(results: dict) -> dict[str, list[float]]:
    """95 % bootstrap intervals of the headline metrics that have one."""
    return {name: ci for name, raw in headline(results) if (ci := _interval(raw)) is not None}


#: What "pretraining learns" means for the demo, as (criterion, target): each must be met
#: or exceeded. The probe's is a gain over the randomly initialised encoder; retrieval's a
#: multiple of chance (5 / studies for R@5); grounding's is BioViL's range on MS-CXR
#: (CNR 1.07-1.33, Boecking et al. 2022; Bannur et al. 2023).
LEARNING_TARGETS = (
    ("zero-shot mean AUROC", 0.80),
    ("linear probe gain over random init (10% labels)", 0.05),
    ("retrieval image_to_report R@5 / chance", 3.0),
    ("grounding mean CNR", 1.0),
)


def learning_checks(results: dict, rows: list[tuple[str, float]]) -> list[tuple[str, float, float]]:
    """(criterion, measured, target) for each of :data:`LEARNING_TARGETS`."""
    values = dict(rows)
    gain = values.get("linear probe 10% labels, mean AUROC (pretrained)", math.nan) - values.get(
        "linear probe 10% labels, mean AUROC (random init)", math.nan
    )
    chance = _value(results.get("retrieval", {}).get("chance_R@5"))
    r5 = values.get("retrieval image_to_report R@5", math.nan)
    measured = {
        "zero-shot mean AUROC": values.get("zero-shot mean AUROC", math.nan),
        "linear probe gain over random init (10% labels)": gain,
        "retrieval image_to_report R@5 / chance": r5 / chance if chance > 0 else math.nan,
        "grounding mean CNR": values.get("grounding mean CNR", math.nan),
    }
    return [(name, measured[name], target) for name, target in LEARNING_TARGETS]


def _check_lines(checks) -> list[str]:
    return [
        f"| {name} | {_fmt(value)} | ≥ {target:g} | {'yes' if value >= target else 'no'} |"
        for name, value, target in checks
    ]


def _phantom_shards(out: Path, p: DemoPlan, t0: float) -> Path:
    """Stages 1–2: phantom tree and its shards under ``out`` (reused when unchanged)."""
    from vlp.data.convert.api import ConvertOptions
    from vlp.data.phantom import PhantomConfig
    from vlp.data.phantom_cache import build_phantom_shards

    _stage("1-2/5 phantom data, converted to WebDataset shards (tools/make_shards.py mimic)", t0)
    phantom_cfg = PhantomConfig(patients=p.patients, seed=0, image_size=p.image_size, workers=2)
    options = ConvertOptions(image_size=p.image_size, priors=1, shard_size=100, workers=2)
    return build_phantom_shards(out, phantom_cfg, options, preview=out / "phantom_preview.png")


def run_demo(
    out: str | Path = "runs/demo",
    minutes: float = 10.0,
    tiny: bool = False,
    extra_overrides: list[str] | None = None,
    shards: Path | None = None,
) -> dict:
    """Run the demo; ``extra_overrides`` change the recipe (benchmarks/learning.py swaps the
    objective), ``shards`` reuses converted phantom shards instead of stages 1–2."""
    from vlp.evaluation import edema, grounding, linear_probe, retrieval, zero_shot
    from vlp.training.export import export, load_model
    from vlp.training.trainer import pretrain

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    p = plan(minutes, tiny)
    print(
        f"vlp demo: {p.patients} phantom patients at {p.image_size} px, {p.steps} training steps, output in {out}"
    )

    if shards is not None:
        _stage("1-2/5 reusing phantom shards " + str(shards), t0)
    else:
        shards = _phantom_shards(out, p, t0)

    # 3. pretrain + export (resume auto: a second run with the same plan trains nothing)
    _stage(f"3/5 pretrain recipes/{p.recipe} under DeepSpeed", t0)
    run_dir = out / "run"
    overrides = [f"data.shards={shards / 'train'}", f"train.steps={p.steps}", *p.overrides]
    overrides += list(extra_overrides or [])
    pretrain(RECIPES / p.recipe, overrides=overrides, run_dir=run_dir, resume="auto")

    export(run_dir)
    model, cfg = load_model(run_dir / "export")

    # 4. evaluate on the test split (train/validate splits for probes and thresholds). The
    # tiny mode's test split holds a handful of studies, so it evaluates on the training
    # split: it checks the wiring, not generalisation.
    _stage("4/5 evaluate", t0)
    test = shards / ("train" if tiny else "test")
    cache = out / "eval" / "cache"
    splits = {
        "train_data": str(shards / "train"),
        "val_data": str(shards / "validate"),
        "cache_dir": cache,
    }
    common = {"figures": True, "seed": 0, "bootstrap": p.bootstrap, "batch_size": 32}
    results = {
        "zero_shot": zero_shot.evaluate(
            model, test, out / "eval" / "zero_shot", headline_classes=list(DEMO_FINDINGS), **common
        ),
        "linear_probe": linear_probe.evaluate(
            model,
            test,
            out / "eval" / "linear_probe",
            fractions=(0.1,),
            random_init=True,
            **splits,
            **common,
        ),
        "retrieval": retrieval.evaluate(
            model, test, out / "eval" / "retrieval", cache_dir=cache, **common
        ),
        "grounding": grounding.evaluate(model, test, out / "eval" / "grounding", **common),
        "edema": edema.evaluate(model, test, out / "eval" / "edema", **splits, **common),
    }

    # 5. report
    _stage("5/5 report", t0)
    rows = summarise(results)
    checks = learning_checks(results, rows)
    elapsed = time.perf_counter() - t0
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {_fmt(value)}" for name, value in rows))
    print("\ndoes pretraining learn? (measured / target)")
    for name, value, target in checks:
        verdict = "yes" if value >= target else "no"
        print(f"  {name:<{width}}  {_fmt(value)} / {target:g}  {verdict}")
    report = write_report(out, rows, results, p, run_dir, elapsed, checks)
    print(
        f"\nreport: {report}\nTensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}\ntotal {elapsed:.0f}s"
    )
    summary = {
        "metrics": dict(rows),
        "intervals": intervals(results),
        "checks": {name: {"value": value, "target": target} for name, value, target in checks},
        "elapsed_s": elapsed,
        "plan": p.__dict__,
    }
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _figures(results: dict) -> list[tuple[str, str]]:
    found = []
    for name, block in results.items():
        figs = block.get("figures") if isinstance(block, dict) else None
        if isinstance(figs, dict):
            for key, path in figs.items():
                if isinstance(path, str) and path.endswith(".png"):
                    found.append((f"{name}: {key}", path))
    return found


def _fmt_ci(ci) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""


def write_report(
    out: Path, rows, results: dict, p: DemoPlan, run_dir: Path, elapsed: float, checks=()
) -> Path:
    cis = intervals(results)
    lines = [
        "# vlp demo report",
        "",
        f"Phantom: {p.patients} patients at {p.image_size} px (seed 0). Recipe: `recipes/{p.recipe}`, "
        f"{p.steps} steps. Wall time {elapsed:.0f} s. Evaluated on the phantom test split.",
        "",
        "| metric | value | 95% bootstrap CI |",
        "|---|---|---|",
        *[f"| {name} | {_fmt(value)} | {_fmt_ci(cis.get(name))} |" for name, value in rows],
        "",
        "## Does pretraining learn?",
        "",
        "| criterion | measured | target | met |",
        "|---|---|---|---|",
        *_check_lines(checks),
        "",
        f"TensorBoard: `tensorboard --logdir {run_dir / 'tensorboard'}`",
        "",
    ]
    if (out / "phantom_preview.png").is_file():
        lines += ["## Phantom preview", "", "![phantom](phantom_preview.png)", ""]
    for title, path in _figures(results):
        rel = os.path.relpath(Path(path).resolve(), out.resolve())
        lines += [f"## {title}", "", f"![{title}]({rel})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
