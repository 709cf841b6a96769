"""Command line of the shard converter: ``tools/make_shards.py`` and ``vlp shards``.

A thin wrapper over :mod:`vlp.data.convert.api`: subcommands ``mimic``, ``iu``, ``csv``
and ``dicom`` select :func:`~vlp.data.convert.api.convert_mimic`, ``convert_iu``,
``convert_table`` or ``convert_dicom``; the shared options (``--image-size --quality
--priors --shard-size --workers --max-error-rate --seed --limit``) go to
:class:`vlp.data.convert.pipeline.ConvertOptions`. The CLI configures logging and turns a
:class:`~vlp.data.convert.records.ConversionError` into one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields

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
    mimic = commands.add_parser(
        "mimic", parents=[shared], help="MIMIC-CXR-JPG or MIMIC-CXR (DICOM) tree"
    )
    mimic.add_argument("--root", required=True, help="MIMIC-CXR-JPG root (files/, metadata CSVs)")
    mimic.add_argument(
        "--reports",
        help="MIMIC-CXR report root holding files/pXX/... .txt (default --images, else --root)",
    )
    mimic.add_argument("--chexpert", help="CheXpert/NegBio label CSV (default: found at --root)")
    mimic.add_argument(
        "--edema", help="edema severity CSV (default: regex_report_edema_severity.csv at --root)"
    )
    mimic.add_argument("--boxes", help="MS-CXR box CSV (default: found at --root)")
    mimic.add_argument("--progression", help="MS-CXR-T progression CSV (default: found at --root)")
    mimic.add_argument(
        "--images",
        help="root holding files/pXX/... images, e.g. MIMIC-CXR's DICOMs (default --root)",
    )
    mimic.add_argument(
        "--image-format",
        choices=("auto", "jpg", "dcm"),
        default="auto",
        help="image files: auto (default) takes DICOM.jpg, else DICOM.dcm where no .jpg exists",
    )

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

    dicom = commands.add_parser(
        "dicom", parents=[shared], help="any folder tree of DICOM radiographs + reports"
    )
    dicom.add_argument("--root", required=True, help="folder searched for DICOM files")
    dicom.add_argument(
        "--reports",
        help="CSV (StudyInstanceUID or AccessionNumber, report_text) or a folder of "
        "{StudyInstanceUID or AccessionNumber}.txt (default --root)",
    )
    dicom.add_argument(
        "--split-table",
        help="CSV with split and PatientID, StudyInstanceUID or AccessionNumber "
        "(default: hash of the patient with --split-fractions)",
    )
    dicom.add_argument("--split-fractions", type=_fractions, default=(0.9, 0.05, 0.05))
    return parser


def run(args: argparse.Namespace) -> dict:
    """Convert with the adapter the arguments name; returns the run summary."""
    from vlp.data.convert import api
    from vlp.data.convert.pipeline import ConvertOptions

    # The shared flags are named after the options' fields.
    options = ConvertOptions(**{f.name: getattr(args, f.name) for f in fields(ConvertOptions)})
    if args.adapter == "mimic":
        return api.convert_mimic(
            args.root,
            args.out,
            options,
            reports=args.reports,
            chexpert=args.chexpert,
            edema=args.edema,
            boxes=args.boxes,
            progression=args.progression,
            images=args.images,
            image_format=args.image_format,
            quiet=args.quiet,
        )
    if args.adapter == "dicom":
        return api.convert_dicom(
            args.root,
            args.out,
            options,
            reports=args.reports,
            split_table=args.split_table,
            split_fractions=args.split_fractions,
            quiet=args.quiet,
        )
    if args.adapter == "iu":
        return api.convert_iu(
            args.reports,
            args.images,
            args.out,
            options,
            projections=args.projections,
            split_fractions=args.split_fractions,
            quiet=args.quiet,
        )
    return api.convert_table(
        args.table,
        args.out,
        options,
        image_root=args.image_root,
        split_fractions=args.split_fractions,
        quiet=args.quiet,
    )


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
    from vlp.data.convert.api import describe_summary

    print(describe_summary(summary, args.out))
    return 0
