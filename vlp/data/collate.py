"""Decoded studies → the batch dict of ``docs/architecture.md`` ("Batch").

One job: stack a list of decoded studies into tensors, fill absent views with zeros and
masks, and tokenise reports and sentences (per batch, in the worker, so the main process
stays free).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlp.data.decode import EncodedImage
from vlp.data.schema import BATCH_VIEWS, CHEXPERT_LABELS

if TYPE_CHECKING:
    from vlp.data.decode import _Decoded, _Step
    from vlp.data.loader import LoaderConfig


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
    studies: list[_Decoded], tokenizer: Callable | None, cfg: LoaderConfig
) -> dict[str, Any]:
    """Decoded studies → the batch dict of docs/architecture.md ("Batch").

    Every per-study field has a time axis: B×T with T = 1 + ``cfg.priors`` (t = 0 the
    current study, t = k its k-th prior), absent studies and views zero-filled and masked.
    Text rows are flat over ``b·T + t``. Without a tokenizer (a model with no text encoder)
    the batch has no token ids; the report text stays in ``meta``."""
    size = cfg.image_size
    zeros = torch.from_numpy(np.zeros((1, size, size), dtype=np.uint8))  # no OpenMP, see _stack
    steps = [s.steps for s in studies]
    views = [v for v in BATCH_VIEWS if v in cfg.views]
    batch: dict[str, Any] = {
        "keys": [s.key for s in studies],
        "study_id": torch.tensor([[t.study_id for t in row] for row in steps], dtype=torch.int64),
        "study_mask": torch.tensor([[t.present for t in row] for row in steps], dtype=torch.bool),
        "gap_days": torch.tensor([[t.gap_days for t in row] for row in steps], dtype=torch.float32),
        "view_mask": {
            view: torch.tensor([[view in t.images for t in row] for row in steps], dtype=torch.bool)
            for view in views
        },
        "text_mask": torch.tensor([[t.text for t in row] for row in steps], dtype=torch.bool),
    }
    if cfg.decode_device == "cuda":
        # Decoded on the training device by batch_to (vlp.data.device_decode).
        batch["encoded_images"] = {
            view: _encoded([t.images.get(view) for row in steps for t in row], len(steps), cfg)
            for view in views
        }
    else:
        batch["images"] = {
            view: _stack([[t.images.get(view, zeros) for t in row] for row in steps])
            for view in views
        }
    if tokenizer is not None:
        _add_text(batch, [t for row in steps for t in row], tokenizer, cfg)
    unknown = [math.nan] * len(CHEXPERT_LABELS)
    kept = [labels_kept(row[0].study_id, cfg.label_fraction, cfg.seed) for row in steps]
    batch["labels"] = torch.tensor(
        [[s.labels if k else unknown] + [unknown] * cfg.priors for s, k in zip(studies, kept)],
        dtype=torch.float32,
    )
    batch["edema_severity"] = torch.tensor(
        [[s.edema_severity if k else -1] + [-1] * cfg.priors for s, k in zip(studies, kept)],
        dtype=torch.int64,
    )
    batch["meta"] = [s.meta for s in studies]
    return batch


def _encoded(images: list, batch_size: int, cfg: LoaderConfig) -> dict[str, Any]:
    """One view's images over the flat rows ``b·T + t`` → the ``encoded_images`` entry of
    docs/architecture.md: the JPEG files packed in one buffer (one tensor crosses from
    the worker process instead of one per image) with each row's crop box and affine
    draw; images the worker had to decode itself (not a JPEG nvJPEG takes) ride along
    decoded, with their rows."""
    rows = len(images)
    lengths = [len(i.data) if isinstance(i, EncodedImage) else 0 for i in images]
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.empty(int(offsets[-1]), dtype=np.uint8)
    box = np.zeros((rows, 4), dtype=np.float64)
    affine = np.zeros((rows, 4), dtype=np.float64)
    affine[:, 3] = 1.0  # the identity: no rotation, shift or zoom
    decoded, decoded_rows = [], []
    for row, image in enumerate(images):
        if isinstance(image, EncodedImage):
            data[offsets[row] : offsets[row + 1]] = image.data.numpy()
            box[row] = image.box
            if image.affine is not None:
                affine[row] = image.affine
        elif image is not None:
            decoded.append(image)
            decoded_rows.append(row)
    size = cfg.image_size
    steps = rows // batch_size
    entry: dict[str, Any] = {
        "data": torch.from_numpy(data),
        "offsets": torch.from_numpy(offsets),
        "box": torch.from_numpy(box.reshape(batch_size, steps, 4)),
        "decoded": _stack(decoded) if decoded else torch.zeros(0, 1, size, size, dtype=torch.uint8),
        "decoded_rows": torch.tensor(decoded_rows, dtype=torch.int64),
        "size": size,
    }
    if cfg.augment.affine:
        entry["affine"] = torch.from_numpy(affine.reshape(batch_size, steps, 4))
    return entry


def labels_kept(study_id: int, fraction: float, seed: int) -> bool:
    """Whether ``study_id`` keeps its labels under ``data.label_fraction``: a uniform
    hash of (seed, study id) below ``fraction``; a function of the study alone, so the
    labelled subset is the same on every rank, epoch and resume."""
    if fraction >= 1.0:
        return True
    return zlib.crc32(f"{seed}:{int(study_id)}".encode()) / 2**32 < fraction


def _add_text(batch: dict, rows: list[_Step], tokenizer: Callable, cfg) -> None:
    """Token ids of the reports, one row per (b, t) at ``b·T + t`` (with ``cfg.reports``;
    empty where ``text_mask`` is false), and of all sentences, flat, with ``sentence_index``
    the row ``b·T + t`` each belongs to (with ``cfg.sentences``)."""
    if cfg.reports:
        ids, mask = _tokenize(
            tokenizer, [r.report if r.text else "" for r in rows], cfg.max_text_length
        )
        batch["report_input_ids"], batch["report_attention_mask"] = ids, mask
    if cfg.sentences:
        flat = [sentence for r in rows if r.text for sentence in r.sentences]
        index = [i for i, r in enumerate(rows) if r.text for _ in r.sentences]
        if flat:
            ids, mask = _tokenize(tokenizer, flat, cfg.max_sentence_length)
        else:  # no sentence in the whole batch: keep the keys, with zero rows
            ids = mask = torch.zeros(0, 0, dtype=torch.int64)
        batch["sentence_input_ids"], batch["sentence_attention_mask"] = ids, mask
        batch["sentence_index"] = torch.tensor(index, dtype=torch.int64)
