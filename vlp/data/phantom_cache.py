"""Phantom shards, generated and converted once: into a named folder, or the embedded default.

``build_phantom_shards`` generates a phantom tree (``vlp.data.phantom.generate``) and
converts it with the same converter users run on MIMIC-CXR-JPG
(``vlp.data.convert.api.convert_mimic``, what ``tools/make_shards.py mimic`` runs), and
records the settings so that a second call reuses it and a call with other settings (or a
new ``PHANTOM_VERSION``) rebuilds it; ``vlp demo`` and the benchmarks build their phantoms
with it. A recipe that names no training shards trains on phantom shards in the cache
(``phantom_shards``): a folder keyed by everything that determines its bytes, which the
first process to take the lock builds and the others (other ranks, later runs) reuse.
``VLP_CACHE`` moves the cache (default ``~/.cache/vlp``); on a cluster, point it at a
shared file system.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from vlp.data.schema import SCHEMA_VERSION

RECORD = "phantom.json"


def cache_root() -> Path:
    return Path(os.environ.get("VLP_CACHE", Path.home() / ".cache" / "vlp"))


def _settings(phantom_cfg, options) -> dict:
    """Everything that determines the bytes of a phantom tree and its shards (the worker
    counts do not)."""
    from vlp.data.phantom import PHANTOM_VERSION

    phantom = dataclasses.asdict(phantom_cfg)
    phantom.pop("workers")
    return {
        "phantom": phantom,
        "phantom_version": PHANTOM_VERSION,
        "convert": options.output_affecting(),
        "schema": SCHEMA_VERSION,
    }


def build_phantom_shards(folder, phantom_cfg, options, *, preview=None, log=print) -> Path:
    """``folder/phantom`` (the phantom tree) and ``folder/shards`` converted from it; returns
    the shards folder.

    What was built is recorded in ``folder/phantom.json`` once the conversion has finished;
    a folder built with other settings or another ``PHANTOM_VERSION`` (or left unfinished)
    is rebuilt, one with the same settings reused. ``preview`` names a PNG of the first
    patients' images to write when building. The demo, the benchmarks and the cache below
    all build through here.
    """
    from vlp.data.convert.api import ConversionError, convert_mimic, describe_summary
    from vlp.data.phantom import generate, write_preview

    folder = Path(folder)
    raw, shards, record = folder / "phantom", folder / "shards", folder / RECORD
    wanted = _settings(phantom_cfg, options)
    if record.is_file() and json.loads(record.read_text()) == wanted:
        log(f"reusing the phantom shards in {shards}")
        return shards
    record.unlink(missing_ok=True)
    for old in (raw, shards):
        shutil.rmtree(old, ignore_errors=True)
    log(
        f"building phantom shards ({phantom_cfg.patients} patients, seed {phantom_cfg.seed}, "
        f"{options.image_size} px, {options.priors} prior(s)) in {folder}"
    )
    generate(raw, phantom_cfg)
    if preview is not None:
        write_preview(raw, preview)
    try:
        summary = convert_mimic(raw, shards, options)
    except ConversionError as error:
        raise RuntimeError(f"converting the phantom dataset in {raw} failed: {error}") from error
    log(describe_summary(summary, shards))
    record.write_text(json.dumps(wanted, sort_keys=True))
    return shards


def _fingerprint(phantom_cfg, options) -> str:
    from vlp import __version__

    payload = json.dumps({**_settings(phantom_cfg, options), "vlp": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def phantom_shards(phantom_cfg, priors: int = 1, root: Path | None = None, log=print) -> Path:
    """Folder holding ``phantom/`` and ``shards/{train,validate,test}`` for this config in
    the cache, built once (``build_phantom_shards``) by the first process to take its lock."""
    from vlp.data.convert.api import ConvertOptions

    options = ConvertOptions(
        image_size=phantom_cfg.image_size, priors=priors, workers=max(1, phantom_cfg.workers)
    )
    root = Path(root) if root is not None else cache_root()
    folder = root / f"phantom-{_fingerprint(phantom_cfg, options)}"
    if (folder / RECORD).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / RECORD).is_file():
            log(f"no training shards in the recipe: building phantom shards in {folder}")
            build_phantom_shards(folder, phantom_cfg, options)
    return folder


def resolve_train_shards(cfg, rank: int = 0, log=None):
    """The recipe's loader config with ``shards`` set (phantom shards when none are given)."""
    data = cfg.data
    if data.shards:
        return data
    LOG = logging.getLogger("vlp")  # the trainer's logger (data must not import training)

    folder = phantom_shards(data.phantom, priors=data.priors, log=log or LOG.info)
    if rank == 0:
        LOG.info("training on phantom shards in %s (set data.shards to use your own)", folder)
    return dataclasses.replace(data, shards=str(folder / "shards" / "train"))
