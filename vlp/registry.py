"""One registry for every pluggable component, and one way to build it.

Kinds: ``image_tower`` and ``text_tower`` (the networks), ``encoder`` (reads its inputs
from the batch, runs a tower), ``global_head`` (how an image encoder's global embedding is
formed), ``objective`` and ``evaluator``. A component registers a builder under a name,
with the dataclass of its recipe parameters:

    @register("objective", "clip", config=ClipConfig)
    class ClipObjective(Objective): ...

Recipes name components; :func:`config_of` validates their parameters against the
registered dataclass with the recipe loader's strict rules (dotted key, closest-key hint)
when the recipe loads, and :func:`build` calls ``builder(config, *args)``.

Registration happens when the defining module is imported; :func:`ensure_builtins`
imports the built-in modules lazily so that ``vlp --help`` stays fast.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KINDS = ("image_tower", "text_tower", "encoder", "global_head", "objective", "evaluator")

#: Modules whose import registers the built-in components of each kind.
_BUILTIN_MODULES = {
    "image_tower": ("vlp.models.image",),
    "text_tower": ("vlp.models.text",),
    "encoder": (
        "vlp.models.encoders",
        "vlp.models.multi_image",
        "vlp.models.move",
        "vlp.models.mae",
    ),
    "global_head": ("vlp.models.heads",),
    "objective": ("vlp.objectives",),
    "evaluator": ("vlp.evaluation.evaluators",),
}


@dataclass(frozen=True)
class Entry:
    name: str
    builder: Callable[..., Any]
    config: type | None


_REGISTRY: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
_LOADED: set[str] = set()


def register(kind: str, name: str, config: type | None = None):
    """Decorator: register ``builder`` (a class or function) as ``kind``/``name``."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; expected one of {KINDS}")

    def decorator(builder):
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing.builder is not builder:
            raise ValueError(f"{kind} {name!r} is already registered by {existing.builder!r}")
        _REGISTRY[kind][name] = Entry(name, builder, config)
        return builder

    return decorator


def ensure_builtins(kind: str) -> None:
    if kind in _LOADED:
        return
    for module in _BUILTIN_MODULES[kind]:
        importlib.import_module(module)
    _LOADED.add(kind)


def names(kind: str) -> list[str]:
    ensure_builtins(kind)
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str) -> Entry:
    """Look up a component; an unknown name raises KeyError naming the closest match."""
    ensure_builtins(kind)
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        known = sorted(_REGISTRY[kind])
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown {kind} {name!r}{hint} (known: {', '.join(known)})") from None


def config_of(kind: str, name: str, params: dict | None, path: str, source: str | None = None):
    """The registered config dataclass of ``kind``/``name`` filled from ``params``, strictly.

    Raises :class:`vlp.config.loader.ConfigError` naming ``path`` (the dotted recipe key)
    for an unknown name, key, type or value. A component registered without a config
    takes no parameters (returns None).
    """
    from vlp.config.loader import ConfigError, from_dict

    try:
        entry = get(kind, name)
    except KeyError as err:
        raise ConfigError(source, path, str(err.args[0])) from None
    params = dict(params or {})
    if entry.config is None:
        if params:
            raise ConfigError(
                source, path, f"{kind} {name!r} takes no parameters, got {sorted(params)}"
            )
        return None
    return from_dict(entry.config, params, source=source, path=path)


def build(kind: str, name: str, params=None, *args, path: str = "", **kwargs):
    """Build a registered component: ``builder(config, *args, **kwargs)``.

    ``params`` is a mapping (validated through :func:`config_of`) or an already built
    config dataclass.
    """
    entry = get(kind, name)
    if params is None or isinstance(params, dict):
        params = config_of(kind, name, params, path or f"{kind} {name}")
    if params is None:
        return entry.builder(*args, **kwargs)
    return entry.builder(params, *args, **kwargs)
