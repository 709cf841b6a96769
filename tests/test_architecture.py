"""The import graph runs one way: data → models → objectives → training → evaluation.

A module of one layer may import its own layer and the layers before it, never a later
one (lazy imports inside functions included), and no layer imports the command line or
the demo. ``vlp.registry`` (which loads the built-in components of a kind on first use)
and ``vlp.config`` (which assembles the recipe from every layer's sections) sit beside
the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

VLP = Path(__file__).resolve().parents[1] / "vlp"
LAYERS = ["data", "models", "objectives", "training", "evaluation"]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def test_layers_import_only_earlier_layers():
    violations = []
    for path in sorted(VLP.rglob("*.py")):
        layer = path.relative_to(VLP).parts[0]
        if layer not in LAYERS:
            continue
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] != "vlp" or len(parts) < 2:
                continue
            target = parts[1]
            later = target in LAYERS and LAYERS.index(target) > LAYERS.index(layer)
            if later or target in ("cli", "demo"):
                violations.append(f"{path.relative_to(VLP.parent)}:{line} imports {module}")
    assert not violations, "\n".join(violations)


def test_the_check_sees_lazy_imports(tmp_path):
    # The check must fail on a lazy import of a later layer inside a function.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from vlp.training.monitor import LOG\n")
    assert [m for _, m in _imports(probe)] == ["vlp.training.monitor"]
