"""The ``vlp`` console script.

Each subcommand parses its own arguments here and imports the module that does the work
only when it runs, so ``vlp --help`` answers without importing torch, DeepSpeed or
transformers. Expected failures (a bad recipe, a missing file, bad input data) print one
line ``vlp <command>: error: <reason>`` and exit with status 2; set ``VLP_DEBUG=1`` to get
the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable

EPILOG = "Docs: README.md and docs/architecture.md. VLP_DEBUG=1 shows tracebacks."
# `vlp shards` is dispatched before argparse (see main), so the top-level help names it here.
SHARDS_EPILOG = (
    "Also `vlp shards {mimic,iu,csv,dicom} ...`: convert MIMIC-CXR (JPG or DICOM), IU X-ray, "
    "a CSV table or a folder of DICOM radiographs to "
    "WebDataset shards (the converter of tools/make_shards.py; `vlp shards mimic --help` "
    "lists the options of one adapter)."
)


class UserError(Exception):
    """An error caused by the user's input, reported without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``vlp pretrain: error: <reason> (see --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- commands


def cmd_pretrain(args: argparse.Namespace) -> int:
    from vlp.training.trainer import pretrain

    pretrain(
        args.recipe,
        overrides=args.set,
        run_dir=args.run_dir,
        resume=args.resume,
        reshard=args.reshard,
    )
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from vlp.training.submit import submit

    submit(
        args.recipe,
        overrides=args.set,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        account=args.account,
        time_min=args.time,
        cpus_per_task=args.cpus_per_task,
        run_dir=args.run_dir,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vlp.training.export import export
    from vlp.training.formats import NotExpressible

    try:
        export(args.run_dir, out=args.out, step=args.step, fmt=args.format, evals=args.eval)
    except NotExpressible as err:  # the model has a part the format cannot hold: one line
        raise UserError(str(err)) from None
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from vlp.data.phantom import PhantomConfig, generate, write_preview

    if args.out is None and args.preview is None:
        raise UserError("give --out DIR (generate a dataset) and/or --preview PNG")
    config = PhantomConfig(
        patients=args.patients,
        seed=args.seed,
        image_size=args.image_size,
        workers=args.workers,
        image_format=args.image_format,
    )
    try:
        config.validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.out is not None:
        summary = generate(args.out, config)
        print(
            f"phantom: wrote {summary.get('studies', '?')} studies of {summary.get('patients', '?')} patients to {args.out}"
        )
    if args.preview is not None:
        source = args.out if args.out is not None else config
        write_preview(source, args.preview)
        print(f"phantom: preview written to {args.preview}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vlp.evaluation import run_evaluator

    values = {k: v for k, v in vars(args).items() if k not in ("func", "command", "task")}
    run_evaluator(args.task, **values)
    return 0


def cmd_zero_shot(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from vlp.evaluation.prompting import format_results, score_images
    from vlp.training.export import load_model

    model, _ = load_model(args.checkpoint)
    try:
        results = score_images(
            model,
            args.image,
            prompts=args.prompt or [],
            prompt_file=args.prompts,
            objective=args.scorer,
            heatmap=args.heatmap,
        )
    except ValueError as err:  # bad images, prompts or scorer: one line, no traceback
        raise UserError(str(err)) from None
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vlp.demo import run_demo

    run_demo(out=args.out, minutes=args.minutes, tiny=args.tiny)
    return 0


# ---------------------------------------------------------------------------- parsers


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/local_mi.yaml")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value by its dotted key, typed by the schema (repeatable), "
        "e.g. --set train.steps=100 --set optim.lr=1e-4",
    )
    parser.add_argument(
        "--run-dir", default=None, help="run directory (default: runs/<recipe name>)"
    )


def _add_eval_parsers(parser: argparse.ArgumentParser) -> None:
    """``vlp eval TASK`` for every registered evaluator: the common options, then the
    fields of the evaluator's options dataclass as flags."""
    import dataclasses

    from vlp import registry

    tasks = parser.add_subparsers(dest="task", metavar="TASK", parser_class=_Parser)
    tasks.required = True
    for name in registry.names("evaluator"):
        options = registry.get("evaluator", name).config
        summary = (options.__doc__ or name).strip()
        p = tasks.add_parser(name, help=summary, description=summary, epilog=EPILOG)
        p.add_argument("--checkpoint", required=True, help="export folder or run directory")
        p.add_argument(
            "--data", required=True, help="shards: manifest.json, its folder, or a brace pattern"
        )
        p.add_argument(
            "--out", required=True, help="output folder for results.json, results.md, figures"
        )
        p.add_argument("--figures", action="store_true", help="also write PNG figures")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs"
        )
        for f in dataclasses.fields(options):
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            help_text = f.metadata.get("help")
            if f.type in (bool, "bool"):
                p.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            else:
                p.add_argument(
                    flag,
                    dest=f.name,
                    default=f.default,
                    choices=f.metadata.get("choices"),
                    help=help_text,
                )


SCORER_HELP_CLI = (
    "score with this objective's scorer (default: the recipe's first objective that defines one)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vlp",
        description="Vision-language pretraining for chest radiographs and reports: "
        "convert data to WebDataset shards, pretrain with DeepSpeed, evaluate.",
        epilog=f"{SHARDS_EPILOG} {EPILOG}",
    )
    parser.add_argument("--version", action="version", version=f"vlp {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "pretrain",
        help="pretrain a model from a recipe (one process, torchrun or Slurm srun)",
        description="Pretrain from a recipe under DeepSpeed. Launch mode (single process, "
        "torchrun, Slurm srun) is detected from the environment. A recipe without data "
        "paths trains on phantom shards generated into a cache on first use.",
        epilog=EPILOG,
    )
    _add_recipe_args(p)
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' continues from the newest completed step-N/ checkpoint of the run "
        "directory; a path resumes from that checkpoint",
    )
    p.add_argument(
        "--reshard",
        action="store_true",
        help="let --resume continue a checkpoint written by another number of ranks: "
        "weights and optimizer through DeepSpeed's universal checkpoint (converted once "
        "into step-N/universal/), the loader restarting the saved epoch, RNGs reseeded",
    )
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "submit",
        help="submit a pretraining job to Slurm via submitit (checkpoint and requeue on timeout)",
        description="Submit `vlp pretrain RECIPE` to Slurm through submitit, one task per GPU.",
        epilog=EPILOG,
    )
    _add_recipe_args(p)
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument(
        "--gpus-per-node", type=int, default=1, help="GPUs (= tasks) per node (default 1)"
    )
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--account", default=None, help="Slurm account")
    p.add_argument("--time", type=int, default=60 * 24, help="time limit in minutes (default 1440)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task (default 8)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "export",
        help="consolidate a run's sharded checkpoint into model.safetensors + config.yaml",
        description="Consolidate the newest (or --step) DeepSpeed checkpoint of RUN_DIR into "
        "one model.safetensors and config.yaml that the evaluators load without DeepSpeed, "
        "or (--format) into a folder open_clip or transformers + timm load; every export "
        "writes a model card README.md.",
        epilog=EPILOG,
    )
    p.add_argument("run_dir", help="run directory written by vlp pretrain")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default RUN_DIR/export, RUN_DIR/export-open_clip, RUN_DIR/export-hf)",
    )
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument(
        "--format",
        choices=("vlp", "open_clip", "hf"),
        default="vlp",
        help="vlp: what vlp eval loads (default); open_clip: a folder open_clip loads "
        "(create_model_and_transforms('local-dir:FOLDER')); hf: the text tower by "
        "save_pretrained, the image tower by timm's save_for_hf, the projections in "
        "safetensors + JSON",
    )
    p.add_argument(
        "--eval",
        action="append",
        default=None,
        metavar="PATH",
        help="results.md (or a folder holding one) for the model card README.md; repeatable "
        "(default: every RUN_DIR/eval*/results.md)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "phantom",
        help="generate the built-in phantom dataset (MIMIC-CXR-JPG layout, exact ground truth)",
        description="Generate phantom chest radiographs and reports with exact labels, boxes "
        "and progression, laid out like MIMIC-CXR-JPG so tools/make_shards.py mimic reads it.",
        epilog=EPILOG,
    )
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--patients", type=int, default=200, help="number of patients (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--image-size", type=int, default=512, help="long side in pixels (default 512)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument(
        "--image-format",
        choices=("jpg", "dcm"),
        default="jpg",
        help="jpg (MIMIC-CXR-JPG, default) or dcm (12-bit DICOM, the MIMIC-CXR layout)",
    )
    p.add_argument("--preview", default=None, metavar="PNG", help="write a preview grid of studies")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (vlp eval --help lists the evaluators)",
        description="Evaluate an exported checkpoint (or run directory) on shards with a "
        "registered evaluator (vlp.evaluation.evaluators).",
        epilog=EPILOG,
    )
    _add_eval_parsers(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "zero-shot",
        help="score typed prompts against image files (PNG, JPEG, DICOM), with heatmaps",
        description="Score prompts against raw radiographs with a trained model's own "
        "image-text score: each prompt's score and the softmax over the prompts, per image; "
        "--heatmap writes the region-score map of each prompt over each image. The "
        "dataset-level AUROC evaluation is `vlp eval zero-shot`.",
        epilog=EPILOG,
    )
    p.add_argument("--checkpoint", required=True, help="export folder or run directory")
    p.add_argument("--image", nargs="+", required=True, help="image files (PNG, JPEG, DICOM)")
    p.add_argument(
        "--prompt", action="append", help="a prompt (repeat: the softmax runs over them)"
    )
    p.add_argument("--prompts", default=None, help="a prompt YAML (vlp eval zero-shot's format)")
    p.add_argument("--scorer", default=None, help=SCORER_HELP_CLI)
    p.add_argument(
        "--heatmap", default=None, metavar="DIR", help="write one PNG per image and prompt"
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=cmd_zero_shot)

    p = sub.add_parser(
        "demo",
        help="the whole path on phantom data: generate, convert, pretrain, evaluate, report",
        description="Generate a phantom dataset, convert it to shards, pretrain the local-MI "
        "recipe under DeepSpeed and evaluate it; writes DIR/report.md with tables and figures.",
        epilog=EPILOG,
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument(
        "--minutes", type=float, default=10.0, help="time budget in minutes (default 10)"
    )
    p.add_argument("--tiny", action="store_true", help="a minimal run for tests (about a minute)")
    p.set_defaults(func=cmd_demo)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vlp")
    except Exception:
        return "unknown"


def _expected_errors() -> tuple[type[BaseException], ...]:
    from vlp.config.loader import ConfigError
    from vlp.data.loader import TooManySkipped
    from vlp.evaluation.features import EvaluationInputError
    from vlp.training.checkpoint import CheckpointWriteError, WorldSizeChanged
    from vlp.training.trainer import CollectiveFailed, NonFiniteLoss

    return (
        UserError,
        FileNotFoundError,
        ConfigError,
        TooManySkipped,
        NonFiniteLoss,
        CheckpointWriteError,
        CollectiveFailed,
        WorldSizeChanged,
        EvaluationInputError,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["shards"]:
        # Not an argparse subcommand: everything after `shards` belongs to the converter's
        # own parser (--help included), which argparse's REMAINDER would not pass on when it
        # starts with an option.
        from vlp.data.convert import main as convert_main

        return convert_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print(f"vlp {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("VLP_DEBUG") or not isinstance(err, _expected_errors()):
            raise
        print(f"vlp {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroy the process group a command started before the interpreter exits.

    Left to the interpreter's shutdown, the group's C++ threads can be destroyed while
    still joinable when the peers leave at slightly different moments (seen as
    ``terminate called without an active exception`` and SIGABRT on one rank, about one
    run in six, after every rank had already stopped with the same one-line error)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    # A group whose peers are gone may refuse a clean teardown; the exit code stands.
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
