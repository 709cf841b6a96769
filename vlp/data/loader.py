"""Streaming study loader: the order of the samples, their split over ranks and workers,
and exact mid-epoch resumption.

One job: drive the per-worker pipeline that turns the shards described by
:mod:`vlp.data.schema` into the batch dictionary of ``docs/architecture.md`` ("Batch"),
for any number of ranks and workers, and be able to continue from a saved state exactly
where an uninterrupted run would have been. The steps themselves live in their modules.

Pipeline of one DataLoader worker (all of it runs in the worker; the main process only
bookkeeps):

1. **Shards.** :func:`vlp.data.shards.resolve_shards` expands ``cfg.shards`` (a manifest,
   a folder with or without one, or a brace pattern) into the shard list.
2. **Split.** Non-resampled: the shard list is shuffled with a seed of ``(seed, epoch)`` that
   is the same on every rank, *then* dealt to ranks (``[rank::world]``), then to workers.
   Every sample is therefore read exactly once per epoch over all ranks × workers. When
   there are fewer shards than ranks × workers, each (rank, worker) slot reads every shard
   and keeps every ``slots``-th sample instead (still exactly once, at the cost of reading
   the shards several times; small validation splits need this). Resampled: each
   (rank, worker) draws shards with replacement (weighted by manifest sample counts) from
   a generator seeded by ``(seed, epoch, rank, worker)``; an epoch is ``samples_per_epoch``
   samples over all ranks, the same number of batches on every rank.
3. **Read.** :func:`vlp.data.shards.iter_tar_samples`: only the members the recipe needs,
   never a suffix outside :data:`schema.ALLOWED_SUFFIXES`.
4. **Shuffle.** A sample buffer seeded by ``(seed, epoch, rank, worker)``.
5. **Decode.** :class:`vlp.data.decode.StudyDecoder` (our schema or a generic image-text
   sample, ``cfg.shard_format``); a sample that fails is skipped and reported (key, shard,
   reason); a generic sample under a recipe that reads what it lacks stops the loader.
6. **Batch.** :func:`vlp.data.collate.collate_studies` tokenises and collates.

Resumption. A worker's raw sample stream is a deterministic function of the seeds, the
epoch, the rank and the worker, so a worker's progress is one number: how many raw
samples (decoded or skipped) it has consumed. Each worker item carries that number; the
main process records it for the item it hands out, plus which worker comes next in the
DataLoader's round-robin. On restore, each worker fast-forwards its raw stream (reading
tar members, not decoding them), and the workers are rotated so the round-robin continues
with the right one. The state is a small dict of plain types.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.data.collate import collate_studies
from vlp.data.decode import LayoutMismatch, SampleError, StudyDecoder
from vlp.data.packing import pack, unpack
from vlp.data.schema import BATCH_VIEWS, SHARD_FORMATS
from vlp.data.shards import DamagedShard, Shard, ShardError, iter_tar_samples, resolve_shards
from vlp.data.transforms import AugmentConfig

if TYPE_CHECKING:
    from vlp.data.decode import _Decoded

log = logging.getLogger(__name__)

STATE_FORMAT = 1
#: Key of the marker sample that reports a damaged shard, and its reason category.
DAMAGE = "__damaged__"
DAMAGED = "damaged_shard"
#: How many skipped samples are kept by name in :class:`LoaderStats` (the count is exact).
MAX_SKIPPED_LISTED = 1000
_SENTENCE_SAMPLING = ("first", "random")
#: values of ``data.decode_device``.
DECODE_DEVICES = ("cpu", "cuda")
#: the warning of a ``data.decode_device: cuda`` loader built where CUDA is not available.
NO_CUDA_DECODE = (
    "data.decode_device=cuda: no CUDA device here; decoding JPEGs on the CPU in the loader workers"
)


@dataclass
class LoaderConfig:
    """Recipe parameters of the loader (``data.loader`` in a recipe)."""

    shards: str = ""
    #: the samples' layout: ``auto`` (per sample: ours when it has a vlp member or json
    #: record, else a generic image-text sample), ``vlp`` or ``generic`` (every sample read
    #: as that layout; one of the other is skipped and counted); see vlp.data.decode.
    shard_format: str = "auto"
    batch_size: int = 32  # per rank
    workers: int = 2
    image_size: int = 224  # model input side; views are cropped and resized to it
    views: list[str] = field(default_factory=lambda: ["frontal"])
    #: K: the batch's time axis is T = K + 1 (the current study, then prior1..priorK).
    priors: int = 0
    #: views decoded at the prior time steps (a subset of ``views``); null = ``views``.
    prior_views: list[str] | None = None
    #: decode the priors' text (their sentences; the report of a prior is its sentences
    #: joined) when reports or sentences are decoded.
    prior_text: bool = True
    sentences: bool = True  # tokenise the json ``sentences`` individually
    #: tokenise the report; the trainer turns it off when no objective reads reports
    #: (:func:`vlp.data.requirements.narrowed`).
    reports: bool = True
    max_sentences: int = 16  # per sample
    sentence_sampling: str = "first"  # which sentences beyond the cap: "first" or "random"
    max_text_length: int = 256
    max_sentence_length: int = 64
    shuffle_buffer: int = 500  # samples per worker; 0 or 1 = no sample shuffle
    shard_shuffle: bool = True
    resampled: bool = False
    samples_per_epoch: int = 0  # resampled mode only: samples per (virtual) epoch, all ranks
    seed: int = 0
    #: keep the label fields (CheXpert labels, edema severity) of this fraction of the
    #: studies and hide the others' (NaN, -1), chosen by a hash of the study id and
    #: ``seed``, so the same studies stay labelled on every rank, epoch and resume: the
    #: semi-supervised settings (e.g. 5 % labels). ``meta`` keeps the record as written.
    label_fraction: float = 1.0
    #: label fields (``labels``, ``edema_severity``) the recipe's components read; the
    #: trainer fills it (vlp.data.requirements.narrowed). A generic sample has no labels,
    #: so with any listed the loader stops at the first one instead of training on NaN.
    label_fields: list[str] = field(default_factory=list)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # >1 lets JPEG draft decoding undershoot the needed size by this factor (faster, a little
    # softer); 1.0 never upsamples a draft-decoded image
    draft_max_upscale: float = 1.0
    drop_last: bool = False  # drop each worker's last partial batch (non-resampled mode)
    #: the trainer stops (listing the worst shards) when more than this fraction of the
    #: samples seen on all ranks were skipped (corrupt, damaged shards), once it has seen
    #: ``skip_check_after`` samples; 1.0 never stops.
    max_skipped_fraction: float = 0.1
    skip_check_after: int = 500
    prefetch_factor: int = 2
    pin_memory: bool = False
    #: workers hand each batch over as one shared-memory buffer instead of one per tensor
    #: (:mod:`vlp.data.packing`); off only to measure what it saves.
    pack_batches: bool = True
    #: where JPEG views are decoded: ``cpu`` in the loader workers (PIL draft mode), or
    #: ``cuda`` on the training GPU (nvJPEG, batched; :mod:`vlp.data.device_decode`): the
    #: workers then only read headers and draw the crop and affine, and ``batch_to``
    #: decodes. Without a CUDA device ``cuda`` falls back to ``cpu`` with one warning.
    decode_device: str = "cpu"

    def validate(self) -> None:
        problems = []
        if not self.shards:
            problems.append(
                "shards is empty (expected a manifest.json, a folder or a brace pattern)"
            )
        if self.shard_format not in SHARD_FORMATS:
            problems.append(
                f"shard_format must be one of {list(SHARD_FORMATS)}, got {self.shard_format!r}"
            )
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if self.image_size < 8:
            problems.append(f"image_size must be >= 8, got {self.image_size}")
        unknown = [v for v in self.views if v not in BATCH_VIEWS]
        if unknown or "frontal" not in self.views:
            problems.append(
                f"views must be a subset of {list(BATCH_VIEWS)} containing 'frontal', got {self.views}"
            )
        if self.priors < 0:
            problems.append(f"priors must be >= 0, got {self.priors}")
        if not 0.0 <= self.label_fraction <= 1.0:
            problems.append(f"label_fraction must be in [0, 1], got {self.label_fraction}")
        if self.prior_views is not None and not set(self.prior_views) <= set(self.views):
            problems.append(
                f"prior_views must be a subset of views {self.views}, got {self.prior_views}"
            )
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            problems.append(
                f"max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}"
            )
        if self.draft_max_upscale < 1.0:
            problems.append(f"draft_max_upscale must be >= 1, got {self.draft_max_upscale}")
        if self.max_sentences < 1 or self.max_text_length < 2 or self.max_sentence_length < 2:
            problems.append("max_sentences must be >= 1 and max_*_length >= 2")
        if self.decode_device not in DECODE_DEVICES:
            problems.append(
                f"decode_device must be one of {list(DECODE_DEVICES)}, got {self.decode_device!r}"
            )
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


# --------------------------------------------------------------------------- worker stream


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

    def _shard_samples(self, shard: Shard) -> Iterator[dict]:
        """The raw samples of one shard; if it is damaged, those read before the damage and
        then one marker sample that says what was lost (counted by the main process)."""
        read = 0
        try:
            for sample in iter_tar_samples(shard.url, self.decoder.members):
                read += 1
                yield sample
        except DamagedShard as exc:
            lost = None if shard.samples is None else max(0, shard.samples - read)
            yield {"__key__": "", "__url__": shard.url, DAMAGE: (str(exc), read, lost)}

    def _resampled_source(self, worker: int) -> Iterator[dict]:
        rng = _seeded("resample", self.cfg.seed, self.epoch, self.rank, worker)
        counts = [s.samples for s in self.shards]
        weights = counts if all(c is not None for c in counts) and sum(counts) > 0 else None
        draws_without_samples = 0
        while True:
            shard = rng.choices(self.shards, weights=weights)[0]
            produced = False
            for sample in self._shard_samples(shard):
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
            return itertools.chain.from_iterable(self._shard_samples(s) for s in mine)
        slot = self.rank * self.workers + worker
        every = itertools.chain.from_iterable(self._shard_samples(s) for s in order)
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
        errors: list[tuple] = []
        images = reduced = 0

        pack_here = info is not None and self.cfg.pack_batches  # only across processes

        def item(batch: dict) -> dict:
            nonlocal errors, images, reduced
            batch.update(
                _worker=worker, _raw_end=position, _errors=errors, _images=images, _reduced=reduced
            )
            errors, images, reduced = [], 0, 0
            return pack(batch) if pack_here else batch

        while quota is None or batches < quota:
            raw = next(stream, None)
            if raw is None:
                break
            position += 1
            if DAMAGE in raw:
                reason, read, lost = raw[DAMAGE]
                errors.append((raw["__url__"], "", reason, DAMAGED, lost, read))
                continue
            rng = _seeded("augment", self.cfg.seed, self.epoch, self.rank, worker, position)
            try:
                study = self.decoder(raw, rng)
            except SampleError as exc:
                errors.append((raw["__url__"], raw["__key__"], str(exc), exc.reason, 1, None))
                continue
            except LayoutMismatch as exc:
                # Raised in the main process: an exception raised here would reach it
                # wrapped in DataLoader's worker traceback instead of as one line.
                yield item({"_fatal": f"{raw['__key__']} in {raw['__url__']}: {exc}"})
                return
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


class TooManySkipped(RuntimeError):
    """More of the data was skipped than ``data.max_skipped_fraction`` allows."""


@dataclass
class LoaderStats:
    """Counters of one loader, kept across epochs and restored with the state."""

    samples_yielded: int = 0
    batches_yielded: int = 0
    #: samples skipped, including those lost in damaged shards (when the manifest says how
    #: many the shard held; otherwise a damaged shard counts the shard, not its samples).
    samples_skipped: int = 0
    skipped: list[list[str]] = field(default_factory=list)  # [shard, key, reason], first 1000
    #: skipped samples by reason (``vlp.data.decode.SKIP_REASONS``) and by shard url.
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_by_shard: dict[str, int] = field(default_factory=dict)
    #: shards that could not be read to their end: [shard, reason, samples read].
    damaged_shards: list[list] = field(default_factory=list)
    images_decoded: int = 0
    images_draft_reduced: int = 0
    data_wait_s: float = 0.0  # time the main process waited for batches

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def samples_seen(self) -> int:
        """Samples yielded plus skipped: the denominator of the skipped fraction."""
        return self.samples_yielded + self.samples_skipped

    def worst_shards(self, n: int = 10) -> list[tuple[str, int]]:
        """The ``n`` shards with the most skipped samples, most first."""
        return sorted(self.skipped_by_shard.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    @classmethod
    def merged(cls, all_stats: list[LoaderStats]) -> LoaderStats:
        """The counters of several loaders (the ranks of a run) added into one."""
        total = cls()
        for stats in all_stats:
            for name, value in asdict(stats).items():
                mine = getattr(total, name)
                if isinstance(value, dict):
                    for key, count in value.items():
                        mine[key] = mine.get(key, 0) + count
                elif isinstance(value, list):
                    mine.extend(value)
                else:
                    setattr(total, name, mine + value)
        del total.skipped[MAX_SKIPPED_LISTED:]
        return total


def _decode_fallback(cfg: LoaderConfig) -> LoaderConfig:
    """``cfg`` with ``decode_device`` ``cpu`` (and one warning) when it asks for ``cuda``
    on a machine without CUDA, so that a GPU recipe still runs (CI, laptops)."""
    if cfg.decode_device == "cuda" and not torch.cuda.is_available():
        log.warning(NO_CUDA_DECODE)
        return dataclasses.replace(cfg, decode_device="cpu")
    return cfg


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
        self.cfg = _decode_fallback(cfg)
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
                item = unpack(item)
                self.stats.data_wait_s += time.perf_counter() - started
                worker = item.pop("_worker")
                self.progress.raw[worker] = item.pop("_raw_end")
                self.progress.next_worker = (worker + 1) % self.logical_workers
                self._count(item)
                if "_fatal" in item:
                    from vlp.config.loader import ConfigError  # vlp.config imports this module

                    raise ConfigError(None, "data.shards", item["_fatal"])
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
        stats = self.stats
        # (shard, key, reason, reason category, samples skipped, samples read before damage)
        for shard, key, reason, kind, count, read in errors:
            if kind == DAMAGED:
                stats.damaged_shards.append([shard, reason, read])
                log.warning(
                    "damaged shard %s: %s; kept its first %d samples, skipped %s",
                    shard,
                    reason.removeprefix(f"{shard}: "),
                    read,
                    "the rest" if count is None else f"{count} more (per its manifest)",
                )
                count = count or 0
            else:
                log.warning("skipped sample %s in %s: %s", key, shard, reason)
            stats.samples_skipped += count
            stats.skipped_by_reason[kind] = stats.skipped_by_reason.get(kind, 0) + count
            stats.skipped_by_shard[shard] = stats.skipped_by_shard.get(shard, 0) + count
            if len(stats.skipped) < MAX_SKIPPED_LISTED:
                stats.skipped.append([shard, key, reason])
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

    def restart_resharded(self, states: list[dict]) -> None:
        """Continue from the loader states of every rank of a run with another world size.

        A rank's position is a function of its rank and the world size, so no saved
        position continues here: the loader restarts the earliest saved epoch from its
        beginning (samples of that epoch seen before the checkpoint are seen again; none
        is lost), and the saved ranks' counters, added together, continue on rank 0, so
        the run's totals (samples seen, skipped) stay whole."""
        for state in states:
            if state.get("format") != STATE_FORMAT:
                raise ValueError(
                    f"loader state format {state.get('format')!r}, expected {STATE_FORMAT}"
                )
        self.set_epoch(min(int(state["epoch"]) for state in states))
        self.progress = _Progress.fresh(self.logical_workers)
        saved = [LoaderStats(**state["stats"]) for state in states]
        self.stats = LoaderStats.merged(saved) if self.rank == 0 else LoaderStats()


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
