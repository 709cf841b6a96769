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


#: tar header types of regular files (POSIX ``0``, old ``\\0``, contiguous ``7``).
_REGULAR = (b"0", b"\0", b"7")
#: header types that change how the next member is read (GNU long names, pax headers):
#: the plain-header reader hands those shards over to ``tarfile`` from that header on.
_EXTENDED = (b"L", b"K", b"x", b"g", b"S")  # and GNU sparse files
_BLOCK = 512


class _NeedsTarfile(Exception):
    """The plain-header reader met an extended header at ``offset``."""

    def __init__(self, offset: int):
        super().__init__(offset)
        self.offset = offset


def _octal(field: bytes, url: str, offset: int) -> int:
    if field[:1] and field[0] & 0x80:  # base-256 (GNU) for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" \0")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise DamagedShard(f"{url}: not a readable tar archive: bad header at {offset}") from None


def _signed_sum(header: bytes) -> int:
    """The header checksum with signed bytes, which some old tar writers used."""
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:])
    return signed + 8 * 32


def _plain_members(stream, size: int, url: str) -> Iterator[tuple[str, bool, int, int]]:
    """``(name, is_file, data_offset, data_size)`` of each member of an uncompressed,
    seekable tar, read from its 512-byte headers directly: ``tarfile`` builds a
    ``TarInfo`` per member in Python, which was a fifth of the loader's CPU time per sample
    (``benchmarks/loader_speed.py``). Raises :class:`_NeedsTarfile` at an extended header
    and :class:`DamagedShard` at a bad checksum or an archive cut short."""
    offset = 0
    while True:
        stream.seek(offset)
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:
            raise DamagedShard(
                f"{url}: truncated: {size} bytes end without the tar end-of-archive marker"
            )
        if header.count(0) == _BLOCK:  # end of archive: a zero block (tarfile needs one)
            return
        stored = _octal(header[148:156], url, offset)
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]) and stored != _signed_sum(
            header
        ):
            raise DamagedShard(f"{url}: not a readable tar archive: bad checksum at {offset}")
        kind = header[156:157]
        if kind in _EXTENDED:
            raise _NeedsTarfile(offset)
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]  # applied as tarfile does
        if prefix:
            name = prefix + b"/" + name
        is_file = kind in _REGULAR and not (kind == b"\0" and name.endswith(b"/"))  # V7 dirs
        length = _octal(header[124:136], url, offset)
        data = offset + _BLOCK
        if data + length > size:
            raise DamagedShard(f"{url}: not a readable tar archive: unexpected end of data")
        yield name.decode("utf-8", "surrogateescape"), is_file, data, length
        offset = data + -(-length // _BLOCK) * _BLOCK


def _tarfile_members(stream, seekable: bool, size: int | None, url: str):
    """The same as :func:`_plain_members` through ``tarfile`` (compressed or unseekable
    streams, extended headers), from the stream's current position; each data offset is
    replaced by a reader of the member's bytes."""
    with tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*") as tar:
        for info in tar:
            yield info.name, info.isfile(), (lambda info=info: tar.extractfile(info).read()), None
        # tarfile ends its iteration quietly at a header cut short; a complete archive
        # ends with two zero blocks, so fewer bytes left than that means truncation
        # (the sample in progress may be incomplete: it is not yielded).
        uncompressed = tar.fileobj is stream  # offsets are file offsets
        if size is not None and uncompressed and size - tar.offset < 2 * tarfile.BLOCKSIZE:
            raise DamagedShard(
                f"{url}: truncated: {size} bytes end without the tar end-of-archive marker"
            )


def _members(stream, url: str):
    """Every member of a shard as ``(name, is_file, read)``: plain headers parsed
    directly when the stream is seekable and uncompressed, ``tarfile`` otherwise (and from
    the first extended header on)."""
    seekable = getattr(stream, "seekable", lambda: False)()
    size = stream.seek(0, 2) if seekable else None
    if seekable:
        stream.seek(0)
        plain = stream.read(_BLOCK)[257:262] == b"ustar"
        stream.seek(0)
        if plain:
            try:
                for name, is_file, data, length in _plain_members(stream, size, url):
                    yield (
                        name,
                        is_file,
                        (lambda data=data, length=length: _read_at(stream, data, length)),
                    )
                return
            except _NeedsTarfile as extended:
                stream.seek(extended.offset)
    for name, is_file, read, _ in _tarfile_members(stream, seekable, size, url):
        yield name, is_file, read


def _read_at(stream, offset: int, length: int) -> bytes:
    stream.seek(offset)
    return stream.read(length)


def iter_tar_samples(url: str, wanted: frozenset[str] | None = None) -> Iterator[dict]:
    """Yield raw samples ``{"__key__", "__url__", suffix: bytes}`` of one tar shard.

    Every member is checked against :data:`schema.ALLOWED_SUFFIXES` (the last dotted part
    of its suffix) *before* anything is read, so a shard carrying ``.pyd``/``.pickle``
    members is rejected with a :class:`ShardError` naming it. Members not in ``wanted``
    are skipped without reading their bytes. A shard cut short keeps the samples before
    the cut (the one in progress is not yielded) and raises :class:`DamagedShard`.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as exc:  # gopen raises several types for local and remote failures
        raise ShardError(f"{url}: cannot open shard: {exc}") from exc
    try:
        current: dict | None = None
        for name, is_file, read in _members(stream, url):
            if not is_file:
                continue
            if name.startswith("/") or ".." in name.split("/"):
                # Nothing is extracted to disk, but such a name is never a sample of
                # ours: a crafted archive, refused as a whole.
                raise ShardError(
                    f"{url}: member {name!r} has an absolute path or '..'; refusing this shard"
                )
            match = _MEMBER_NAME.match(name)
            if match is None:
                raise ShardError(f"{url}: member {name!r} has no '.suffix'; expected key.suffix")
            key, suffix = match.groups()
            extension = suffix.rsplit(".", 1)[-1]
            if extension not in schema.ALLOWED_SUFFIXES:
                raise ShardError(
                    f"{url}: member {name!r} has suffix .{extension}, which is not allowed "
                    f"(allowed: {', '.join(schema.ALLOWED_SUFFIXES)}); refusing this shard"
                )
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            if suffix in current:
                raise ShardError(f"{url}: member {name!r} appears twice in sample {key!r}")
            if wanted is None or suffix in wanted:
                current[suffix] = read()
        if current is not None:
            yield current
    except (tarfile.TarError, EOFError) as exc:
        raise DamagedShard(f"{url}: not a readable tar archive: {exc}") from exc
    finally:
        stream.close()
