"""Generic WebDataset image–text shards (img2dataset / open_clip layout: ``KEY.jpg|png|webp``
+ ``KEY.txt`` [+ ``KEY.json``]) read by the loader as single-frontal studies.

The shards are written here with webdataset's ``TarWriter``; the expected batch comes from
what was written, decoded by PIL with the centre crop and resize written out below, never
from the loader's own output.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tests import test_loader
from tests.helpers.training import SMALL, run_training
from vlp.config import load_recipe
from vlp.config.components import requirements_of
from vlp.config.loader import ConfigError
from vlp.data.loader import LoaderConfig, build_loader
from vlp.data.requirements import narrowed
from vlp.data.shards import resolve_shards

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # model input side of the loader tests
tokenizer = test_loader.tokenizer  # the fixture: the bundled MiniLM tokenizer


# ----------------------------------------------------------------------------- writing


def picture(index: int, height: int, width: int) -> np.ndarray:
    """A smooth RGB picture, different for every sample."""
    rows = np.linspace(0, 1, height)[:, None] * np.ones((1, width))
    cols = np.linspace(0, 1, width)[None, :] * np.ones((height, 1))
    red = 40 + 150 * rows * cols + 10 * index
    green = 200 * (1 - rows) * cols + 20 * np.sin(8 * cols + index)
    blue = 128 + 100 * np.cos(5 * rows + index)
    return np.clip(np.stack([red, green, blue], -1), 0, 255).astype(np.uint8)


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def img2dataset_json(key: str, caption: str, pixels: np.ndarray) -> dict:
    height, width = pixels.shape[:2]
    return {
        "url": f"https://example.org/{key}.jpg",
        "key": key,
        "status": "success",
        "caption": caption,
        "width": width,
        "height": height,
        "original_width": 2 * width,
        "original_height": 2 * height,
        "exif": "{}",
        "sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
    }


def write_generic(path: Path, samples: list[dict]) -> None:
    """One img2dataset-style shard: each sample ``{"__key__", suffix: bytes | str}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def sample(key: str, image: tuple[str, bytes] | None, text: str | None, meta: dict | None):
    out: dict = {"__key__": key}
    if image is not None:
        out[image[0]] = image[1]
    if text is not None:
        out["txt"] = text
    if meta is not None:
        out["json"] = json.dumps(meta).encode()
    return out


# ----------------------------------------------------------------------------- expectations


def centre_square_resized(gray: Image.Image) -> np.ndarray:
    """Resize the short side to SIZE and crop the centre: one PIL call on the largest
    centred square (bilinear), what an unaugmented loader does."""
    width, height = gray.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    return np.array(gray.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box))


def expected_pixels(data: bytes) -> np.ndarray:
    """Full-resolution PIL decode, ITU-R 601 luma, then the crop and resize."""
    return centre_square_resized(Image.open(io.BytesIO(data)).convert("L"))


def key_hash(key: str) -> int:
    """The documented study id of a generic sample: 15 hex digits of SHA-256 of the key."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


def token_rows(ids, mask) -> list[list[int]]:
    return [[t for t, m in zip(row, keep) if m] for row, keep in zip(ids.tolist(), mask.tolist())]


def read_all(cfg: LoaderConfig, tokenizer) -> tuple[dict, object]:
    """{key: that sample's fields} over one epoch, and the loader (for its stats)."""
    loader = build_loader(cfg, tokenizer)
    seen = {}
    for batch in loader:
        reports = token_rows(batch["report_input_ids"], batch["report_attention_mask"])
        sentences = token_rows(batch["sentence_input_ids"], batch["sentence_attention_mask"])
        for b, key in enumerate(batch["keys"]):
            seen[key] = {
                "frontal": batch["images"]["frontal"][b, 0, 0].numpy(),
                "view_mask": bool(batch["view_mask"]["frontal"][b, 0]),
                "study_id": int(batch["study_id"][b, 0]),
                "labels": batch["labels"][b, 0].tolist(),
                "edema": int(batch["edema_severity"][b, 0]),
                "report": reports[b],
                "sentences": [
                    sentences[i]
                    for i, row in enumerate(batch["sentence_index"].tolist())
                    if row == b
                ],
                "meta": batch["meta"][b],
                "views": sorted(batch["images"]),
            }
    return seen, loader


def config(shards: str, **overrides) -> LoaderConfig:
    values = dict(
        shards=shards,
        batch_size=3,
        workers=0,
        image_size=SIZE,
        shuffle_buffer=0,
        shard_shuffle=False,
        max_text_length=48,
        max_sentence_length=24,
    )
    values.update(overrides)
    return LoaderConfig(**values)


# ----------------------------------------------------------------------------- decoding


@pytest.fixture()
def generic_dataset(tmp_path):
    """Two shards: JPEG (large, so draft-decoded), PNG (gray, RGB, 16-bit) and WebP samples
    with and without img2dataset's json, one without txt, one with a corrupt image, one
    without an image. Returns the brace pattern, {key: what was written}, {key: expected
    pixels} and {key: (skip reason, shard)}."""
    big = picture(0, 200, 260)
    gray = picture(1, 40, 40)[..., 0]
    rgb = picture(2, 64, 48)
    webp = picture(3, 45, 70)
    deep = (np.linspace(1000, 13000, 50 * 30).reshape(50, 30) ** 1.1).astype(np.uint16)
    texts = {
        "000000000": "No pleural effusion. Heart size is normal.",
        "000000001": "Mild cardiomegaly.\n",
        "000000002": "Clear lungs.\n1. No pneumothorax.\n2. Stable 1.5 cm nodule.",
        "000010000": "Right lower lobe opacity, likely atelectasis.",
        "000010001": "A radiograph whose image does not decode.",
        "000010002": "A caption without its image.",
        "000010003": "Small left effusion.",
    }
    images = {
        "000000000": ("jpg", encoded(big, "JPEG")),
        "000000001": ("png", encoded(gray, "PNG")),
        "000000002": ("png", encoded(rgb, "PNG")),
        "000000003": ("jpg", encoded(picture(4, 40, 40), "JPEG")),
        "000010000": ("png", encoded(deep, "PNG")),
        "000010001": ("jpg", encoded(big, "JPEG")[:300]),
        "000010003": ("webp", encoded(webp, "WEBP")),
    }
    metas = {
        key: img2dataset_json(key, texts.get(key, ""), big)
        for key in ("000000000", "000000003", "000010002", "000010003")
    }
    keys = sorted({*texts, *images})
    written = {
        key: {"image": images.get(key), "text": texts.get(key), "json": metas.get(key)}
        for key in keys
    }
    for shard, prefix in (("00000", "00000"), ("00001", "00001")):
        write_generic(
            tmp_path / f"{shard}.tar",
            [
                sample(key, images.get(key), texts.get(key), metas.get(key))
                for key in keys
                if key.startswith(prefix)
            ],
        )
    # What the test expects of each pixel: the 16-bit PNG by its own range (its uint16
    # array, not a decode), the rest by PIL.
    low, high = float(deep.min()), float(deep.max())
    deep_gray = np.rint((deep - low) * 255.0 / (high - low)).astype(np.uint8)
    expected = {key: expected_pixels(images[key][1]) for key in ("000000001", "000000002")}
    expected["000000000"] = expected_pixels(images["000000000"][1])
    expected["000010000"] = centre_square_resized(Image.fromarray(deep_gray))
    expected["000010003"] = expected_pixels(images["000010003"][1])
    skipped = {
        "000000003": ("text", tmp_path / "00000.tar"),
        "000010001": ("image", tmp_path / "00001.tar"),
        "000010002": ("image", tmp_path / "00001.tar"),
    }
    return str(tmp_path / "{00000..00001}.tar"), written, expected, skipped


def test_generic_samples_are_single_frontal_studies_decoded_like_pil(generic_dataset, tokenizer):
    pattern, written, expected, skipped = generic_dataset
    seen, loader = read_all(config(pattern, sentences=True), tokenizer)
    assert sorted(seen) == sorted(set(written) - set(skipped))
    for key, got in seen.items():
        text = written[key]["text"]
        assert got["views"] == ["frontal"] and got["view_mask"]
        if key == "000000000":
            # RGB JPEG decoded in draft mode (1/4 scale, grayscale from libjpeg's luma):
            # close to the full-resolution reference, not equal.
            assert np.abs(got["frontal"].astype(float) - expected[key]).mean() < 2.0
        else:  # PNG and WebP: exactly PIL's luma (the 16-bit PNG: its range scaled)
            assert np.array_equal(got["frontal"], expected[key]), key
        assert got["study_id"] == key_hash(key)
        assert all(math.isnan(v) for v in got["labels"]) and len(got["labels"]) == 14
        assert got["edema"] == -1
        report = text.strip()
        assert got["report"] == tokenizer(report, truncation=True, max_length=48)["input_ids"]
        meta = got["meta"]
        assert meta["shard_format"] == "generic" and meta["report"] == report
        assert meta["image_member"] == written[key]["image"][0]
        assert meta["metadata"] == written[key]["json"]
        assert meta["study_id"] == str(key_hash(key))
    # Sentences are vlp's splitter's: list numbers dropped, decimals kept.
    assert seen["000000000"]["meta"]["sentences"] == [
        "No pleural effusion.",
        "Heart size is normal.",
    ]
    assert seen["000000002"]["meta"]["sentences"] == [
        "Clear lungs.",
        "No pneumothorax.",
        "Stable 1.5 cm nodule.",
    ]
    for key, got in seen.items():
        want = [
            tokenizer(s, truncation=True, max_length=24)["input_ids"]
            for s in got["meta"]["sentences"]
        ]
        assert got["sentences"] == want, key
    stats = loader.stats
    assert stats.skipped_by_reason == {"text": 1, "image": 2}
    assert sorted((key, shard) for shard, key, _ in stats.skipped) == sorted(
        (key, str(shard)) for key, (_, shard) in skipped.items()
    )
    reasons = {key: reason for _, key, reason in stats.skipped}
    assert "missing txt member" in reasons["000000003"]
    assert "jpg: cannot decode" in reasons["000010001"]
    assert "missing image member" in reasons["000010002"]
    assert stats.images_decoded == 5 and stats.images_draft_reduced == 1


def test_one_pattern_mixes_both_layouts_and_an_explicit_format_reads_only_its_own(
    tmp_path, tokenizer
):
    ours = test_loader.write_shards(tmp_path / "ours", 4, [4])
    generic = {
        f"g{i}": sample(
            f"g{i}",
            ("jpg", encoded(picture(i, 40, 48), "JPEG")),
            f"Caption {i}.",
            img2dataset_json(f"g{i}", f"Caption {i}.", picture(i, 40, 48)) if i == 0 else None,
        )
        for i in range(3)
    }
    write_generic(tmp_path / "generic" / "00000.tar", list(generic.values()))
    pattern = f"{tmp_path}/ours/shard-000000.tar::{tmp_path}/generic/00000.tar"

    seen, loader = read_all(config(pattern), tokenizer)
    assert sorted(seen) == sorted([*ours, *generic]) and loader.stats.samples_skipped == 0
    for key, record in ours.items():  # ours keep their record's id and labels
        assert seen[key]["study_id"] == int(record["study_id"])
        assert seen[key]["meta"] == record
        edema = record["labels"]["chexpert"]["Edema"]
        got = seen[key]["labels"][3]
        assert (math.isnan(got) and edema is None) or got == edema

    seen, loader = read_all(config(pattern, shard_format="vlp"), tokenizer)
    assert sorted(seen) == sorted(ours)
    # g0 carries img2dataset's json but no frontal.jpg; g1, g2 have no json at all.
    assert loader.stats.skipped_by_reason == {"image": 1, "record": 2}

    seen, loader = read_all(config(pattern, shard_format="generic"), tokenizer)
    assert sorted(seen) == sorted(generic)
    assert loader.stats.skipped_by_reason == {"image": 4}  # ours: no KEY.jpg member


def test_a_folder_of_generic_shards_needs_no_manifest(tmp_path, tokenizer):
    for shard in ("00001", "00000"):
        write_generic(
            tmp_path / f"{shard}.tar",
            [sample(f"{shard}-{i}", ("png", encoded(picture(i, 30, 30), "PNG")), "x.", None)
             for i in range(2)],
        )  # fmt: skip
    (tmp_path / "00000_stats.json").write_text("{}")  # img2dataset's side files are ignored
    shards = resolve_shards(str(tmp_path))
    assert [s.url for s in shards] == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert all(s.samples is None for s in shards)
    seen, _ = read_all(config(str(tmp_path)), tokenizer)
    assert sorted(seen) == ["00000-0", "00000-1", "00001-0", "00001-1"]


# ----------------------------------------------------------------------------- recipes


def test_a_recipe_needing_a_lateral_or_labels_fails_at_load_with_generic_format():
    with pytest.raises(ConfigError) as err:
        load_recipe(ROOT / "recipes" / "move.yaml", ["data.shard_format=generic"])
    message = str(err.value)
    assert "data.shard_format: " in message and "['lateral']" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"data\.shard_format: .*label field\(s\) \['edema"):
        load_recipe(ROOT / "recipes" / "edema_supervised.yaml", ["data.shard_format=generic"])
    with pytest.raises(ConfigError, match=r"data\.shard_format: .*1 prior study"):
        load_recipe(ROOT / "recipes" / "biovil_t.yaml", ["data.shard_format=generic"])
    load_recipe(ROOT / "recipes" / "clip.yaml", ["data.shard_format=generic"])  # frontal + text
    with pytest.raises(ConfigError, match="shard_format must be one of"):
        load_recipe(ROOT / "recipes" / "clip.yaml", ["data.shard_format=img2dataset"])


@pytest.mark.parametrize("workers", [0, 1])
def test_auto_detected_generic_shards_stop_a_label_or_lateral_recipe_at_the_first_batch(
    tmp_path, tokenizer, workers
):
    write_generic(
        tmp_path / "00000.tar",
        [sample("k0", ("jpg", encoded(picture(0, 40, 40), "JPEG")), "Caption.", None)],
    )
    shard = str(tmp_path / "00000.tar")
    # The trainer's path: the recipe's requirements narrow the data section.
    cfg = load_recipe(ROOT / "recipes" / "edema_supervised.yaml", [f"data.shards={shard}"])
    loader_cfg = narrowed(cfg.data, requirements_of(cfg))
    loader_cfg.workers, loader_cfg.image_size = workers, SIZE
    with pytest.raises(ConfigError) as err:
        list(build_loader(loader_cfg, tokenizer))
    message = str(err.value)
    assert message.startswith(f"data.shards: k0 in {shard}: a generic image-text sample")
    assert "label field(s) ['edema_severity']" in message and "\n" not in message
    lateral = config(shard, workers=workers, views=["frontal", "lateral"])
    with pytest.raises(ConfigError, match=r"the recipe reads the view\(s\) \['lateral'\]"):
        list(build_loader(lateral, tokenizer))


def test_clip_recipe_trains_on_generic_shards_under_deepspeed(tmp_path, phantom_cache):
    for shard in range(2):
        write_generic(
            tmp_path / "data" / f"{shard:05d}.tar",
            [
                sample(
                    f"{shard:05d}{i:04d}",
                    ("jpg" if i % 2 else "png", encoded(picture(i + 4 * shard, 72, 80), "PNG"
                     if i % 2 == 0 else "JPEG")),
                    f"Finding {i} of shard {shard}. No effusion.",
                    None,
                )
                for i in range(6)
            ],
        )  # fmt: skip
    # The README's command, on these shards: its recipe and its shard pattern, relocated.
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- generic-shards-example:.*?-->\n```bash\n(.*?)\n```", readme, re.S)
    command = re.fullmatch(
        r"vlp pretrain (\S+) --set 'data\.shards=/data/laion-cxr/(\S+)'", block[1]
    )
    recipe, pattern = command[1], command[2].replace("00009", "00001")
    history = run_training(
        tmp_path,
        "generic",
        recipe=str(ROOT / recipe),
        overrides=[*SMALL, f"data.shards={tmp_path}/data/{pattern}", "train.steps=3"],
        cache=phantom_cache,
    )[0]
    assert history["steps"] == [1, 2, 3]
    assert all(math.isfinite(loss) for loss in history["losses"])
    assert len(set(history["losses"])) == 3, "training did not move"
