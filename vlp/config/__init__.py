"""Recipes: load a YAML file (with ``extends`` and ``--set`` overrides) into a typed config.

    cfg = load_recipe("recipes/local_mi.yaml", ["train.steps=100"])

Every error is a :class:`ConfigError` naming the file, the dotted key and the expectation.
"""

from __future__ import annotations

from pathlib import Path

from vlp.config.loader import ConfigError, apply_overrides, from_dict, resolve_extends

__all__ = ["ConfigError", "load_recipe", "recipe_from_dict"]

_SPEC_KEYS = ("name", "weight", "start_step")


def _objective_specs(raw, source: str | None) -> list:
    """Flat YAML objective entries → ObjectiveSpec fields. The names are checked here; the
    parameters against the registered config in ``vlp.config.components.check_recipe``."""
    from vlp import registry

    if not isinstance(raw, list):
        raise ConfigError(
            source, "objectives", f"expected a list of objectives, got {type(raw).__name__}"
        )
    specs = []
    for i, entry in enumerate(raw):
        path = f"objectives[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(source, path, "expected a mapping with at least 'name'")
        if "name" not in entry:
            raise ConfigError(source, f"{path}.name", "missing required key (expected str)")
        name = entry["name"]
        try:
            registry.get("objective", name)
        except KeyError as err:
            raise ConfigError(source, f"{path}.name", str(err.args[0])) from None
        params = {k: v for k, v in entry.items() if k not in _SPEC_KEYS and k != "params"}
        params.update(entry.get("params") or {})
        start = entry.get("start_step", 0)
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ConfigError(
                source, f"{path}.start_step", f"expected an int >= 0 (a step), got {start!r}"
            )
        specs.append(
            {
                "name": name,
                "weight": entry.get("weight", 1.0),
                "start_step": start,
                "params": params,
            }
        )
    return specs


#: environment variable: comma-separated module prefixes a recipe's ``imports`` may name
#: besides ``vlp`` itself (``mylab.plugins`` allows ``mylab.plugins`` and its submodules).
TRUSTED_IMPORTS_ENV = "VLP_TRUSTED_IMPORTS"


def trusted_import(module: str, environ=None) -> bool:
    """Whether a recipe may import ``module``: under ``vlp`` or under a prefix the user
    listed in ``VLP_TRUSTED_IMPORTS``. Importing runs a module's code, so a recipe from
    someone else must not choose it alone (the same stance as Hugging Face's
    ``trust_remote_code``); the user's environment decides."""
    import os

    environ = os.environ if environ is None else environ
    prefixes = ["vlp"] + [p.strip() for p in environ.get(TRUSTED_IMPORTS_ENV, "").split(",")]
    return any(p and (module == p or module.startswith(p + ".")) for p in prefixes)


def import_components(modules, source: str | None) -> None:
    """Import the recipe's ``imports`` (modules that register components), each of them a
    :func:`trusted_import`; an untrusted one is refused before anything is imported."""
    import importlib

    if not isinstance(modules, list):
        raise ConfigError(source, "imports", "expected a list of module names")
    for i, module in enumerate(modules):
        if not trusted_import(str(module)):
            raise ConfigError(
                source,
                f"imports[{i}]",
                f"{module!r} is not a trusted import: importing runs its code, so a recipe "
                f"may import only vlp's modules and those under a prefix listed in "
                f"{TRUSTED_IMPORTS_ENV} (comma-separated, e.g. "
                f"{TRUSTED_IMPORTS_ENV}={str(module).split('.')[0]})",
            )
    for i, module in enumerate(modules):
        try:
            importlib.import_module(str(module))
        except ImportError as err:
            raise ConfigError(source, f"imports[{i}]", f"cannot import {module!r}: {err}") from None


def recipe_from_dict(data: dict, source: str | None = None):
    from vlp.config.components import check_recipe
    from vlp.config.schema import RecipeConfig

    data = dict(data)
    import_components(data.get("imports") or [], source)
    if "objectives" in data:
        data["objectives"] = _objective_specs(data["objectives"], source)
    cfg = from_dict(RecipeConfig, data, source=source)
    check_recipe(cfg, source)
    return cfg


def load_recipe(path: str | Path, overrides: list[str] | None = None):
    """Read, merge ``extends``, apply ``--set`` overrides and validate a recipe."""
    data = resolve_extends(path)
    if overrides:
        data = apply_overrides(data, overrides)
    source = str(path) if not overrides else f"{path} (with --set {' '.join(overrides)})"
    return recipe_from_dict(data, source=source)
