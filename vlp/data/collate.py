"""Decoded studies → the batch dict of ``docs/architecture.md`` ("Batch").

One job: stack a list of decoded studies into tensors, fill absent views with zeros and
masks, and tokenise reports and sentences (per batch, in the worker, so the main process
stays free).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from vlp.data.decode import _Decoded
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

    Without a tokenizer (a model with no text encoder) the batch has no token ids; the
    report text stays in ``meta``."""
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
    if tokenizer is not None:
        _add_text(batch, studies, tokenizer, cfg)
    batch["labels"] = torch.tensor([s.labels for s in studies], dtype=torch.float32)
    batch["edema_severity"] = torch.tensor([s.edema_severity for s in studies], dtype=torch.int64)
    batch["meta"] = [s.meta for s in studies]
    return batch


def _add_text(batch: dict, studies: list[_Decoded], tokenizer: Callable, cfg) -> None:
    """Token ids of the reports (with ``cfg.reports``) and of all sentences, flat (with
    ``cfg.sentences``)."""
    if cfg.reports:
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
