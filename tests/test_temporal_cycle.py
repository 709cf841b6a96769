"""Med-ST's temporal cycle consistency (``vlp.objectives.temporal``) and the series features.

Independent references: the vectorised terms against a per-series loop of the formulas;
series features against encoding each time step's images directly; training against an
uninterrupted run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers.training import check_trains_and_resumes
from vlp.config import ConfigError, load_recipe
from vlp.data.batch import batch_from_images
from vlp.models.model import FeatureDims
from vlp.objectives.base import ObjectiveSpec, build_objective
from vlp.objectives.temporal import cycle_terms

ROOT = Path(__file__).resolve().parents[1]
TAU, LAM, DELTA, FLOOR = 0.1, 0.001, 2.0, 1e-4


def _loop(e1, e2):
    """Classification and regression per step of one series (n×D each), in float64."""
    e1, e2, n = e1.double(), e2.double(), e1.shape[0]
    t = torch.arange(n, dtype=torch.float64) / n
    cls, reg = [], []
    for i in range(n):
        logits = torch.stack([-(e1[i] - e2[j]).pow(2).sum() / TAU for j in range(n)])
        cls.append(-(logits[i] - torch.logsumexp(logits, 0)))
        nearest = (torch.softmax(logits, 0)[:, None] * e2).sum(0)
        back = torch.stack([-(nearest - e1[k]).pow(2).sum() / TAU for k in range(n)])
        beta = torch.softmax(back, 0)
        mu = (beta * t).sum()
        var = max(float((beta * (t - mu) ** 2).sum()), FLOOR)
        err = float(t[i] - mu)
        if abs(err) < DELTA:
            reg.append(err**2 / var + LAM * math.log(var))
        else:
            reg.append(DELTA * (abs(err) - DELTA / 2))
    return torch.stack(cls), torch.tensor([float(r) for r in reg], dtype=torch.float64)


def test_terms_match_a_loop_for_series_of_any_length():
    g = torch.Generator().manual_seed(0)
    # Small embeddings keep the soft mappings diffuse (σ² above its floor) but not flat.
    e1, e2 = (0.3 * torch.randn(3, 4, 6, generator=g) for _ in range(2))
    lengths = [4, 3, 1]
    valid = torch.tensor([[t < n for t in range(4)] for n in lengths])
    classification, regression = cycle_terms(e1, e2, valid, TAU, LAM, DELTA, FLOOR)
    for b, n in enumerate(lengths):
        if n < 2:  # one study: nothing to align in time
            assert classification[b].abs().sum() == 0 and regression[b].abs().sum() == 0
            continue
        want_cls, want_reg = _loop(e1[b, :n], e2[b, :n])
        torch.testing.assert_close(classification[b, :n].double(), want_cls, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(regression[b, :n].double(), want_reg, atol=1e-4, rtol=1e-4)
        assert classification[b, n:].abs().sum() == 0


def _objective():
    return build_objective(ObjectiveSpec("temporal_cycle"), FeatureDims(8, 8, 8))


def test_the_loss_is_lowest_for_an_aligned_series_and_grows_when_steps_are_permuted():
    objective = _objective()
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 4, 8, generator=g)
    batch = {
        "study_mask": torch.ones(2, 4, dtype=torch.bool),
        "text_mask": torch.ones(2, 4, dtype=torch.bool),
    }

    def loss(reports):
        features = {"image_global_series": base, "report_series": reports}
        return float(objective(features, batch).losses["cycle"])

    aligned = loss(base.clone())
    swapped = loss(base[:, [1, 0, 2, 3]])
    reversed_ = loss(base[:, [3, 2, 1, 0]])
    assert aligned < swapped < reversed_
    # Studies missing at the end of a series are masked: only the real steps count.
    short = dict(batch, study_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool))
    noise = torch.randn(2, 4, 8, generator=g)
    a = objective({"image_global_series": base, "report_series": base}, short).losses["cycle"]
    padded = base.clone()
    padded[0, 2:] = noise[0, 2:]
    b = objective({"image_global_series": base, "report_series": padded}, short).losses["cycle"]
    assert float(a) == pytest.approx(float(b), abs=1e-6)


def test_series_features_are_each_time_step_encoded_as_the_current_one():
    from vlp.training.module import build_pretraining_module

    cfg = load_recipe(
        ROOT / "recipes" / "biovil.yaml",
        [
            "model.encoders.image.tower.name=resnet18",
            "model.encoders.text.tower.name=tiny",
            "data.image_size=64",
            "data.priors=2",
            "objectives=[{name: clip}, {name: temporal_cycle, series_length: 3}]",
        ],
    )
    module = build_pretraining_module(cfg.model, cfg.objectives, 64).eval()
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 1, 64, 64), generator=g, dtype=torch.uint8)
    texts = ["a", "effusion", "", "cardiomegaly", "edema", "b"]
    tokens = module.model.text.tokenize(texts)
    batch = batch_from_images(
        {"frontal": images},
        report_input_ids=tokens["input_ids"],
        report_attention_mask=tokens["attention_mask"],
    )
    with torch.no_grad():
        features = module.model.encode(batch, {"image_global_series", "report_series"})
        series = features["image_global_series"]
        assert series.shape == (2, 3, 128) and features["report_series"].shape == (2, 3, 128)
        for t in range(3):
            direct = module.model.encode_image(images[:, t])["image_global"]
            torch.testing.assert_close(series[:, t], direct, atol=1e-5, rtol=1e-5)
        reports = module.model.encode_text(texts)
        torch.testing.assert_close(
            features["report_series"].flatten(0, 1), reports, atol=1e-5, rtol=1e-5
        )


def test_a_series_longer_than_the_data_fails_at_load(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"extends: {ROOT / 'recipes' / 'biovil.yaml'}\n"
        "objectives: [{name: clip}, {name: temporal_cycle, series_length: 4}]\n"
        "data: {priors: 2}\n"
    )
    with pytest.raises(
        ConfigError, match=r"data\.priors: objectives\[1\] \(temporal_cycle\) needs 3 prior"
    ):
        load_recipe(path)


def test_temporal_cycle_trains_under_deepspeed_and_resumes_exactly(tmp_path, phantom_cache):
    extra = [
        "objectives=[{name: clip, weight: 1.0}, {name: temporal_cycle, weight: 1.0, series_length: 3}]",
        "data.priors=2",
        "data.prior_views=[frontal]",
    ]
    check_trains_and_resumes(tmp_path, phantom_cache, str(ROOT / "recipes" / "biovil.yaml"), extra)
