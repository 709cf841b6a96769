"""Strict loading of YAML recipes into typed, nested dataclasses.

A recipe is a YAML mapping that fills a dataclass tree (``vlp.config.schema.RecipeConfig``).
This module knows nothing about vlp's sections; it converts any mapping into any
dataclass, and it is strict:

* an unknown key, a wrong type, an impossible value or a missing required key raises
  :class:`ConfigError` naming the file, the dotted key path and what was expected, and
  suggests the closest valid key for a typo;
* ``extends: other.yaml`` (a path relative to the extending file, or a list of them)
  inherits a recipe and deep-merges the overrides on top;
* ``--set a.b.c=value`` overrides are parsed as YAML scalars and typed by the schema.

Dataclasses may define ``validate(self) -> None`` that raises ``ValueError`` for
impossible values; its message is reported with the section's dotted path. Parameters of
registered components are validated against their registered dataclass with the same
rules (``vlp.registry.config_of``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A recipe problem, reported as ``file: dotted.key: what was expected``."""

    def __init__(self, source: str | None, path: str, message: str):
        self.source = source
        self.path = path
        self.message = message
        where = f"{source}: " if source else ""
        key = f"{path}: " if path else ""
        super().__init__(f"{where}{key}{message}")


# --------------------------------------------------------------------------- YAML files


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "", "recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(str(path), "", f"not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            str(path), "", f"expected a mapping at top level, got {type(data).__name__}"
        )
    return data


def deep_merge(base: dict, override: dict) -> dict:
    """Merge ``override`` into a copy of ``base``; mappings merge, everything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_extends(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a recipe and everything it ``extends``, merged; ``extends`` itself is removed."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(str(path), "extends", f"circular extends: {cycle}")
    data = read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(str(path), "extends", "expected a file name or a list of file names")
    merged: dict = {}
    for parent in parents:
        parent_path = (path.parent / parent).resolve()
        if not parent_path.is_file():
            raise ConfigError(
                str(path), "extends", f"extended recipe {parent!r} not found at {parent_path}"
            )
        merged = deep_merge(merged, resolve_extends(parent_path, (*_chain, path)))
    return deep_merge(merged, data)


_INDEXED = re.compile(r"^([^\[\]]+)\[(\d+)\]$")


def apply_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply ``a.b.c=value`` strings; values are YAML scalars, typed later by the schema.

    A list entry is addressed by its index, ``objectives[1].weight=0.5``; the entry must
    exist (an override changes a recipe's list, it does not grow it)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(source, item, "expected key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(source, item, "empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        # Each step is (container, slot): a dict key, or a list index.
        steps: list = []
        for part in key.split("."):
            match = _INDEXED.match(part)
            steps.append(part if match is None else None)
            if match is not None:
                steps[-1:] = [match.group(1), int(match.group(2))]
        node = data
        for position, (part, following) in enumerate(zip(steps, steps[1:])):
            where = ".".join(str(p) for p in steps[: position + 1])
            child = node[part] if _has(node, part) else None
            if isinstance(following, int):
                if not isinstance(child, list):
                    raise ConfigError(source, key, f"{where} is not a list")
                child = list(child)
            else:
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise ConfigError(source, key, f"{part!r} is not a section")
                child = dict(child)  # copies: the caller's recipe stays as it was
            if isinstance(part, int) and part >= len(node):
                raise ConfigError(
                    source, key, f"index {part} is beyond the list's {len(node)} entries"
                )
            node[part] = child
            node = child
        last = steps[-1]
        if isinstance(last, int) and last >= len(node):
            raise ConfigError(source, key, f"index {last} is beyond the list's {len(node)} entries")
        node[last] = value
    return data


def _has(node, part) -> bool:
    if isinstance(part, int):
        if not isinstance(node, list):
            return False
        return part < len(node)
    return part in node


# ------------------------------------------------------------------- dict -> dataclass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def convert(value: Any, tp: Any, path: str, source: str | None) -> Any:
    """Convert a YAML value to type ``tp`` or raise ConfigError at ``path``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, path, source)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(source, path, f"expected {_type_name(tp)}, got {_describe(value)}")

    if origin is typing.Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(source, path, f"expected {_type_name(tp)}, got {_describe(value)}{hint}")

    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(source, path, f"expected {_type_name(tp)}, got {_describe(value)}")
        return from_dict(tp, value, source=source, path=path)

    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, path, f"expected {_type_name(tp)}, got {_describe(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(source, path, f"expected {len(args)} items, got {len(value)}")
            items = [
                convert(v, a, f"{path}[{i}]", source) for i, (v, a) in enumerate(zip(value, args))
            ]
        else:
            item_tp = args[0] if args else Any
            items = [convert(v, item_tp, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items

    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, path, f"expected {_type_name(tp)}, got {_describe(value)}")
        key_tp, val_tp = args if args else (Any, Any)
        return {
            convert(k, key_tp, f"{path}.{k}", source): convert(v, val_tp, f"{path}.{k}", source)
            for k, v in value.items()
        }

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(source, path, f"expected bool (true/false), got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(source, path, f"expected int, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept numeric strings for floats only.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(source, path, f"expected float, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(source, path, f"expected str, got {_describe(value)}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(source, path, f"expected {_type_name(tp)}, got {_describe(value)}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def from_dict(cls: type, data: dict, *, source: str | None = None, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, strictly (see module docstring)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        valid = ", ".join(fields)
        raise ConfigError(source, _join(path, str(key)), f"unknown key{hint} (valid keys: {valid})")
    kwargs = {}
    for name, field in fields.items():
        key_path = _join(path, name)
        if name in data:
            kwargs[name] = convert(data[name], hints[name], key_path, source)
        elif field.default is MISSING and field.default_factory is MISSING:
            raise ConfigError(
                source, key_path, f"missing required key (expected {_type_name(hints[name])})"
            )
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:  # checks in __post_init__
        raise ConfigError(source, path, str(err)) from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(source, path, str(err)) from None
    return obj


def to_dict(obj: Any) -> Any:
    """The plain (YAML-writable) form of a config tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
