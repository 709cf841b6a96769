"""The converter as a library: one call per dataset kind, from its files to shards.

:func:`convert_mimic`, :func:`convert_iu`, :func:`convert_table` and :func:`convert_dicom`
read a dataset with its adapter and write ``OUT/{train,validate,test}/`` with
:func:`vlp.data.convert.pipeline.convert`; each returns the run summary (also written to
``OUT/conversion.json``). The command line (:mod:`vlp.data.convert.cli`) is a thin wrapper
over them, and the phantom builders (:mod:`vlp.data.phantom_cache`, ``vlp demo``) call
them directly. Given the same inputs and options, a call and the equivalent command line
write the same bytes: both record the same ``arguments`` in the manifests.

Bad inputs raise :class:`ConversionError` naming the file and what was expected; it and
:class:`ConvertOptions` are importable from here, so a caller needs this module only.
Logging is left to the caller (the CLI configures it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict

from vlp.data.convert.dicom import DEFAULT_FRACTIONS as DICOM_FRACTIONS
from vlp.data.convert.dicom import read_dicom, write_study_table
from vlp.data.convert.iu import DEFAULT_FRACTIONS as IU_FRACTIONS
from vlp.data.convert.iu import read_iu
from vlp.data.convert.mimic import read_mimic
from vlp.data.convert.pipeline import ConvertOptions, convert
from vlp.data.convert.records import AdapterOutput, ConversionError
from vlp.data.convert.table import DEFAULT_FRACTIONS as TABLE_FRACTIONS
from vlp.data.convert.table import read_table_adapter

PathLike = str | os.PathLike

__all__ = [
    "ConversionError",
    "ConvertOptions",
    "convert_dicom",
    "convert_iu",
    "convert_mimic",
    "convert_table",
    "describe_summary",
]


def convert_mimic(
    root: PathLike,
    out: PathLike,
    options: ConvertOptions | None = None,
    *,
    reports: PathLike | None = None,
    chexpert: PathLike | None = None,
    edema: PathLike | None = None,
    boxes: PathLike | None = None,
    progression: PathLike | None = None,
    images: PathLike | None = None,
    image_format: str = "auto",
    quiet: bool = False,
) -> dict:
    """Convert a MIMIC-CXR-JPG or MIMIC-CXR (DICOM) tree (``vlp shards mimic``); see
    :mod:`vlp.data.convert.mimic`."""
    options = _validated(options)
    inputs = {
        "root": os.fspath(root),
        "reports": _optional_path(reports),
        "chexpert": _optional_path(chexpert),
        "edema": _optional_path(edema),
        "boxes": _optional_path(boxes),
        "progression": _optional_path(progression),
        "images": _optional_path(images),
        "image_format": image_format,
    }
    output = read_mimic(**inputs, limit=options.limit, progress=not quiet)
    return _write("mimic", output, out, options, inputs, quiet)


def convert_iu(
    reports: PathLike,
    images: PathLike,
    out: PathLike,
    options: ConvertOptions | None = None,
    *,
    projections: PathLike | None = None,
    split_fractions: Sequence[float] = IU_FRACTIONS,
    quiet: bool = False,
) -> dict:
    """Convert Open-i IU X-ray (``vlp shards iu``); see :mod:`vlp.data.convert.iu`."""
    options = _validated(options)
    inputs = {
        "reports": os.fspath(reports),
        "images": os.fspath(images),
        "projections": _optional_path(projections),
        "split_fractions": tuple(split_fractions),
    }
    output = read_iu(**inputs, seed=options.seed, limit=options.limit, progress=not quiet)
    return _write("iu", output, out, options, inputs, quiet)


def convert_table(
    table: PathLike,
    out: PathLike,
    options: ConvertOptions | None = None,
    *,
    image_root: PathLike | None = None,
    split_fractions: Sequence[float] = TABLE_FRACTIONS,
    quiet: bool = False,
) -> dict:
    """Convert a CSV table of images (``vlp shards csv``); see :mod:`vlp.data.convert.table`."""
    options = _validated(options)
    inputs = {
        "table": os.fspath(table),
        "image_root": _optional_path(image_root),
        "split_fractions": tuple(split_fractions),
    }
    output = read_table_adapter(
        **inputs, seed=options.seed, limit=options.limit, progress=not quiet
    )
    return _write("csv", output, out, options, inputs, quiet)


def convert_dicom(
    root: PathLike,
    out: PathLike,
    options: ConvertOptions | None = None,
    *,
    reports: PathLike | None = None,
    split_table: PathLike | None = None,
    split_fractions: Sequence[float] = DICOM_FRACTIONS,
    quiet: bool = False,
) -> dict:
    """Convert a folder tree of DICOM files (``vlp shards dicom``); see
    :mod:`vlp.data.convert.dicom`. Also writes ``OUT/dicom_studies.csv`` (the UIDs)."""
    options = _validated(options)
    inputs = {
        "root": os.fspath(root),
        "reports": _optional_path(reports),
        "split_table": _optional_path(split_table),
        "split_fractions": tuple(split_fractions),
    }
    output = read_dicom(**inputs, seed=options.seed, limit=options.limit, progress=not quiet)
    summary = _write("dicom", output, out, options, inputs, quiet)
    # After the shards: a failed or refused conversion leaves an earlier table alone.
    write_study_table(os.fspath(out), output.studies)
    return summary


def describe_summary(summary: dict, out: PathLike) -> str:
    """The one line the CLI prints after a conversion."""
    written = ", ".join(f"{split} {info['samples']}" for split, info in summary["splits"].items())
    return (
        f"wrote {written} samples to {os.fspath(out)}; {summary['errors']} bad inputs "
        f"({summary['error_rate']:.2%} of {summary['studies_seen']} studies); "
        f"skipped studies: {summary['skipped_studies'] or 'none'}"
    )


def _validated(options: ConvertOptions | None) -> ConvertOptions:
    # Checked before the adapter reads anything: reading a large tree takes minutes.
    options = options if options is not None else ConvertOptions()
    options.validate()
    return options


def _optional_path(path: PathLike | None) -> str | None:
    return None if path is None else os.fspath(path)


def _write(
    adapter: str,
    output: AdapterOutput,
    out: PathLike,
    options: ConvertOptions,
    inputs: dict,
    quiet: bool,
) -> dict:
    # The manifests record the adapter, the options and the inputs in the order of the CLI's
    # flags, so that a call and the equivalent command line write the same manifest bytes.
    # The output folder and the worker count are not recorded: the same shards may be
    # written anywhere, by any number of processes. JSON has no tuples, hence the lists.
    options_recorded = {k: v for k, v in asdict(options).items() if k != "workers"}
    inputs_recorded = {k: list(v) if isinstance(v, tuple) else v for k, v in inputs.items()}
    arguments = {"adapter": adapter, **options_recorded, **inputs_recorded}
    return convert(output, os.fspath(out), options, arguments=arguments, progress=not quiet)
