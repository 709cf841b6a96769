"""Frozen-model feature extraction over evaluation shards, batched, with an on-disk cache.

One job: run a model's image (and optionally report) encoder over a split of shards in
evaluation mode (no augmentation, no shuffling, shards in manifest order) and return the
features with the labels the evaluators need, as numpy arrays. Results are cached under a
folder the caller names, keyed by a fingerprint of the model's weights and of the data
(the manifest's bytes, or the shard files' names, sizes and modification times for brace
patterns), so a second evaluator on the same checkpoint and split reads them back.

Also here, the prologue every evaluator shares: locating the sibling splits of a split
(``.../test`` → ``.../train``, ``.../validate``: :func:`resolve_split`), the feature cache
folder (:func:`cache_folder`), the evaluation loader that decodes what the model's
encoders read (:func:`eval_loader`), the primary image encoder's features of a batch
(:func:`image_features`), a randomly re-initialised copy of a model, and the model's
image–text scorer (:func:`scorer_of`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlp.data.batch import at_time, batch_to
from vlp.data.loader import LoaderConfig, build_loader
from vlp.data.shards import resolve_shards

#: Bumped when the cached arrays change meaning.
CACHE_FORMAT = 1


class EvaluationInputError(ValueError):
    """What a user asked an evaluator for cannot be done (an objective the model lacks or
    one without the needed score, data without a readable study): ``vlp eval`` prints it
    in one line, exit 2."""


# --------------------------------------------------------------------------- data paths


def manifest_path(data: str | os.PathLike) -> Path | None:
    """The manifest.json a data spec names (a folder holding one, or the file), else None."""
    path = Path(data)
    if path.is_dir() and (path / "manifest.json").is_file():
        return path / "manifest.json"
    if path.is_file() and path.suffix == ".json":
        return path
    return None


def sibling_split(data: str | os.PathLike, split: str) -> str | None:
    """``…/test`` (or ``…/test/manifest.json``) → ``…/<split>`` when that has a manifest."""
    manifest = manifest_path(data)
    if manifest is None:
        return None
    candidate = manifest.parent.parent / split
    if candidate.resolve() == manifest.parent.resolve():
        return None
    return str(candidate) if (candidate / "manifest.json").is_file() else None


def resolve_split(data, given, split: str, required: bool) -> str | None:
    """``given`` if a path, the sibling ``split`` of ``data`` if ``"auto"``."""
    if given not in (None, "auto"):
        return str(given)
    found = sibling_split(data, split) if given == "auto" else None
    if found is None and required:
        raise FileNotFoundError(
            f"no {split} split for {data}: pass it explicitly (--train-data) or keep the "
            f"converter's layout (sibling {split}/manifest.json)"
        )
    return found


def cache_folder(out: str | os.PathLike, cache_dir: str | os.PathLike | None) -> Path:
    """Where an evaluator caches features: ``cache_dir``, else ``out/cache``. Evaluators
    that share a folder extract the features of one checkpoint and split once."""
    return Path(cache_dir) if cache_dir is not None else Path(out) / "cache"


def data_fingerprint(data: str | os.PathLike) -> str:
    """SHA-256 naming the data: manifest bytes, or shard names + sizes + mtimes."""
    digest = hashlib.sha256()
    manifest = manifest_path(data)
    if manifest is not None:
        digest.update(manifest.read_bytes())
    else:
        for shard in resolve_shards(str(data)):
            digest.update(shard.url.encode())
            if Path(shard.url).is_file():
                stat = Path(shard.url).stat()
                digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def sample_count(data: str | os.PathLike) -> int | None:
    counts = [s.samples for s in resolve_shards(str(data))]
    return sum(counts) if all(c is not None for c in counts) else None


# --------------------------------------------------------------------------- model helpers


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the state dict (names, dtypes, shapes and bytes), so any weight change
    (another checkpoint, a random initialisation) gets its own cache entry."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_of(module):
    """The ``VLPModel`` of a training module (``vlp.training.module``), or the model itself.

    Evaluators take either: a training module brings its objectives' scorers, a bare model
    is scored with the cosine of its embeddings.
    """
    return getattr(module, "model", module)


def image_size_of(module) -> int:
    """The square input side the model was built for (``data.image_size``)."""
    return int(model_of(module).image_size)


def tokenizer_of(module):
    return model_of(module).tokenizer


def image_features(module, batch: dict, device) -> dict:
    """The primary image encoder's projected features (``image_global``, ``image_local``,
    ``image_grid``) of a loader batch: the encoder reads the views it declares."""
    return model_of(module).encode_image(batch_to(batch, device))


def random_init_copy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` with every submodule re-initialised (same architecture).

    Uses each module's own ``reset_parameters`` (PyTorch default initialisers; BatchNorm
    running statistics reset too) under ``torch.manual_seed(seed)``; the baseline for
    "pretrained vs random encoder" probes.
    """
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in clone.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return clone.eval()


def scorer_of(model, objective: str | None = None, regions: bool = False):
    """The :class:`vlp.objectives.scoring.Scorer` an evaluator compares images and texts with.

    ``objective`` names the objective whose score to use. By default: the first objective
    of the recipe that defines a score (with ``regions``, the first whose score has region
    maps, for grounding), else the cosine of the global image and report embeddings.
    """
    from vlp.objectives.scoring import CosineScorer

    objectives = dict(getattr(model, "objectives", {}).items())
    if objective is not None:
        if objective not in objectives:
            raise EvaluationInputError(
                f"scorer: the model has no objective {objective!r} (it has {sorted(objectives)})"
            )
        found = objectives[objective].scorer()
        if found is None:
            raise EvaluationInputError(
                f"scorer: objective {objective!r} defines no image-text score"
            )
        return found
    scorers = [s for s in (o.scorer() for o in objectives.values()) if s is not None]
    if regions:
        scorers = [s for s in scorers if s.has_regions] or scorers
    if scorers:
        return scorers[0]
    dims = getattr(model_of(model), "dims", None)
    shared = dims is not None and dims.local_dim == dims.embed_dim
    return CosineScorer("report", region_text_kind="report" if shared else None)


def predictor_of(model, field: str, objective: str | None = None):
    """The :class:`vlp.objectives.base.LabelPredictor` of ``field`` that an objective of the
    recipe trains (``objective`` names it; by default the first that has one)."""
    objectives = dict(getattr(model, "objectives", {}).items())
    names = [objective] if objective is not None else list(objectives)
    if objective is not None and objective not in objectives:
        raise EvaluationInputError(
            f"classifier: the model has no objective {objective!r} (it has {sorted(objectives)})"
        )
    for name in names:
        found = objectives[name].predictor()
        if found is not None and found.field == field:
            return found
    raise EvaluationInputError(
        f"classifier: no objective of the recipe ({sorted(objectives) or 'none'}) trains a "
        f"{field} classifier; use the probe instead"
    )


@torch.no_grad()
def text_embeddings(model, texts: list[str], kind: str, batch_size: int = 64) -> torch.Tensor:
    """Projected embeddings (``report`` or ``sentence`` space, ``P×D``) of raw strings, or
    their word features (``words``, ``P×L×D`` zero-padded to the longest), batched."""
    rows = [
        model_of(model).encode_text(list(texts[i : i + batch_size]), kind=kind).float()
        for i in range(0, len(texts), batch_size)
    ]
    if not rows:
        return torch.zeros(0, 0)
    if rows[0].dim() == 3:  # words: chunks tokenised to different lengths
        length = max(r.shape[1] for r in rows)
        rows = [F.pad(r, (0, 0, 0, length - r.shape[1])) for r in rows]
    return torch.cat(rows)


def eval_loader(
    model,
    data: str | os.PathLike,
    *,
    batch_size: int = 32,
    shifted_priors: int = 0,
    sentences: bool = False,
    workers: int = 0,
    image_size: int | None = None,
):
    """The evaluation loader of ``data`` for ``model``: the views and priors its encoders
    read, centre crop, in order. ``shifted_priors`` = k adds k time steps so that the
    encoders can also read the batch seen from time step 1..k
    (:func:`vlp.data.collate.at_time`: a prior study encoded as a current one)."""
    need = model_of(model).requirements()
    views = need.views | need.prior_views
    prior_views = need.prior_views | (need.views if shifted_priors else frozenset())
    cfg = LoaderConfig(
        shards=str(data),
        batch_size=batch_size,
        workers=workers,
        image_size=image_size or image_size_of(model),
        views=["frontal", *sorted(views - {"frontal"})],
        priors=need.priors + shifted_priors,
        prior_views=sorted(prior_views),
        prior_text=False,
        sentences=sentences,
        shuffle_buffer=0,
        shard_shuffle=False,
    )
    return build_loader(cfg, tokenizer_of(model), split="test")


def progress(loader, data, batch_size: int, desc: str):
    total = sample_count(data)
    batches = math.ceil(total / batch_size) if total is not None else None
    return tqdm(loader, total=batches, desc=desc, unit="batch", leave=False)


# --------------------------------------------------------------------------- extraction


@dataclass
class Features:
    """Per-study arrays of one split, rows in loader order."""

    keys: list[str]
    image_global: np.ndarray  # N×D float32
    labels: np.ndarray  # N×14 float32 (1, 0, -1, NaN)
    edema_severity: np.ndarray  # N int64, -1 unknown
    meta: list[dict] = field(default_factory=list)
    report: np.ndarray | None = None  # N×D float32 (projected report embedding)
    prior_global: np.ndarray | None = None  # N×D float32 (zeros where no prior)
    prior_mask: np.ndarray | None = None  # N bool
    skipped: int = 0  # samples the loader skipped as corrupt

    def __len__(self) -> int:
        return len(self.keys)


def _cache_file(cache_dir: Path, model_fp: str, data_fp: str, opts: dict) -> Path:
    tag = hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / f"features-{model_fp[:16]}-{data_fp[:16]}-{tag}.npz"


def _save(path: Path, feats: Features) -> None:
    arrays = {
        "image_global": feats.image_global,
        "labels": feats.labels,
        "edema_severity": feats.edema_severity,
        "skipped": np.asarray(feats.skipped),
    }
    for name in ("report", "prior_global", "prior_mask"):
        if getattr(feats, name) is not None:
            arrays[name] = getattr(feats, name)
    sidecar = json.dumps({"format": CACHE_FORMAT, "keys": feats.keys, "meta": feats.meta})
    arrays["sidecar"] = np.frombuffer(sidecar.encode("utf-8"), dtype=np.uint8)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a crashed run never leaves a half-written cache


def _load(path: Path) -> Features | None:
    """The cached features, or None when the file is of another format. Never unpickles:
    a planted cache holding object arrays is refused (``ValueError``) and recomputed."""
    try:
        return _read_cache(path)
    except (ValueError, OSError, KeyError) as err:
        print(f"feature cache {path} not used ({err}); recomputing", file=sys.stderr)
        return None


def _read_cache(path: Path) -> Features | None:
    with np.load(path, allow_pickle=False) as arrays:
        sidecar = json.loads(arrays["sidecar"].tobytes().decode("utf-8"))
        if sidecar.get("format") != CACHE_FORMAT:
            return None
        optional = {n: arrays[n] for n in ("report", "prior_global", "prior_mask") if n in arrays}
        return Features(
            keys=sidecar["keys"],
            meta=sidecar["meta"],
            image_global=arrays["image_global"],
            labels=arrays["labels"],
            edema_severity=arrays["edema_severity"],
            skipped=int(arrays["skipped"]),
            **optional,
        )


@torch.no_grad()
def extract_features(
    model,
    data: str | os.PathLike,
    *,
    batch_size: int = 32,
    priors: bool = False,
    reports: bool = False,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 0,
    desc: str = "features",
) -> Features:
    """Global image features (and optionally report embeddings and prior-image features)
    of every study in ``data``; read from / written to ``cache_dir`` when given."""
    opts = {"priors": bool(priors), "reports": bool(reports), "size": image_size_of(model)}
    path = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = _cache_file(cache_dir, model_fingerprint(model), data_fingerprint(data), opts)
        if path.is_file():
            cached = _load(path)
            if cached is not None:
                return cached
    was_training = model.training
    model.eval()
    device = model_device(model)
    loader = eval_loader(
        model, data, batch_size=batch_size, shifted_priors=1 if priors else 0, workers=workers
    )
    keys, meta, globals_, labels, severity = [], [], [], [], []
    report_rows, prior_rows, prior_masks = [], [], []
    net = model_of(model)
    for batch in progress(loader, data, batch_size, desc):
        globals_.append(image_features(net, batch, device)["image_global"].float().cpu())
        if reports:
            keys_ = ("report_input_ids", "report_attention_mask", "study_mask")
            tokens = {k: batch[k].to(device) for k in keys_}
            report_rows.append(net.encode(tokens, {"report"})["report"].float().cpu())
        if priors:
            # The prior study through the same encoder: the batch seen from time step 1.
            mask = batch["study_mask"][:, 1] & batch["view_mask"]["frontal"][:, 1]
            rows = torch.zeros_like(globals_[-1])
            if bool(mask.any()):
                prior = image_features(net, at_time(batch, 1), device)["image_global"]
                rows[mask] = prior.float().cpu()[mask]
            prior_rows.append(rows)
            prior_masks.append(mask)
        keys += batch["keys"]
        meta += batch["meta"]
        labels.append(batch["labels"][:, 0])
        severity.append(batch["edema_severity"][:, 0])
    model.train(was_training)
    if not keys:
        raise EvaluationInputError(
            f"{data}: no readable study (skipped {loader.stats.samples_skipped})"
        )
    stats = loader.stats
    if stats.samples_skipped:
        # Counted as in training: per reason and per shard, never dropped silently.
        print(
            f"{data}: skipped {stats.samples_skipped} of {stats.samples_seen} samples ("
            + ", ".join(f"{k} {v}" for k, v in sorted(stats.skipped_by_reason.items()))
            + f"); most per shard: {stats.worst_shards(5)}",
            file=sys.stderr,
        )
    feats = Features(
        keys=keys,
        meta=meta,
        image_global=torch.cat(globals_).numpy(),
        labels=torch.cat(labels).numpy(),
        edema_severity=torch.cat(severity).numpy(),
        report=torch.cat(report_rows).numpy() if reports else None,
        prior_global=torch.cat(prior_rows).numpy() if priors else None,
        prior_mask=torch.cat(prior_masks).numpy() if priors else None,
        skipped=loader.stats.samples_skipped,
    )
    if path is not None:
        _save(path, feats)
    return feats
