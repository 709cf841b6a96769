"""From study records to shards: order, plan, parallel sample building, error budget.

:func:`convert` takes an adapter's :class:`AdapterOutput` and writes
``OUT/{split}/shard-NNNNNN.tar`` plus ``OUT/{split}/manifest.json`` and a run summary
``OUT/conversion.json``.

* Order: records are sorted by key; within a split the order is shuffled with a
  ``Random(f"{seed}:{split}")`` so that shards mix subjects but stay reproducible.
* Plan: shard *i* of a split holds the studies at positions ``[i·S, (i+1)·S)`` of that
  order, minus the studies that fail while their images are decoded, so a shard has at
  most ``--shard-size`` samples and its content never depends on what happened to
  another shard. This is what makes resuming exact.
* Work: samples are built by ``--workers`` processes (``Pool.imap``, order preserved);
  the main process writes each shard as soon as its samples are in.
* Errors: bad inputs are skipped, logged and counted. The run fails once the number of
  erroneous studies/rows exceeds ``--max-error-rate`` × studies seen, naming them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

from tqdm import tqdm

from vlp.data.convert.records import (
    AdapterOutput,
    ConversionError,
    Skip,
    StudyRecord,
    assign_priors,
)
from vlp.data.convert.samples import (
    SampleResult,
    SampleTask,
    build_sample,
    describe,
    task_from_record,
)
from vlp.data.convert.writer import (
    finish_split,
    load_state,
    save_progress,
    shard_name,
    write_json_atomic,
    write_tar_atomic,
)
from vlp.data.schema import SCHEMA_VERSION, SPLITS

log = logging.getLogger("vlp.data.convert")

#: How many failed inputs an error message lists before summarising.
_LISTED_FAILURES = 20


@dataclass
class ConvertOptions:
    """Options shared by every adapter (the CLI's shared flags)."""

    image_size: int = 512
    quality: int = 95
    priors: int = 1
    shard_size: int = 1000
    workers: int = 1
    max_error_rate: float = 0.01
    seed: int = 0
    limit: int | None = None

    def validate(self) -> None:
        checks = {
            "image_size": self.image_size >= 8,
            "quality": 1 <= self.quality <= 100,
            "priors": self.priors >= 0,
            "shard_size": self.shard_size >= 1,
            "workers": self.workers >= 1,
            "max_error_rate": 0.0 <= self.max_error_rate <= 1.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConversionError(
                f"invalid option(s): {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}"
            )

    def output_affecting(self) -> dict:
        """The options that change the bytes written (``workers`` does not)."""
        values = asdict(self)
        values.pop("workers")
        values.pop("max_error_rate")
        return values


class _ErrorBudget:
    def __init__(self, studies_seen: int, max_rate: float):
        self.studies_seen = studies_seen
        self.max_rate = max_rate
        self.errors: list[Skip] = []

    @property
    def allowed(self) -> int:
        return math.floor(self.max_rate * self.studies_seen + 1e-9)

    def add(self, skips: list[Skip]) -> None:
        for skip in skips:
            if skip.is_error:
                self.errors.append(skip)

    def check(self) -> None:
        if len(self.errors) <= self.allowed:
            return
        listed = "\n  ".join(describe(s) for s in self.errors[:_LISTED_FAILURES])
        more = len(self.errors) - _LISTED_FAILURES
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise ConversionError(
            f"{len(self.errors)} bad inputs out of {self.studies_seen} studies exceed "
            f"--max-error-rate {self.max_rate:g} (at most {self.allowed} allowed). "
            f"Failed inputs:\n  {listed}{tail}"
        )


def _split_order(keys: list[str], seed: int, split: str) -> list[str]:
    ordered = sorted(keys)
    random.Random(f"{seed}:{split}").shuffle(ordered)
    return ordered


def _plan_hash(
    output: AdapterOutput, options: ConvertOptions, split: str, shards: list[list[str]]
) -> str:
    payload = {
        "schema_version": SCHEMA_VERSION,
        "adapter": output.adapter,
        "inputs": output.inputs,
        "options": options.output_affecting(),
        "split": split,
        "shards": shards,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _skip_from_json(entry: dict) -> Skip:
    return Skip(**entry)


def _counts(skips: list[Skip], level: str) -> dict[str, int]:
    levels = ("study", "row") if level == "study" else ("image",)
    return dict(sorted(Counter(s.reason for s in skips if s.level in levels).items()))


def _pool_map(tasks: Iterable[SampleTask], workers: int, count: int) -> Iterator[SampleResult]:
    if workers <= 1 or count <= 1:
        for task in tasks:
            yield build_sample(task)
        return
    chunksize = max(1, min(8, count // (workers * 4)))
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(build_sample, tasks, chunksize=chunksize)


def convert(
    output: AdapterOutput,
    out_dir: str,
    options: ConvertOptions,
    arguments: dict | None = None,
    progress: bool = True,
) -> dict:
    """Write the shards and manifests of ``output`` under ``out_dir``; return the summary."""
    options.validate()
    records = sorted(output.records, key=lambda r: r.key)
    duplicates = [a.key for a, b in zip(records, records[1:]) if a.key == b.key]
    if duplicates:
        raise ConversionError(
            f"duplicate study key(s) from the {output.adapter} adapter: {duplicates[:5]}"
        )
    assign_priors(records, options.priors)

    budget = _ErrorBudget(output.studies_seen, options.max_error_rate)
    for skip in output.skips:
        log.warning(describe(skip))
    budget.add(output.skips)
    budget.check()

    by_split: dict[str, list] = {split: [] for split in SPLITS}
    for record in records:
        by_split[record.split].append(record)

    # Plan every split; collect the work of shards that are not already on disk.
    plans = {}
    work: list[tuple[str, int, StudyRecord]] = []
    for split in SPLITS:
        split_records = {r.key: r for r in by_split[split]}
        order = _split_order(list(split_records), options.seed, split)
        shards = [
            order[i : i + options.shard_size] for i in range(0, len(order), options.shard_size)
        ]
        plan_hash = _plan_hash(output, options, split, shards)
        split_dir = os.path.join(out_dir, split)
        state = load_state(split_dir, plan_hash)
        plans[split] = (split_dir, shards, plan_hash, state)
        for index, keys in enumerate(shards):
            finished = state.done.get(shard_name(index))
            if finished is not None:  # written by an earlier run: count its skips only
                budget.add([_skip_from_json(entry) for entry in finished["skips"]])
                continue
            work.extend((split, index, split_records[key]) for key in keys)
    budget.check()

    # Build samples in parallel and write each shard when its last sample arrives.
    remaining = Counter((split, index) for split, index, _ in work)
    pending: dict[tuple[str, int], list[SampleResult]] = {}
    bar = tqdm(total=len(work), unit="study", desc="convert", disable=not progress, smoothing=0.1)
    try:
        # Tasks are made lazily: the pool's feeder is throttled by its pipe, so only a
        # window of tasks (with their report text) exists at a time.
        tasks = (task_from_record(r, options.image_size, options.quality) for _, _, r in work)
        results = _pool_map(tasks, options.workers, len(work))
        for (split, index, _), result in zip(work, results):
            bar.update(1)
            for skip in result.skips:
                log.warning(describe(skip))
            budget.add(result.skips)
            budget.check()
            pending.setdefault((split, index), []).append(result)
            remaining[(split, index)] -= 1
            if remaining[(split, index)] == 0:
                _write_shard(plans[split], index, pending.pop((split, index)))
    finally:
        bar.close()

    # Every shard is on disk: write the manifests and the run summary.
    all_skips = list(output.skips)
    summary_splits = {}
    for split in SPLITS:
        split_dir, shards, plan_hash, state = plans[split]
        final = load_state(split_dir, plan_hash)
        entries = [final.done[shard_name(i)] for i in range(len(shards))]
        decode_skips = [_skip_from_json(e) for entry in entries for e in entry["skips"]]
        all_skips.extend(decode_skips)
        split_skips = [s for s in output.skips if s.split == split] + decode_skips
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "split": split,
            "adapter": output.adapter,
            "plan_hash": plan_hash,
            "total_samples": sum(e["samples"] for e in entries),
            "shards": entries,
            "options": options.output_affecting(),
            "arguments": arguments or {},
            "inputs": output.inputs,
            "skipped_studies": _counts(split_skips, "study"),
            "skipped_images": _counts(split_skips, "image"),
        }
        if not final.complete:
            finish_split(split_dir, manifest)
        summary_splits[split] = {"samples": manifest["total_samples"], "shards": len(entries)}

    summary = {
        "schema_version": SCHEMA_VERSION,
        "adapter": output.adapter,
        "studies_seen": output.studies_seen,
        "splits": summary_splits,
        "errors": len(budget.errors),
        "error_rate": len(budget.errors) / max(1, output.studies_seen),
        "skipped_studies": _counts(all_skips, "study"),
        "skipped_images": _counts(all_skips, "image"),
        "skips_without_split": [s.to_json() for s in output.skips if not s.split],
    }
    write_json_atomic(os.path.join(out_dir, "conversion.json"), summary)
    return summary


def _write_shard(plan, index: int, results: list[SampleResult]) -> None:
    split_dir, _, plan_hash, state = plan
    name = shard_name(index)
    samples = [(r.key, r.members) for r in results if r.members is not None]
    info = write_tar_atomic(os.path.join(split_dir, name), samples)
    state.done[name] = {
        "name": name,
        "samples": len(samples),
        "bytes": info["bytes"],
        "sha256": info["sha256"],
        "skips": [s.to_json() for r in results for s in r.skips],
    }
    save_progress(split_dir, plan_hash, state.done)
