"""A rank that sees other shards than the rest, loaded through a recipe's ``imports``.

With ``VLP_TEST_HIDE_LAST_SHARD_ON_RANK=R`` in the environment, rank R (torchrun's
``RANK``) resolves ``data.shards`` without its last shard: what a folder on node-local
disks that differ gives. Without the variable it changes nothing.
"""

from __future__ import annotations

import os

from vlp.data import loader, shards

_resolve = shards.resolve_shards


def _resolve_on_this_node(spec: str, split: str = "train") -> list[shards.Shard]:
    found = _resolve(spec, split)
    hidden_on = os.environ.get("VLP_TEST_HIDE_LAST_SHARD_ON_RANK")
    if hidden_on is not None and os.environ.get("RANK", "0") == hidden_on:
        return found[:-1]
    return found


shards.resolve_shards = _resolve_on_this_node
loader.resolve_shards = _resolve_on_this_node  # the loader imported the name itself
