"""Procedural chest radiograph + report generator with exact ground truth (MIMIC-CXR-JPG layout).

Public API: :class:`PhantomConfig`, :func:`generate`, :func:`write_preview`,
:func:`read_truth`, :func:`render_view` (re-render an image and rasterise its findings).
See ``generate.py`` for the layout and the other modules for anatomy, findings, reports,
acquisition and tables.
"""

from vlp.data.phantom.generate import (
    TRUTH_FILE,
    PhantomConfig,
    generate,
    read_truth,
    render_view,
)
from vlp.data.phantom.preview import write_preview

__all__ = ["PhantomConfig", "generate", "write_preview", "read_truth", "render_view", "TRUTH_FILE"]
