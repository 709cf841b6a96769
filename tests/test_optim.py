"""The trainer's optimizer: AdamW (fused by default) against the update written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vlp.training import optim
from vlp.training.config import OptimConfig


def _adamw_by_hand(weights, grads, lr, betas, eps, decay):
    """Loshchilov & Hutter's decoupled AdamW, as torch defines it, one element at a time."""
    b1, b2 = betas
    m = [0.0] * len(weights)
    v = [0.0] * len(weights)
    w = list(weights)
    for t, grad in enumerate(grads, start=1):
        for i, g in enumerate(grad):
            w[i] *= 1.0 - lr * decay
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            w[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return w


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_the_update_written_out(fused):
    cfg = OptimConfig(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, fused=fused)
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(7, generator=generator, dtype=torch.float64)
    grads = [torch.randn(7, generator=generator, dtype=torch.float64) for _ in range(4)]
    param = torch.nn.Parameter(start.float().clone())
    optimizer = optim.build_optimizer([{"params": [param], "weight_decay": cfg.weight_decay}], cfg)
    assert optimizer.defaults["fused"] is (True if fused else None)
    for grad in grads:
        param.grad = grad.float().clone()
        optimizer.step()
    expected = _adamw_by_hand(
        start.float().double().tolist(),
        [g.float().double().tolist() for g in grads],
        cfg.lr,
        cfg.betas,
        cfg.eps,
        cfg.weight_decay,
    )
    assert param.detach().double().tolist() == pytest.approx(expected, abs=1e-6)
