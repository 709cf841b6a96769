"""Dataset adapters → study records → deterministic, resumable WebDataset shards.

The library API is :mod:`vlp.data.convert.api` (``convert_mimic``, ``convert_iu``,
``convert_table``, ``convert_dicom``: a dataset's files → shards, with the options of
:class:`vlp.data.convert.pipeline.ConvertOptions`). ``main(argv)`` is the command line
(``tools/make_shards.py``, ``vlp shards``), a thin wrapper over it. Below the API,
:func:`vlp.data.convert.pipeline.convert` writes the shards of the study records that
:func:`vlp.data.convert.mimic.read_mimic`, :func:`vlp.data.convert.iu.read_iu`,
:func:`vlp.data.convert.table.read_table_adapter` or
:func:`vlp.data.convert.dicom.read_dicom` read.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the converter CLI; imports lazily so that ``vlp --help`` stays fast."""
    from vlp.data.convert.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
