"""Command line of the shard converter: ``tools/make_shards.py`` and ``vlp shards``.

Subcommands ``mimic``, ``iu`` and ``csv`` select an adapter; the shared options
(``--image-size --quality --priors --shard-size --workers --max-error-rate --seed
--limit``) go to :class:`vlp.data.convert.pipeline.ConvertOptions`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vlp.data.convert.records import ConversionError


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected three non-negative fractions train,validate,test (e.g. 0.9,0.05,0.05), got {text!r}"
        )
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make_shards",
        description="Convert a chest X-ray dataset into WebDataset shards (one sample per study).",
    )
    shared = argparse.ArgumentParser(add_help=False)
    group = shared.add_argument_group("shared options")
    group.add_argument("--out", required=True, help="output folder (OUT/{train,validate,test}/...)")
    group.add_argument(
        "--image-size", type=int, default=512, help="long side of stored images (512)"
    )
    group.add_argument("--quality", type=int, default=95, help="JPEG quality (95)")
    group.add_argument("--priors", type=int, default=1, help="prior studies per sample, K (1)")
    group.add_argument("--shard-size", type=int, default=1000, help="studies per shard (1000)")
    group.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="decoding processes (CPU count - 1)",
    )
    group.add_argument(
        "--max-error-rate",
        type=float,
        default=0.01,
        help="fail when bad inputs exceed this fraction of studies (0.01)",
    )
    group.add_argument(
        "--seed", type=int, default=0, help="seed of the study order and hash splits"
    )
    group.add_argument("--limit", type=int, default=None, help="convert only the first N studies")
    group.add_argument("--quiet", action="store_true", help="no progress bars, errors only")

    commands = parser.add_subparsers(dest="adapter", required=True)
    mimic = commands.add_parser("mimic", parents=[shared], help="MIMIC-CXR-JPG tree")
    mimic.add_argument("--root", required=True, help="MIMIC-CXR-JPG root (files/, metadata CSVs)")
    mimic.add_argument(
        "--reports", help="MIMIC-CXR report root holding files/pXX/... .txt (default --root)"
    )
    mimic.add_argument("--chexpert", help="CheXpert/NegBio label CSV (default: found at --root)")
    mimic.add_argument(
        "--edema", help="edema severity CSV (default: regex_report_edema_severity.csv at --root)"
    )
    mimic.add_argument("--boxes", help="MS-CXR box CSV (default: found at --root)")
    mimic.add_argument("--progression", help="MS-CXR-T progression CSV (default: found at --root)")

    iu = commands.add_parser("iu", parents=[shared], help="Open-i IU X-ray XML reports + PNGs")
    iu.add_argument("--reports", required=True, help="folder of XML reports or NLMCXR_reports.tgz")
    iu.add_argument("--images", required=True, help="folder of PNG images")
    iu.add_argument("--projections", help="CSV with filename,projection (Frontal/Lateral)")
    iu.add_argument("--split-fractions", type=_fractions, default=(0.9, 0.05, 0.05))

    table = commands.add_parser(
        "csv", parents=[shared], help="generic CSV table, one row per image"
    )
    table.add_argument("--table", required=True, help="CSV (columns: see vlp.data.convert.table)")
    table.add_argument("--image-root", help="base of relative paths (default: the table's folder)")
    table.add_argument("--split-fractions", type=_fractions, default=(0.9, 0.05, 0.05))
    return parser


def run(args: argparse.Namespace) -> dict:
    """Read with the chosen adapter and convert; returns the run summary."""
    from vlp.data.convert.pipeline import ConvertOptions, convert

    progress = not args.quiet
    options = ConvertOptions(
        image_size=args.image_size,
        quality=args.quality,
        priors=args.priors,
        shard_size=args.shard_size,
        workers=args.workers,
        max_error_rate=args.max_error_rate,
        seed=args.seed,
        limit=args.limit,
    )
    options.validate()
    if args.adapter == "mimic":
        from vlp.data.convert.mimic import read_mimic

        output = read_mimic(
            args.root,
            args.reports,
            args.chexpert,
            args.edema,
            args.boxes,
            args.progression,
            limit=args.limit,
            progress=progress,
        )
    elif args.adapter == "iu":
        from vlp.data.convert.iu import read_iu

        output = read_iu(
            args.reports,
            args.images,
            args.projections,
            args.split_fractions,
            seed=args.seed,
            limit=args.limit,
            progress=progress,
        )
    else:
        from vlp.data.convert.table import read_table_adapter

        output = read_table_adapter(
            args.table,
            args.image_root,
            args.split_fractions,
            seed=args.seed,
            limit=args.limit,
            progress=progress,
        )
    # Recorded in the manifest; the output folder and the worker count change nothing.
    arguments = {k: v for k, v in vars(args).items() if k not in ("out", "workers", "quiet")}
    arguments = {k: list(v) if isinstance(v, tuple) else v for k, v in arguments.items()}
    return convert(output, args.out, options, arguments=arguments, progress=progress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.ERROR if args.quiet else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        summary = run(args)
    except ConversionError as error:
        print(f"make_shards: error: {error}", file=sys.stderr)
        return 1
    written = ", ".join(f"{split} {info['samples']}" for split, info in summary["splits"].items())
    print(
        f"wrote {written} samples to {args.out}; {summary['errors']} bad inputs "
        f"({summary['error_rate']:.2%} of {summary['studies_seen']} studies); "
        f"skipped studies: {summary['skipped_studies'] or 'none'}"
    )
    return 0
