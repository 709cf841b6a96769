"""Golden-loss regression: per-step losses of the shipped recipes must not drift.

Each recipe's model is built as the recipe says and trained for a few steps on fixed
in-memory batches (``tests/helpers/train_entry.synthetic_batches``: seeded uint8 images and
reports/sentences drawn from a fixed list), with the recipe's parameter groups, AdamW,
schedule and gradient clipping, on one thread. The losses were recorded once into
``tests/golden/losses.json`` and every later change to the core must reproduce them to
1e-6 (torchtitan keeps golden loss files the same way). A change that is *meant* to change
them re-records with ``python tests/test_golden_losses.py --record`` and says why in
its commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "losses.json"
RECIPES = ("clip", "global_mi", "local_mi", "debug")
STEPS, BATCH = 3, 4


def recipe_losses(name: str) -> list[float]:
    """Total loss at each of STEPS steps of ``recipes/<name>.yaml`` on the fixed batches."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers.train_entry import synthetic_batches
    from vlp.config import load_recipe
    from vlp.training import optim
    from vlp.training.module import build_pretraining_module, param_groups_of

    cfg = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(cfg.train.seed)
        model = build_pretraining_module(cfg.model, cfg.objectives, cfg.data.image_size).train()
        groups = optim.param_groups(param_groups_of(model), cfg.optim)
        optimizer = optim.build_optimizer(groups, cfg.optim)
        scheduler = optim.build_scheduler(optimizer, cfg.train.steps, cfg.optim)
        model.train()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        batches = synthetic_batches(0, 1, model.model.tokenizer, BATCH, cfg.data.image_size)
        losses = []
        for _ in range(STEPS):
            loss, _ = model(next(batches))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.deepspeed.gradient_clipping > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.deepspeed.gradient_clipping)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        return losses
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_losses_match_the_golden_record(name):
    golden = json.loads(GOLDEN.read_text())
    assert name in golden, f"no golden losses for {name}: record them (module docstring)"
    got = recipe_losses(name)
    assert got == pytest.approx(golden[name], rel=1e-6, abs=1e-6), (name, got, golden[name])


if __name__ == "__main__" and "--record" in sys.argv:
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    record = {name: recipe_losses(name) for name in RECIPES}
    GOLDEN.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
