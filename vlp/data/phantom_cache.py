"""The embedded default data: phantom shards, generated and converted on first use.

A recipe that names no training shards trains on the phantom dataset. The phantom tree is
generated with ``vlp.data.phantom.generate`` and converted with the same converter users
run on MIMIC-CXR-JPG (``vlp.data.convert.api.convert_mimic``, what ``tools/make_shards.py
mimic`` runs), into a cache folder keyed by everything that determines its bytes. The
first process to take the lock builds it; the others (other ranks, later runs) wait and
reuse it. ``VLP_CACHE`` moves the cache (default ``~/.cache/vlp``); on a cluster, point it
at a shared file system.
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

READY = "READY"


def cache_root() -> Path:
    return Path(os.environ.get("VLP_CACHE", Path.home() / ".cache" / "vlp"))


def _fingerprint(phantom_cfg, priors: int) -> str:
    from vlp import __version__
    from vlp.data.phantom import PHANTOM_VERSION

    payload = json.dumps(
        {
            "phantom": dataclasses.asdict(phantom_cfg),
            "phantom_version": PHANTOM_VERSION,
            "priors": priors,
            "schema": SCHEMA_VERSION,
            "vlp": __version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def phantom_shards(phantom_cfg, priors: int = 1, root: Path | None = None, log=print) -> Path:
    """Folder holding ``shards/{train,validate,test}`` (and the ``raw`` phantom) for this
    config, built once."""
    root = Path(root) if root is not None else cache_root()
    folder = root / f"phantom-{_fingerprint(phantom_cfg, priors)}"
    if (folder / READY).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / READY).is_file():
            return folder
        from vlp.data.convert.api import (
            ConversionError,
            ConvertOptions,
            convert_mimic,
            describe_summary,
        )
        from vlp.data.phantom import generate

        log(
            f"no training shards in the recipe: building phantom shards ({phantom_cfg.patients} "
            f"patients, seed {phantom_cfg.seed}) in {folder}"
        )
        raw = folder / "raw"
        if folder.exists():
            shutil.rmtree(folder)
        generate(raw, phantom_cfg)
        shards = folder / "shards"
        options = ConvertOptions(
            image_size=phantom_cfg.image_size, priors=priors, workers=max(1, phantom_cfg.workers)
        )
        try:
            summary = convert_mimic(raw, shards, options)
        except ConversionError as error:
            raise RuntimeError(
                f"converting the phantom dataset in {raw} failed: {error}"
            ) from error
        print(describe_summary(summary, shards))
        (folder / READY).write_text("ok\n")
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
