"""A batch's tensors in one buffer, so that a DataLoader worker hands it over as one piece.

One job: :func:`pack` moves every tensor of a (nested) batch dict into one contiguous
uint8 tensor and leaves a small layout in its place; :func:`unpack` rebuilds the tensors
as views of that buffer. Between a worker and the main process every tensor travels as
its own shared-memory segment (created and mapped in the worker, its file descriptor
passed through a socket and mapped again in the main process); a batch has 14 or more of
them, and that per-tensor cost was most of the main process's time per batch (measured in
``benchmarks/loader_speed.py``, ``--pack`` off/on). One buffer costs one segment.

Tensors inside lists are left as they are (the batch contract keeps none there). The
unpacked tensors share the buffer's storage: they are read-only in spirit, like any batch.
"""

from __future__ import annotations

import torch

#: key of the packed buffer and its layout in a batch that went through :func:`pack`.
PACKED = "_packed"
#: byte alignment of each tensor in the buffer (the widest dtype of a batch is 8 bytes).
ALIGN = 8


def _tensors(batch: dict, prefix: tuple = ()) -> list[tuple[tuple, torch.Tensor]]:
    """(key path, tensor) of every tensor in ``batch`` and its nested dicts."""
    found = []
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            found.append(((*prefix, key), value))
        elif isinstance(value, dict):
            found.extend(_tensors(value, (*prefix, key)))
    return found


def _set(batch: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        batch = batch[key]
    batch[path[-1]] = value


def _copy_dicts(batch: dict) -> dict:
    return {k: _copy_dicts(v) if isinstance(v, dict) else v for k, v in batch.items()}


def pack(batch: dict) -> dict:
    """``batch`` with every tensor moved into one uint8 buffer (``batch[PACKED]``)."""
    tensors = _tensors(batch)
    if not tensors:
        return batch
    layout, offset = [], 0
    for path, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        layout.append((path, tensor.dtype, tuple(tensor.shape), offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    buffer = torch.empty(offset, dtype=torch.uint8)
    out = _copy_dicts(batch)
    for (path, tensor), (*_, start, nbytes) in zip(tensors, layout):
        if nbytes:
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            buffer[start : start + nbytes].copy_(flat)
        _set(out, path, None)
    out[PACKED] = (buffer, layout)
    return out


def unpack(batch: dict) -> dict:
    """The inverse of :func:`pack`: each tensor a view of the buffer (a batch without a
    buffer is returned as it is)."""
    if PACKED not in batch:
        return batch
    buffer, layout = batch.pop(PACKED)
    for path, dtype, shape, start, nbytes in layout:
        if nbytes:
            tensor = buffer[start : start + nbytes].view(dtype).reshape(shape)
        else:
            tensor = torch.empty(shape, dtype=dtype)
        _set(batch, path, tensor)
    return batch
