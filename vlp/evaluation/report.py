"""Writing an evaluator's results: ``results.json`` (everything) and ``results.md`` (tables).

Evaluators build their results as plain dicts (numbers, strings, lists) and describe the
Markdown view as a list of :class:`Table`; metric cells given as ``{"value", "ci"}`` are
printed as ``0.812 [0.751, 0.870]``. NaN (undefined) prints as ``n/a`` and is written to
JSON as ``null`` so the file stays standard JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list] = field(default_factory=list)
    note: str = ""


def _plain(obj):
    """numpy scalars/arrays → Python; NaN/inf → None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def fmt(cell, digits: int = 3) -> str:
    """One Markdown cell: metric dicts with their CI, floats rounded, NaN as n/a."""
    if isinstance(cell, dict) and "value" in cell:
        value = fmt(cell["value"], digits)
        ci = cell.get("ci")
        if ci and all(c is not None and math.isfinite(c) for c in ci):
            return f"{value} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
        return value
    if cell is None:
        return "n/a"
    if isinstance(cell, (float, np.floating)):
        return "n/a" if not math.isfinite(cell) else f"{cell:.{digits}f}"
    return str(cell).replace("|", "\\|").replace("\n", " ")


def markdown(title: str, tables: list[Table], notes: list[str] = ()) -> str:
    lines = [f"# {title}", ""]
    for note in notes:
        lines += [note, ""]
    for table in tables:
        lines += [f"## {table.title}", ""]
        if table.note:
            lines += [table.note, ""]
        lines.append("| " + " | ".join(table.header) + " |")
        lines.append("|" + "---|" * len(table.header))
        for row in table.rows:
            lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
        lines.append("")
    return "\n".join(lines)


def write_results(
    out: str | Path, results: dict, title: str, tables: list[Table], notes: list[str] = ()
) -> Path:
    """Write ``out/results.json`` and ``out/results.md``; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(_plain(results), indent=1, allow_nan=False) + "\n", encoding="utf-8"
    )
    (out / "results.md").write_text(markdown(title, tables, notes), encoding="utf-8")
    return out
