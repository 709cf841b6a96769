"""Procedural chest radiograph + report generator with exact ground truth (MIMIC-CXR-JPG layout).

Public API: :class:`PhantomConfig`, :func:`generate`, :func:`write_preview`,
:func:`read_truth`, :func:`render_view` (re-render an image and rasterise its findings).
See ``generate.py`` for the layout and the other modules for anatomy, findings, reports,
acquisition and tables.
"""

#: Version of what the generator draws and writes; bumped whenever the same config and seed
#: would give other images or reports, so cached phantoms (``vlp.data.phantom_cache``, the
#: demo's) are rebuilt. 2: small effusions are drawn on the lateral view only. 3: the
#: progression findings have a continuous level within their grade, and progression is
#: labelled from its change.
PHANTOM_VERSION = 3

from vlp.data.phantom.generate import (  # noqa: E402
    TRUTH_FILE,
    PhantomConfig,
    generate,
    read_truth,
    render_view,
)
from vlp.data.phantom.preview import write_preview  # noqa: E402

__all__ = [
    "PHANTOM_VERSION",
    "PhantomConfig",
    "generate",
    "write_preview",
    "read_truth",
    "render_view",
    "TRUTH_FILE",
]
