"""Batches handed from workers as one buffer (``vlp.data.packing``): the tensors come back
equal, and a loader with workers yields the same batches packed or not."""

from __future__ import annotations

import torch

from tests.test_loader import config, tokenizer, write_shards
from vlp.data.loader import build_loader
from vlp.data.packing import PACKED, pack, unpack

__all__ = ["tokenizer"]  # the fixture, re-exported for this module's tests


def _assert_same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # labels hold NaN
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    else:
        assert a == b


def test_pack_then_unpack_gives_back_every_tensor():
    batch = {
        "keys": ["a", "b"],
        "images": {"frontal": torch.randint(0, 255, (2, 1, 1, 5, 3), dtype=torch.uint8)},
        "view_mask": {"frontal": torch.tensor([[True], [False]])},
        "gap_days": torch.tensor([[0.0], [1.5]]),
        "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4).t(),  # not contiguous
        "half": torch.randn(3, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 7, dtype=torch.int64),
        "meta": [{"x": 1}, {"y": [2]}],
    }
    packed = pack(batch)
    buffer, layout = packed[PACKED]
    assert buffer.dtype == torch.uint8 and len(layout) == 6
    assert not any(isinstance(v, torch.Tensor) for v in packed.values())  # all in the buffer
    assert isinstance(batch["gap_days"], torch.Tensor)  # the input batch is left as it was
    _assert_same(unpack(packed), batch)
    assert unpack({"keys": []}) == {"keys": []}


def test_a_loader_with_workers_yields_the_same_batches_packed_or_not(tmp_path, tokenizer):
    write_shards(tmp_path, 12, [6, 6])
    common = dict(workers=2, drop_last=False, views=["frontal", "lateral"], priors=1)
    packed = list(build_loader(config(tmp_path, **common), tokenizer))
    plain = list(build_loader(config(tmp_path, pack_batches=False, **common), tokenizer))
    assert len(packed) == len(plain) > 1
    for a, b in zip(packed, plain):
        _assert_same(a, b)
