"""Where the shards are and how their members are read: shard list → raw member bytes.

One job: turn ``cfg.shards`` into a list of :class:`Shard` and read a shard's tar members
into raw samples ``{"__key__", "__url__", suffix: bytes}``, refusing anything that breaks
the contract of :mod:`vlp.data.schema`.

``cfg.shards`` is a ``manifest.json`` (or a folder holding one, directly or under
``<split>/``), a folder without one (its ``*.tar`` files, directly or under ``<split>/``,
in name order: how img2dataset writes a dataset), or a brace pattern / URL list understood
by ``webdataset.gopen`` (local paths, ``http(s)://``, ``pipe:``). Only a manifest gives
the shards' sample counts (resampling weights them by it; otherwise uniformly).

Our own tar reader groups members by key, rejects any member whose suffix is not in
:data:`schema.ALLOWED_SUFFIXES` (no pickle can ever be decoded), and keeps only the bytes
the recipe needs.

The shard format is WebDataset's (Aizman et al. 2019, "High performance I/O for large
scale deep learning", IEEE Big Data); URLs are opened with ``webdataset.gopen`` but its
decoders, node splitter and pickle handlers are not used.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand
from webdataset.gopen import gopen

from vlp.data import schema

# ``p123-s456.prior1.frontal.jpg`` → key ``p123-s456``, suffix ``prior1.frontal.jpg``
# (the key is everything up to the first dot of the file name, as WebDataset does).
_MEMBER_NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")


class ShardError(ValueError):
    """A shard (or the shard list) violates the schema; training must not go on with it."""


class DamagedShard(ShardError):
    """A shard that cannot be read to its end (truncated, corrupt tar). The loader keeps
    the samples read before the damage, skips the rest and counts them; refusals of what a
    shard contains (unsafe member names, disallowed suffixes) stay :class:`ShardError`."""


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None  # from the manifest; None for brace patterns


def _is_local(spec: str) -> bool:
    return "://" not in spec and not spec.startswith("pipe:")


def read_manifest(path: str) -> list[Shard]:
    """Shards of a ``manifest.json``: ``{"shards": [{"name", "samples"}], "total", "schema_version"}``."""
    try:
        if _is_local(path):
            manifest = json.loads(Path(path).read_text(encoding="utf-8"))
        else:
            with gopen(path, "rb") as stream:
                manifest = json.loads(stream.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path}: cannot read manifest: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ShardError(f"{path}: manifest must be an object with a 'shards' list")
    version = manifest.get("schema_version")
    if version != schema.SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema_version {version!r}, this loader reads {schema.SCHEMA_VERSION}"
        )
    base = posixpath.dirname(path) if not _is_local(path) else str(Path(path).parent)
    shards = []
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ShardError(
                f"{path}: shards[{i}] must be {{'name': str, 'samples': int}}, got {entry!r}"
            )
        samples = entry.get("samples")
        if not isinstance(samples, int) or samples < 0:
            raise ShardError(
                f"{path}: shards[{i}] ({entry['name']}) has samples={samples!r}, expected int >= 0"
            )
        name = entry["name"]
        url = (
            name
            if ("://" in name or name.startswith(("/", "pipe:")))
            else posixpath.join(base, name)
        )
        shards.append(Shard(url, samples))
    if not shards:
        raise ShardError(f"{path}: manifest lists no shards")
    total = manifest.get("total")
    if total is not None and total != sum(s.samples or 0 for s in shards):
        raise ShardError(
            f"{path}: total={total} but the shards' samples sum to {sum(s.samples for s in shards)}"
        )
    return shards


def resolve_shards(spec: str, split: str = "train") -> list[Shard]:
    """Expand ``cfg.shards`` into the shard list (see the module docstring for the forms)."""
    if not spec:
        raise ShardError("no shards given (loader.shards is empty)")
    if _is_local(spec) and Path(spec).is_dir():
        folders = [Path(spec), Path(spec) / split]
        candidates = [folder / "manifest.json" for folder in folders]
        for candidate in candidates:
            if candidate.is_file():
                return read_manifest(str(candidate))
        for folder in folders:
            tars = sorted(folder.glob("*.tar")) if folder.is_dir() else []
            if tars:
                return [Shard(str(tar), None) for tar in tars]
        raise ShardError(
            f"{spec}: folder has no manifest.json (looked for {', '.join(map(str, candidates))}) "
            f"and no *.tar shards (in {', '.join(map(str, folders))})"
        )
    if spec.endswith(".json"):
        return read_manifest(spec)
    urls = [u for part in spec.split("::") for u in braceexpand(part)]
    if _is_local(spec):
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise ShardError(f"{spec}: {len(missing)} shard(s) do not exist, first {missing[0]}")
    return [Shard(u, None) for u in urls]


# --------------------------------------------------------------------------- raw samples


def iter_tar_samples(url: str, wanted: frozenset[str] | None = None) -> Iterator[dict]:
    """Yield raw samples ``{"__key__", "__url__", suffix: bytes}`` of one tar shard.

    Every member is checked against :data:`schema.ALLOWED_SUFFIXES` (the last dotted part
    of its suffix) *before* anything is read, so a shard carrying ``.pyd``/``.pickle``
    members is rejected with a :class:`ShardError` naming it. Members not in ``wanted``
    are skipped without reading their bytes.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as exc:  # gopen raises several types for local and remote failures
        raise ShardError(f"{url}: cannot open shard: {exc}") from exc
    try:
        # Random access is much cheaper per member than tarfile's stream mode; pipes and
        # remote streams cannot seek and use the stream mode.
        seekable = getattr(stream, "seekable", lambda: False)()
        size = stream.seek(0, 2) if seekable else None
        if seekable:
            stream.seek(0)
        with tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*") as tar:
            current: dict | None = None
            for info in tar:
                if not info.isfile():
                    continue
                if info.name.startswith("/") or ".." in info.name.split("/"):
                    # Nothing is extracted to disk, but such a name is never a sample of
                    # ours: a crafted archive, refused as a whole.
                    raise ShardError(
                        f"{url}: member {info.name!r} has an absolute path or '..'; "
                        "refusing this shard"
                    )
                match = _MEMBER_NAME.match(info.name)
                if match is None:
                    raise ShardError(
                        f"{url}: member {info.name!r} has no '.suffix'; expected key.suffix"
                    )
                key, suffix = match.groups()
                extension = suffix.rsplit(".", 1)[-1]
                if extension not in schema.ALLOWED_SUFFIXES:
                    raise ShardError(
                        f"{url}: member {info.name!r} has suffix .{extension}, which is not allowed "
                        f"(allowed: {', '.join(schema.ALLOWED_SUFFIXES)}); refusing this shard"
                    )
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                if suffix in current:
                    raise ShardError(f"{url}: member {info.name!r} appears twice in sample {key!r}")
                if wanted is None or suffix in wanted:
                    member = tar.extractfile(info)
                    current[suffix] = member.read() if member is not None else b""
            # tarfile ends its iteration quietly at a header cut short; a complete archive
            # ends with two zero blocks, so fewer bytes left than that means truncation
            # (the sample in progress may be incomplete: it is not yielded).
            uncompressed = tar.fileobj is stream  # offsets are file offsets
            if size is not None and uncompressed and size - tar.offset < 2 * tarfile.BLOCKSIZE:
                raise DamagedShard(
                    f"{url}: truncated: {size} bytes end without the tar end-of-archive marker"
                )
            if current is not None:
                yield current
    except (tarfile.TarError, EOFError) as exc:
        raise DamagedShard(f"{url}: not a readable tar archive: {exc}") from exc
    finally:
        stream.close()
