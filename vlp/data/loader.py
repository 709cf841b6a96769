"""Streaming study loader: WebDataset shards → batch dicts, with exact mid-epoch resumption.

One job: turn the shards described by :mod:`vlp.data.schema` into the batch dictionary of
``docs/architecture.md`` ("Batch"), for any number of ranks and workers, and be able to
continue from a saved state exactly where an uninterrupted run would have been.

Pipeline of one DataLoader worker (all of it runs in the worker; the main process only
bookkeeps):

1. **Shards.** ``cfg.shards`` is a ``manifest.json`` (or a folder holding one, directly or
   under ``<split>/``) or a brace pattern / URL list understood by ``webdataset.gopen``
   (local paths, ``http(s)://``, ``pipe:``).
2. **Split.** Non-resampled: the shard list is shuffled with a seed of ``(seed, epoch)`` that
   is the same on every rank, *then* dealt to ranks (``[rank::world]``), then to workers.
   Every sample is therefore read exactly once per epoch over all ranks × workers. When
   there are fewer shards than ranks × workers, each (rank, worker) slot reads every shard
   and keeps every ``slots``-th sample instead (still exactly once, at the cost of reading
   the shards several times; small validation splits need this). Resampled: each
   (rank, worker) draws shards with replacement (weighted by manifest sample counts) from
   a generator seeded by ``(seed, epoch, rank, worker)``; an epoch is ``samples_per_epoch``
   samples over all ranks, the same number of batches on every rank.
3. **Read.** Our own tar reader groups members by key, rejects any member whose suffix is
   not in :data:`schema.ALLOWED_SUFFIXES` (no pickle can ever be decoded), and keeps only
   the bytes the recipe needs.
4. **Shuffle.** A sample buffer seeded by ``(seed, epoch, rank, worker)``.
5. **Decode.** Only the members the recipe asks for: grayscale JPEG with PIL draft mode
   (DCT-domain downscaling by 1/2, 1/4 or 1/8) when the stored image is at least twice as
   large as needed (``draft_max_upscale`` relaxes this), crop + resize in one PIL call,
   uint8 1×H×W tensors; a sample that fails is skipped and reported (key, shard, reason).
6. **Batch.** Tokenise reports and sentences per batch (so the main process stays free)
   and collate into the batch dict.

Resumption. A worker's raw sample stream is a deterministic function of the seeds, the
epoch, the rank and the worker, so a worker's progress is one number: how many raw
samples (decoded or skipped) it has consumed. Each worker item carries that number; the
main process records it for the item it hands out, plus which worker comes next in the
DataLoader's round-robin. On restore, each worker fast-forwards its raw stream (reading
tar members, not decoding them), and the workers are rotated so the round-robin continues
with the right one. The state is a small dict of plain types.

The shard format is WebDataset's (Aizman et al. 2019, "High performance I/O for large
scale deep learning", IEEE Big Data); URLs are opened with ``webdataset.gopen`` but its
decoders, node splitter and pickle handlers are not used.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import posixpath
import random
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen

from vlp.data import schema
from vlp.data.transforms import AugmentConfig, crop_box, min_decode_side, random_affine

log = logging.getLogger(__name__)

STATE_FORMAT = 1
#: How many skipped samples are kept by name in :class:`LoaderStats` (the count is exact).
MAX_SKIPPED_LISTED = 1000
_VIEWS = ("frontal", "lateral")
_SENTENCE_SAMPLING = ("first", "random")
# ``p123-s456.prior1.frontal.jpg`` → key ``p123-s456``, suffix ``prior1.frontal.jpg``
# (the key is everything up to the first dot of the file name, as WebDataset does).
_MEMBER_NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")


class ShardError(ValueError):
    """A shard (or the shard list) violates the schema; training must not go on with it."""


class SampleError(ValueError):
    """One sample cannot be used; the loader skips it and counts it."""


@dataclass
class LoaderConfig:
    """Recipe parameters of the loader (``data.loader`` in a recipe)."""

    shards: str = ""
    batch_size: int = 32  # per rank
    workers: int = 2
    image_size: int = 224  # model input side; views are cropped and resized to it
    views: list[str] = field(default_factory=lambda: ["frontal"])
    priors: int = 0  # K: decode prior1..priorK frontal views
    sentences: bool = True  # tokenise the json ``sentences`` individually
    max_sentences: int = 16  # per sample
    sentence_sampling: str = "first"  # which sentences beyond the cap: "first" or "random"
    max_text_length: int = 256
    max_sentence_length: int = 64
    shuffle_buffer: int = 500  # samples per worker; 0 or 1 = no sample shuffle
    shard_shuffle: bool = True
    resampled: bool = False
    samples_per_epoch: int = 0  # resampled mode only: samples per (virtual) epoch, all ranks
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # >1 lets JPEG draft decoding undershoot the needed size by this factor (faster, a little
    # softer); 1.0 never upsamples a draft-decoded image
    draft_max_upscale: float = 1.0
    drop_last: bool = False  # drop each worker's last partial batch (non-resampled mode)
    prefetch_factor: int = 2
    pin_memory: bool = False

    def validate(self) -> None:
        problems = []
        if not self.shards:
            problems.append(
                "shards is empty (expected a manifest.json, a folder or a brace pattern)"
            )
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if self.image_size < 8:
            problems.append(f"image_size must be >= 8, got {self.image_size}")
        unknown = [v for v in self.views if v not in _VIEWS]
        if unknown or "frontal" not in self.views:
            problems.append(
                f"views must be a subset of {list(_VIEWS)} containing 'frontal', got {self.views}"
            )
        if self.priors < 0:
            problems.append(f"priors must be >= 0, got {self.priors}")
        if self.draft_max_upscale < 1.0:
            problems.append(f"draft_max_upscale must be >= 1, got {self.draft_max_upscale}")
        if self.max_sentences < 1 or self.max_text_length < 2 or self.max_sentence_length < 2:
            problems.append("max_sentences must be >= 1 and max_*_length >= 2")
        if self.sentence_sampling not in _SENTENCE_SAMPLING:
            problems.append(
                f"sentence_sampling must be one of {_SENTENCE_SAMPLING}, got {self.sentence_sampling!r}"
            )
        if self.resampled and self.samples_per_epoch < 1:
            problems.append(
                "resampled mode needs samples_per_epoch >= 1 (the virtual epoch length)"
            )
        if not self.resampled and self.samples_per_epoch != 0:
            problems.append(
                "samples_per_epoch applies to resampled mode only; set resampled: true or 0"
            )
        if problems:
            raise ValueError("invalid loader config: " + "; ".join(problems))


# --------------------------------------------------------------------------- shard list


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
        candidates = [Path(spec) / "manifest.json", Path(spec) / split / "manifest.json"]
        for candidate in candidates:
            if candidate.is_file():
                return read_manifest(str(candidate))
        raise ShardError(
            f"{spec}: folder has no manifest.json (looked for {', '.join(map(str, candidates))})"
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
        with tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*") as tar:
            current: dict | None = None
            for info in tar:
                if not info.isfile():
                    continue
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
            if current is not None:
                yield current
    except tarfile.TarError as exc:
        raise ShardError(f"{url}: not a readable tar archive: {exc}") from exc
    finally:
        stream.close()


def _seeded(*parts: object) -> random.Random:
    # String seeds are hashed (SHA-512) by random.Random: stable across processes and runs,
    # unlike hash() of a tuple.
    return random.Random("/".join(str(p) for p in parts))


def _buffered_shuffle(source: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle a stream with a buffer of up to ``size`` items.

    Output starts once the buffer holds ``size // 8`` items; until it is full, two items
    are read per item written, so a worker's first batch does not wait for a full buffer.
    """
    source = iter(source)
    start = max(1, size // 8)
    buffer: list[dict] = []
    for item in source:
        buffer.append(item)
        if len(buffer) < size:
            extra = next(source, None)
            if extra is not None:
                buffer.append(extra)
        if len(buffer) >= start:
            slot = rng.randrange(len(buffer))
            buffer[slot], buffer[-1] = buffer[-1], buffer[slot]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


# --------------------------------------------------------------------------- decoding


def decode_radiograph(
    data: bytes,
    out_size: int,
    augment: AugmentConfig | None = None,
    rng: random.Random | None = None,
    max_upscale: float = 1.0,
) -> tuple[torch.Tensor, int]:
    """Decode a JPEG to a uint8 1×S×S grayscale tensor; returns ``(image, draft_scale)``.

    ``draft_scale`` is the JPEG DCT reduction PIL applied (1, 2, 4 or 8): the decoder is
    asked for the smallest image whose short side still covers the crop at full detail
    (:func:`~vlp.data.transforms.min_decode_side`), which makes decoding a large stored
    image cheaper (the entropy decoding still reads every coefficient, so about 1.3-2x).
    ``max_upscale`` > 1 lets the draft go that much below the needed size (the resize then
    upsamples slightly): a speed/detail trade-off, off by default. The crop box (centred square, or a random resized crop
    when augmenting) and the resize are one PIL call; the affine runs on the tensor.
    """
    augment = augment or AugmentConfig()
    rng = rng or random.Random(0)
    if max_upscale < 1.0:
        raise ValueError(f"max_upscale must be >= 1, got {max_upscale}")
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
            width = img.size[0]
            need = math.ceil(min_decode_side(out_size, augment) / max_upscale)
            img.draft("L", (need, need))
            draft_scale = max(1, round(width / img.size[0]))
            img.load()
            gray = img if img.mode == "L" else img.convert("L")
            box = crop_box(gray.size[0], gray.size[1], augment, rng)
            resized = gray.resize((out_size, out_size), Image.Resampling.BILINEAR, box=box)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SampleError(f"cannot decode JPEG: {type(exc).__name__}: {exc}") from exc
    image = torch.from_numpy(np.array(resized, dtype=np.uint8)).unsqueeze(0)
    if augment.affine:
        image = random_affine(image, augment, rng)
    return image, draft_scale


def _study_id(record: dict, key: str) -> int:
    for candidate in (record.get("study_id"), key.rsplit("-s", 1)[-1] if "-s" in key else None):
        digits = re.sub(r"\D", "", str(candidate)) if candidate is not None else ""
        if digits:
            return int(digits)
    raise SampleError(f"no numeric study id in json study_id={record.get('study_id')!r} or key")


def _labels(record: dict) -> tuple[list[float], int]:
    labels = record.get("labels") or {}
    if not isinstance(labels, dict):
        raise SampleError(f"json 'labels' must be an object, got {type(labels).__name__}")
    chexpert = labels.get("chexpert") or {}
    values = []
    for name in schema.CHEXPERT_LABELS:
        value = chexpert.get(name)
        if value is None:
            values.append(math.nan)
        elif value in (1, 0, -1):
            values.append(float(value))
        else:
            raise SampleError(f"chexpert label {name!r} = {value!r}, expected 1, 0, -1 or null")
    severity = labels.get("edema_severity")
    if severity is None:
        severity = -1
    elif severity not in (0, 1, 2, 3):
        raise SampleError(f"edema_severity = {severity!r}, expected 0-3 or null")
    return values, int(severity)


@dataclass
class _Decoded:
    key: str
    study_id: int
    frontal: torch.Tensor
    lateral: torch.Tensor | None
    priors: list[torch.Tensor | None]
    prior_gap_days: list[float]
    report: str
    sentences: list[str]
    labels: list[float]
    edema_severity: int
    meta: dict
    images: int = 0  # JPEGs decoded
    reduced: int = 0  # of which with draft scaling


class StudyDecoder:
    """Raw sample (member bytes) → decoded study; raises :class:`SampleError` on bad data."""

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self.lateral = "lateral" in cfg.views
        members = {"json", "txt", "frontal.jpg"}
        if self.lateral:
            members.add("lateral.jpg")
        members.update(f"prior{k}.frontal.jpg" for k in range(1, cfg.priors + 1))
        self.members = frozenset(members)

    def _image(self, raw: dict, member: str, rng: random.Random, out: _Decoded) -> torch.Tensor:
        try:
            image, scale = decode_radiograph(
                raw[member], self.cfg.image_size, self.cfg.augment, rng, self.cfg.draft_max_upscale
            )
        except SampleError as exc:
            raise SampleError(f"{member}: {exc}") from exc
        out.images += 1
        out.reduced += scale > 1
        return image

    def __call__(self, raw: dict, rng: random.Random) -> _Decoded:
        key = raw["__key__"]
        if "json" not in raw:
            raise SampleError("missing json member")
        try:
            record = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SampleError(f"json member is not UTF-8 JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise SampleError(f"json member must be an object, got {type(record).__name__}")
        if "txt" not in raw:
            raise SampleError("missing txt member")
        try:
            report = raw["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SampleError(f"txt member is not UTF-8: {exc}") from exc
        if "frontal.jpg" not in raw:
            raise SampleError("missing frontal.jpg member")
        sentences = record.get("sentences") or []
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise SampleError("json 'sentences' must be a list of strings")
        sentences = [s for s in sentences if s.strip()]
        if len(sentences) > self.cfg.max_sentences:
            if self.cfg.sentence_sampling == "random":
                chosen = sorted(rng.sample(range(len(sentences)), self.cfg.max_sentences))
                sentences = [sentences[i] for i in chosen]
            else:
                sentences = sentences[: self.cfg.max_sentences]
        labels, severity = _labels(record)
        out = _Decoded(
            key=key,
            study_id=_study_id(record, key),
            frontal=torch.empty(0),
            lateral=None,
            priors=[],
            prior_gap_days=[],
            report=report,
            sentences=sentences,
            labels=labels,
            edema_severity=severity,
            meta=record,
        )
        out.frontal = self._image(raw, "frontal.jpg", rng, out)
        if self.lateral and "lateral.jpg" in raw:
            out.lateral = self._image(raw, "lateral.jpg", rng, out)
        prior_records = record.get("priors") or []
        for k in range(1, self.cfg.priors + 1):
            member = f"prior{k}.frontal.jpg"
            out.priors.append(self._image(raw, member, rng, out) if member in raw else None)
            gap = None
            if member in raw and k <= len(prior_records) and isinstance(prior_records[k - 1], dict):
                gap = prior_records[k - 1].get("gap_days")
            out.prior_gap_days.append(float(gap) if isinstance(gap, (int, float)) else 0.0)
        return out


def _tokenize(
    tokenizer: Callable, texts: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return encoded["input_ids"].long(), encoded["attention_mask"].long()


def _stack(images: list) -> torch.Tensor:
    """Stack (nested lists of) uint8 tensors with numpy.

    ``torch.stack`` runs an OpenMP parallel region; on a few shared cores waking its
    threads cost up to 0.2 s per batch in the main process, numpy's copy is single-threaded.
    """

    def array(item) -> np.ndarray:
        return np.stack([array(i) for i in item]) if isinstance(item, list) else item.numpy()

    return torch.from_numpy(array(images))


def collate_studies(
    studies: list[_Decoded], tokenizer: Callable, cfg: LoaderConfig
) -> dict[str, Any]:
    """Decoded studies → the batch dict of docs/architecture.md ("Batch")."""
    size = cfg.image_size
    zeros = torch.from_numpy(np.zeros((1, size, size), dtype=np.uint8))  # no OpenMP, see _stack
    batch: dict[str, Any] = {
        "keys": [s.key for s in studies],
        "study_id": torch.tensor([s.study_id for s in studies], dtype=torch.int64),
        "frontal": _stack([s.frontal for s in studies]),
    }
    if "lateral" in cfg.views:
        batch["lateral"] = _stack([s.lateral if s.lateral is not None else zeros for s in studies])
        batch["lateral_mask"] = torch.tensor(
            [s.lateral is not None for s in studies], dtype=torch.bool
        )
    if cfg.priors > 0:
        batch["prior_frontal"] = _stack(
            [[p if p is not None else zeros for p in s.priors] for s in studies]
        )
        batch["prior_mask"] = torch.tensor(
            [[p is not None for p in s.priors] for s in studies], dtype=torch.bool
        )
        batch["prior_gap_days"] = torch.tensor(
            [s.prior_gap_days for s in studies], dtype=torch.float32
        )
    ids, mask = _tokenize(tokenizer, [s.report for s in studies], cfg.max_text_length)
    batch["report_input_ids"], batch["report_attention_mask"] = ids, mask
    if cfg.sentences:
        flat = [sentence for s in studies for sentence in s.sentences]
        index = [i for i, s in enumerate(studies) for _ in s.sentences]
        if flat:
            ids, mask = _tokenize(tokenizer, flat, cfg.max_sentence_length)
        else:  # no sentence in the whole batch: keep the keys, with zero rows
            ids = mask = torch.zeros(0, 0, dtype=torch.int64)
        batch["sentence_input_ids"], batch["sentence_attention_mask"] = ids, mask
        batch["sentence_index"] = torch.tensor(index, dtype=torch.int64)
    batch["labels"] = torch.tensor([s.labels for s in studies], dtype=torch.float32)
    batch["edema_severity"] = torch.tensor([s.edema_severity for s in studies], dtype=torch.int64)
    batch["meta"] = [s.meta for s in studies]
    return batch


# --------------------------------------------------------------------------- worker stream


@dataclass
class _Progress:
    """Where each logical worker is in the current epoch (plain lists, copied into workers)."""

    raw: list[int]  # raw samples consumed (decoded or skipped)
    batches: list[int]  # batches handed out
    done: list[bool]  # end marker handed out
    next_worker: int = 0  # logical worker whose item the DataLoader hands out next

    @classmethod
    def fresh(cls, workers: int) -> _Progress:
        return cls([0] * workers, [0] * workers, [False] * workers, 0)


class _StudyStream(IterableDataset):
    """The per-worker pipeline for one epoch, starting from ``progress``."""

    def __init__(self, loader: VLPLoader, epoch: int, progress: _Progress):
        super().__init__()
        self.cfg = loader.cfg
        self.tokenizer = loader.tokenizer
        self.shards = loader.shards
        self.rank, self.world_size = loader.rank, loader.world_size
        self.workers = loader.logical_workers
        self.epoch = epoch
        self.progress = progress
        self.quotas = loader.worker_batch_quota()  # per logical worker; None = until exhausted
        self.decoder = StudyDecoder(self.cfg)

    def _resampled_source(self, worker: int) -> Iterator[dict]:
        rng = _seeded("resample", self.cfg.seed, self.epoch, self.rank, worker)
        counts = [s.samples for s in self.shards]
        weights = counts if all(c is not None for c in counts) and sum(counts) > 0 else None
        draws_without_samples = 0
        while True:
            shard = rng.choices(self.shards, weights=weights)[0]
            produced = False
            for sample in iter_tar_samples(shard.url, self.decoder.members):
                produced = True
                yield sample
            draws_without_samples = 0 if produced else draws_without_samples + 1
            if draws_without_samples > 10 * len(self.shards):
                raise ShardError(
                    f"resampling drew {draws_without_samples} empty shards in a row; are all empty?"
                )

    def _epoch_source(self, worker: int) -> Iterator[dict]:
        order = list(self.shards)
        if self.cfg.shard_shuffle:
            _seeded("shards", self.cfg.seed, self.epoch).shuffle(order)  # same on every rank
        slots = self.world_size * self.workers
        if len(order) >= slots:
            mine = order[self.rank :: self.world_size][worker :: self.workers]
            return itertools.chain.from_iterable(
                iter_tar_samples(s.url, self.decoder.members) for s in mine
            )
        slot = self.rank * self.workers + worker
        every = itertools.chain.from_iterable(
            iter_tar_samples(s.url, self.decoder.members) for s in order
        )
        return (sample for i, sample in enumerate(every) if i % slots == slot)

    def raw_stream(self, worker: int) -> Iterator[dict]:
        """Deterministic raw sample stream of (epoch, rank, worker)."""
        source = (
            self._resampled_source(worker) if self.cfg.resampled else self._epoch_source(worker)
        )
        if self.cfg.shuffle_buffer > 1:
            rng = _seeded("samples", self.cfg.seed, self.epoch, self.rank, worker)
            source = _buffered_shuffle(source, self.cfg.shuffle_buffer, rng)
        return source

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.progress.next_worker) % self.workers
        if self.progress.done[worker]:
            return
        position = self.progress.raw[worker]
        batches = self.progress.batches[worker]
        quota = None if self.quotas is None else self.quotas[worker]
        stream = self.raw_stream(worker)
        # Fast-forward past what the saved run already consumed: tar reads only, no decoding.
        for _ in itertools.islice(stream, position):
            pass
        pending: list[_Decoded] = []
        errors: list[tuple[str, str, str]] = []
        images = reduced = 0

        def item(batch: dict) -> dict:
            nonlocal errors, images, reduced
            batch.update(
                _worker=worker, _raw_end=position, _errors=errors, _images=images, _reduced=reduced
            )
            errors, images, reduced = [], 0, 0
            return batch

        while quota is None or batches < quota:
            raw = next(stream, None)
            if raw is None:
                break
            position += 1
            rng = _seeded("augment", self.cfg.seed, self.epoch, self.rank, worker, position)
            try:
                study = self.decoder(raw, rng)
            except SampleError as exc:
                errors.append((raw["__url__"], raw["__key__"], str(exc)))
                continue
            images += study.images
            reduced += study.reduced
            pending.append(study)
            if len(pending) == self.cfg.batch_size:
                yield item(collate_studies(pending, self.tokenizer, self.cfg))
                batches += 1
                pending = []
        if pending and not self.cfg.drop_last:
            yield item(collate_studies(pending, self.tokenizer, self.cfg))
        # The end marker carries the last errors and tells the main process this worker is done.
        yield item({"_end": True})


# --------------------------------------------------------------------------- loader


@dataclass
class LoaderStats:
    """Counters of one loader, kept across epochs and restored with the state."""

    samples_yielded: int = 0
    batches_yielded: int = 0
    samples_skipped: int = 0
    skipped: list[list[str]] = field(default_factory=list)  # [shard, key, reason], first 1000
    images_decoded: int = 0
    images_draft_reduced: int = 0
    data_wait_s: float = 0.0  # time the main process waited for batches

    def as_dict(self) -> dict:
        return asdict(self)


def _as_is(item: dict) -> dict:
    return item


class VLPLoader:
    """Iterable over batch dicts, one epoch per ``iter()``; resumable with ``state_dict``.

    Iterating to the end of an epoch advances :attr:`epoch` by one; stopping early keeps
    the position, so the next ``iter()`` continues the same epoch. :meth:`set_epoch` with a
    different epoch starts that epoch from its beginning (with the same epoch it is a
    no-op, so a trainer may call it after restoring a state).

    In non-resampled mode the ranks may yield different numbers of batches (shards differ
    in size); distributed training should use resampled mode, where every rank yields
    exactly :meth:`batches_per_epoch` batches.
    """

    def __init__(
        self,
        cfg: LoaderConfig,
        tokenizer: Callable,
        shards: list[Shard],
        *,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
    ):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.shards = shards
        self.rank, self.world_size, self.split = rank, world_size, split
        self.logical_workers = max(1, cfg.workers)
        self.epoch = 0
        self.progress = _Progress.fresh(self.logical_workers)
        self.stats = LoaderStats()
        slots = world_size * self.logical_workers
        if not cfg.resampled and len(shards) < slots:
            log.info(
                "%d shards for %d rank x worker slots: splitting by sample (each slot reads every shard)",
                len(shards),
                slots,
            )

    # ----- epoch accounting
    def batches_per_epoch(self) -> int | None:
        """Batches per rank per epoch in resampled mode; ``None`` (data-dependent) otherwise."""
        if not self.cfg.resampled:
            return None
        return math.ceil(self.cfg.samples_per_epoch / (self.cfg.batch_size * self.world_size))

    def worker_batch_quota(self) -> list[int] | None:
        total = self.batches_per_epoch()
        if total is None:
            return None
        base, extra = divmod(total, self.logical_workers)
        return [base + (w < extra) for w in range(self.logical_workers)]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.progress = _Progress.fresh(self.logical_workers)

    # ----- iteration
    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(
            _StudyStream(self, self.epoch, self.progress),
            batch_size=None,
            num_workers=self.cfg.workers,
            persistent_workers=False,
            prefetch_factor=self.cfg.prefetch_factor if self.cfg.workers > 0 else None,
            pin_memory=self.cfg.pin_memory,
            collate_fn=_as_is,  # the default converter would walk every meta dict
            # Workers seed everything from the config; a private generator keeps DataLoader
            # from drawing its base seed from the global RNG, which would shift the model's
            # dropout stream whenever an iterator is created (and break exact resume).
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        iterator = iter(loader)
        try:
            while True:
                started = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    break
                self.stats.data_wait_s += time.perf_counter() - started
                worker = item.pop("_worker")
                self.progress.raw[worker] = item.pop("_raw_end")
                self.progress.next_worker = (worker + 1) % self.logical_workers
                self._count(item)
                if item.pop("_end", False):
                    self.progress.done[worker] = True
                    continue
                self.progress.batches[worker] += 1
                self.stats.batches_yielded += 1
                self.stats.samples_yielded += len(item["keys"])
                yield item
        finally:
            # Stop the workers now, also when the consumer stopped early or a worker raised
            # (an exception's traceback would otherwise keep them alive until collected).
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del iterator
        self.epoch += 1
        self.progress = _Progress.fresh(self.logical_workers)

    def _count(self, item: dict) -> None:
        errors = item.pop("_errors")
        self.stats.samples_skipped += len(errors)
        for shard, key, reason in errors:
            log.warning("skipped sample %s in %s: %s", key, shard, reason)
            if len(self.stats.skipped) < MAX_SKIPPED_LISTED:
                self.stats.skipped.append([shard, key, reason])
        self.stats.images_decoded += item.pop("_images")
        self.stats.images_draft_reduced += item.pop("_reduced")

    # ----- state
    def _fingerprint(self) -> dict:
        digest = hashlib.sha1("\n".join(s.url for s in self.shards).encode()).hexdigest()
        c = self.cfg
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": self.logical_workers,
            "seed": c.seed,
            "batch_size": c.batch_size,
            "resampled": c.resampled,
            "samples_per_epoch": c.samples_per_epoch,
            "shuffle_buffer": c.shuffle_buffer,
            "shard_shuffle": c.shard_shuffle,
            "drop_last": c.drop_last,
            "shards_sha1": digest,
        }

    def state_dict(self) -> dict:
        """Plain-type state after the last batch handed out (save one per rank)."""
        return {
            "format": STATE_FORMAT,
            "fingerprint": self._fingerprint(),
            "epoch": self.epoch,
            "progress": asdict(self.progress),
            "stats": self.stats.as_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"loader state format {state.get('format')!r}, expected {STATE_FORMAT}"
            )
        saved, current = state["fingerprint"], self._fingerprint()
        changed = [
            f"{k}: saved {saved.get(k)!r}, now {v!r}"
            for k, v in current.items()
            if saved.get(k) != v
        ]
        if changed:
            raise ValueError(
                "cannot resume the loader exactly, its setup changed: " + "; ".join(changed)
            )
        self.epoch = int(state["epoch"])
        self.progress = _Progress(**state["progress"])
        self.stats = LoaderStats(**state["stats"])


def build_loader(
    cfg: LoaderConfig,
    tokenizer: Callable,
    *,
    rank: int = 0,
    world_size: int = 1,
    split: str = "train",
    state: dict | None = None,
) -> VLPLoader:
    """Build the loader of ``split`` for one rank; ``state`` (from ``state_dict``) resumes it."""
    cfg.validate()
    loader = VLPLoader(
        cfg,
        tokenizer,
        resolve_shards(cfg.shards, split),
        rank=rank,
        world_size=world_size,
        split=split,
    )
    if state is not None:
        loader.load_state_dict(state)
    return loader
