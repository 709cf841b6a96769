"""Deterministic, resumable shard files and the per-split manifest.

Determinism: every tar member gets fixed metadata (mtime 0, uid/gid 0, empty user and
group names, mode 0o644) and members are written in a fixed order, so the same samples
give byte-identical shards.

Atomicity and resume: a shard is written to ``shard-NNNNNN.tar.tmp``, flushed, fsynced
and renamed; a half-written shard therefore never carries a final name. After each
rename, ``progress.json`` (itself replaced atomically) records the shard's sample count,
size, SHA-256 and skips, together with the *plan hash* (inputs, arguments, and the
ordered keys of every shard). A rerun with the same plan skips the shards recorded
there whose file still has the recorded size, and writes the rest. When every shard is
written, ``manifest.json`` replaces ``progress.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass

from vlp.data.convert.records import ConversionError

PROGRESS_NAME = "progress.json"
MANIFEST_NAME = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_tar_atomic(path: str, samples: Iterable[tuple[str, list[tuple[str, bytes]]]]) -> dict:
    """Write ``(key, [(suffix, data), ...])`` samples to ``path`` atomically.

    Returns ``{"bytes", "sha256"}`` of the finished file.
    """
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for key, members in samples:
                for suffix, data in members:
                    tar.addfile(_tar_info(f"{key}.{suffix}", len(data)), io.BytesIO(data))
        handle.flush()
        os.fsync(handle.fileno())
    digest = hashlib.sha256()
    with open(tmp, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    _commit(tmp, path)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _commit(tmp: str, path: str) -> None:
    """Rename a finished temporary file into place (a seam for fault-injection tests)."""
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class SplitState:
    """What already exists for one split directory."""

    complete: bool  # manifest.json with this plan and all shard files present
    done: dict[str, dict]  # shard name -> progress entry, for shards that can be kept


def load_state(split_dir: str, plan_hash: str) -> SplitState:
    """Inspect ``split_dir``; raise when it holds output of a *different* conversion."""
    os.makedirs(split_dir, exist_ok=True)
    for name in os.listdir(split_dir):
        if name.endswith(".tmp"):
            os.remove(os.path.join(split_dir, name))  # leftovers of a killed run
    for name, complete in ((MANIFEST_NAME, True), (PROGRESS_NAME, False)):
        path = os.path.join(split_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
        if payload.get("plan_hash") != plan_hash:
            raise ConversionError(
                f"{path} belongs to a conversion with other inputs or arguments "
                f"(plan {payload.get('plan_hash', '?')[:12]}, now {plan_hash[:12]}); "
                "delete the directory or choose another --out"
            )
        entries = payload["shards"] if complete else list(payload["shards"].values())
        done = {
            e["name"]: e
            for e in entries
            if _file_size(os.path.join(split_dir, e["name"])) == e["bytes"]
        }
        if complete and len(done) == len(entries):
            return SplitState(True, done)
        return SplitState(False, done)
    return SplitState(False, {})


def _file_size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def save_progress(split_dir: str, plan_hash: str, done: dict[str, dict]) -> None:
    write_json_atomic(
        os.path.join(split_dir, PROGRESS_NAME),
        {"plan_hash": plan_hash, "shards": {name: done[name] for name in sorted(done)}},
    )


def finish_split(split_dir: str, manifest: dict) -> None:
    """Write the manifest and drop the progress file (the manifest supersedes it)."""
    write_json_atomic(os.path.join(split_dir, MANIFEST_NAME), manifest)
    progress = os.path.join(split_dir, PROGRESS_NAME)
    if os.path.exists(progress):
        os.remove(progress)
