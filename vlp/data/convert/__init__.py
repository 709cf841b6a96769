"""Dataset adapters → study records → deterministic, resumable WebDataset shards.

``main(argv)`` is the command line (``tools/make_shards.py``, ``vlp shards``);
:func:`vlp.data.convert.pipeline.convert` is the library entry point, fed by
:func:`vlp.data.convert.mimic.read_mimic`, :func:`vlp.data.convert.iu.read_iu` or
:func:`vlp.data.convert.table.read_table_adapter`.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the converter CLI; imports lazily so that ``vlp --help`` stays fast."""
    from vlp.data.convert.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
