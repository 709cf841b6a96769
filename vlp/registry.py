"""One registry for every pluggable component: image towers, text towers, objectives.

A component registers a builder under a name, optionally with the dataclass of its
recipe parameters. Recipes name components; the config loader validates their
parameters against the registered dataclass, and the model factory calls the builder.

    @register("objective", "clip", config=ClipConfig)
    class ClipObjective(Objective): ...

Registration happens when the defining module is imported; :func:`ensure_builtins`
imports the built-in modules lazily so that ``vlp --help`` stays fast.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KINDS = ("image_tower", "text_tower", "objective")

#: Modules whose import registers the built-in components of each kind.
_BUILTIN_MODULES = {
    "image_tower": ("vlp.models.image",),
    "text_tower": ("vlp.models.text",),
    "objective": ("vlp.objectives",),
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
