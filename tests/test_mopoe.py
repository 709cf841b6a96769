"""MoPoE (``vlp.objectives.mopoe``, ``vlp.evaluation.subset_probe``, ``recipes/mopoe.yaml``).

Independent references: the product of experts against its closed form (one expert, the
precision-weighted mean of two), the subsets against ``itertools`` over each sample's
present modalities, the KL against a loop over those subsets with ``torch.distributions``,
the likelihoods against ``torch.distributions`` Laplace / a per-token log-softmax loop,
the fast average precision against scikit-learn; training against an uninterrupted
DeepSpeed run; the evaluator's study counts against the loader's view masks.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Laplace, Normal, kl_divergence

from tests.helpers.training import check_trains_and_resumes
from vlp.data.batch import batch_from_images
from vlp.models.model import FeatureDims
from vlp.objectives.mopoe import (
    MODALITIES,
    SUBSETS,
    MoPoEConfig,
    MoPoEObjective,
    subset_mask,
    subset_name,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "mopoe.yaml")
DIM = 8
TINY_OBJECTIVE = (
    "objectives=[{name: mopoe, weight: 1.0, latent_dim: 8, decoder_size: 16, "
    "decoder_width: 8, max_text_tokens: 24, text_decoder_dim: 16}]"
)
#: on top of tests.helpers.training.SMALL: tiny towers for both views, 64 px.
TINY_MOPOE = [
    "model.encoders.lateral.tower.name=resnet18",
    "model.embed_dim=32",
    "model.local_dim=32",
    "data.max_text_length=32",
    TINY_OBJECTIVE,
]


def _objective(**overrides) -> MoPoEObjective:
    torch.manual_seed(0)
    config = MoPoEConfig(
        latent_dim=4,
        decoder_size=8,
        decoder_width=4,
        max_text_tokens=10,
        text_decoder_dim=8,
        vocab_size=50,
        **overrides,
    )
    return MoPoEObjective(config, FeatureDims(DIM, DIM, None))


def _batch(lateral_present, size: int = 16, length: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = len(lateral_present)
    images = {
        view: torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
        for view in ("frontal", "lateral")
    }
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 50, (n, length), generator=g) * mask
    batch = batch_from_images(images, report_input_ids=ids, report_attention_mask=mask)
    batch["view_mask"]["lateral"][:, 0] = torch.tensor(lateral_present)
    batch["images"]["lateral"][~torch.tensor(lateral_present)] = 0  # the loader's zero fill
    return batch


def _features(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(n, DIM, generator=g) for k in ("image_global", "lateral_global", "report")
    }


def _experts(n: int = 5, dim: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        m: (torch.randn(n, dim, generator=g, dtype=torch.float64),
            torch.randn(n, dim, generator=g, dtype=torch.float64))
        for m in MODALITIES
    }  # fmt: skip


# --------------------------------------------------------------------------- product of experts


def test_the_product_of_one_expert_is_that_expert():
    experts = _experts()
    for modality in MODALITIES:
        mu, logvar = MoPoEObjective.subset_posterior(experts, (modality,))
        # Closed form: one precision 1/(σ²+1e-8) → variance σ²+1e-8, mean μ.
        torch.testing.assert_close(mu, experts[modality][0])
        torch.testing.assert_close(logvar, experts[modality][1], atol=1e-6, rtol=0)


def test_the_product_of_two_experts_is_the_precision_weighted_gaussian():
    experts = _experts()
    (mu1, lv1), (mu2, lv2) = experts["frontal"], experts["text"]
    mu, logvar = MoPoEObjective.subset_posterior(experts, ("frontal", "text"))
    for b in range(mu1.shape[0]):
        for d in range(mu1.shape[1]):
            p1 = 1.0 / (math.exp(float(lv1[b, d])) + 1e-8)
            p2 = 1.0 / (math.exp(float(lv2[b, d])) + 1e-8)
            var = 1.0 / (p1 + p2)
            mean = var * (float(mu1[b, d]) * p1 + float(mu2[b, d]) * p2)
            assert float(mu[b, d]) == pytest.approx(mean, rel=1e-9)
            assert float(logvar[b, d]) == pytest.approx(math.log(var), rel=1e-9, abs=1e-12)


def test_an_absent_member_is_left_out_of_its_row():
    experts = _experts(n=3)
    present = torch.tensor([[True, True, True], [True, False, True], [False, False, True]])
    mu, logvar = MoPoEObjective.subset_posterior(experts, MODALITIES, present)
    full, _ = MoPoEObjective.subset_posterior(experts, MODALITIES)
    two, _ = MoPoEObjective.subset_posterior(experts, ("frontal", "text"))
    torch.testing.assert_close(mu[0], full[0])
    torch.testing.assert_close(mu[1], two[1])
    torch.testing.assert_close(mu[2], experts["text"][0][2])
    nothing, _ = MoPoEObjective.subset_posterior(experts, ("lateral",), present)
    assert torch.isnan(nothing[1:]).all() and torch.isfinite(nothing[0]).all()


# --------------------------------------------------------------------------- subsets and KL


def test_subsets_are_those_of_each_samples_present_modalities():
    present = torch.tensor([[True, True, True], [True, False, True], [False, False, True]])
    mask = subset_mask(present)
    for b, row in enumerate(present.tolist()):
        have = [m for m, p in zip(MODALITIES, row) if p]
        expected = {
            frozenset(c) for r in range(1, len(have) + 1) for c in itertools.combinations(have, r)
        }
        got = {frozenset(s) for s, on in zip(SUBSETS, mask[b].tolist()) if on}
        assert got == expected
    assert mask.sum(1).tolist() == [7, 3, 1]
    assert [subset_name(s) for s in SUBSETS] == ["F", "L", "T", "F+L", "F+T", "L+T", "F+L+T"]


def test_the_kl_is_the_mean_over_each_samples_subsets_of_kl_to_the_prior():
    objective = _objective()
    experts = _experts(n=4, dim=3, seed=2)
    present = torch.tensor([[True, True, True], [True, False, True], [True, True, True],
                            [True, False, True]])  # fmt: skip
    got = objective.kl(experts, present)
    prior = Normal(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    for b in range(4):
        have = [m for m, p in zip(MODALITIES, present[b].tolist()) if p]
        terms = []
        for r in range(1, len(have) + 1):
            for subset in itertools.combinations(have, r):
                # Closed-form PoE of this sample's experts, one dimension at a time.
                precision = sum(1.0 / (experts[m][1][b].exp() + 1e-8) for m in subset)
                mean = sum(experts[m][0][b] / (experts[m][1][b].exp() + 1e-8) for m in subset)
                q = Normal(mean / precision, (1.0 / precision).sqrt())
                terms.append(float(kl_divergence(q, prior).sum()))
        assert float(got[b]) == pytest.approx(sum(terms) / len(terms), rel=1e-9)


# --------------------------------------------------------------------------- likelihoods


def test_the_image_nll_is_a_laplace_sum_over_pixels():
    objective = _objective()
    mean, target = torch.randn(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    expected = -Laplace(mean, torch.tensor(0.75)).log_prob(target).flatten(1).sum(1)
    torch.testing.assert_close(objective.image_nll(mean, target, "frontal"), expected)
    learned = _objective(learn_image_scale=True, image_scale=0.3)
    expected = -Laplace(mean, torch.tensor(0.3)).log_prob(target).flatten(1).sum(1)
    torch.testing.assert_close(learned.image_nll(mean, target, "lateral"), expected)


def test_the_image_target_is_the_view_in_zero_one_at_decoder_size():
    objective = _objective()  # decoder_size 8
    batch = _batch([True, False], size=16)
    target = objective.image_target(batch, "frontal")
    frontal = batch["images"]["frontal"][:, 0].double() / 255
    pooled = frontal.reshape(2, 1, 8, 2, 8, 2).mean((3, 5))  # 2×2 blocks by hand
    torch.testing.assert_close(target.double(), pooled, rtol=0, atol=1e-6)


def test_the_text_nll_ignores_padding_and_matches_a_token_loop():
    objective = _objective()
    batch = _batch([True, True, True], length=12)
    ids, mask = objective.text_tokens(batch)
    z = torch.randn(3, 4)
    got = objective.text_nll(z, ids, mask).detach()
    with torch.no_grad():
        logits = objective.decode_text(z, ids.shape[1])
    for b in range(3):
        total = 0.0
        for p in range(ids.shape[1]):
            if mask[b, p]:
                total -= float(torch.log_softmax(logits[b, p], -1)[ids[b, p]])
        assert float(got[b]) == pytest.approx(total, rel=1e-5)
    noisy = ids.masked_fill(~mask, 7)  # other ids under the padding: the same NLL
    torch.testing.assert_close(objective.text_nll(z, noisy, mask), got)
    # Only the first max_text_tokens (10) positions count.
    long = _batch([True], length=30, seed=3)
    long["report_attention_mask"][:] = 1
    ids, mask = objective.text_tokens(long)
    assert ids.shape == (1, 10) and mask.all()


def test_a_token_beyond_the_vocabulary_is_a_clear_error():
    objective = _objective()  # vocab_size 50
    batch = _batch([True])
    batch["report_input_ids"][0, 0] = 50
    with pytest.raises(ValueError, match=r"report_input_ids holds token id 50.*vocab_size"):
        objective(_features(1), batch)


def test_bad_config_and_missing_feature_name_the_key():
    from vlp.config import ConfigError
    from vlp.registry import config_of

    with pytest.raises(ConfigError, match="decoder_size must be 4·2\\^k"):
        config_of("objective", "mopoe", {"decoder_size": 48}, "objectives[0]")
    with pytest.raises(ConfigError, match=r"objectives\[0\]\.rec_weights\.txt: unknown key"):
        config_of("objective", "mopoe", {"rec_weights": {"txt": 1.0}}, "objectives[0]")
    features = _features(2)
    del features["lateral_global"]
    with pytest.raises(KeyError, match="lateral_global"):
        _objective()(features, _batch([True, True]))


# --------------------------------------------------------------------------- training


def test_a_batch_without_laterals_trains_and_leaves_the_lateral_side_alone():
    objective = _objective()
    batch = _batch([False, False, False, False])
    features = {k: v.requires_grad_() for k, v in _features(4).items()}
    torch.manual_seed(5)
    out = objective(features, batch)
    loss = sum(out.losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    frontal = objective.heads["frontal"].mu.weight.grad
    assert frontal is not None and frontal.abs().sum() > 0
    for p in [*objective.image_decoders["lateral"].parameters(),
              *objective.heads["lateral"].parameters()]:  # fmt: skip
        assert p.grad is None or p.grad.abs().max() == 0
    assert features["lateral_global"].grad.abs().max() == 0
    assert float(out.metrics["subsets_per_sample"]) == 3.0
    assert float(out.losses["rec_lateral"]) == 0.0
    # The lateral pixels (zeros here) do not enter the loss at all.
    other = _batch([False, False, False, False])
    other["images"]["lateral"] = torch.full_like(other["images"]["lateral"], 200)
    torch.manual_seed(5)
    again = objective({k: v.detach() for k, v in features.items()}, other)
    assert float(sum(again.losses.values())) == pytest.approx(float(loss), rel=1e-6)


def test_figure_samples_are_decoded_only_on_steps_that_end_at_a_checkpoint():
    """The trainer marks the steps that end at a regular checkpoint; only those forwards
    decode the figure's samples (the training module passes the mark to its objectives),
    and a stop between checkpoints draws nothing stale."""
    from types import SimpleNamespace

    from vlp.training.module import PretrainingModule
    from vlp.training.trainer import checkpoint_due

    cfg = SimpleNamespace(checkpoint=SimpleNamespace(every=3), train=SimpleNamespace(steps=7))
    assert [s for s in range(1, 8) if checkpoint_due(s, cfg)] == [3, 6, 7]

    class Features(torch.nn.Module):  # the model's part: the features, ready made
        def encode(self, batch, needed):
            return _features(4)

    objective = _objective()
    module = PretrainingModule(Features(), {"mopoe": objective}, {"mopoe": 1.0})
    batch = _batch([True, False, True, True])
    module.record_figures = False
    module(batch)
    assert objective._last is None and objective.write_figures("unused", 1) == []
    module.record_figures = True
    module(batch)
    assert set(objective._last) >= {"real frontal", "frontal from text"}
    assert objective._last["real frontal"].shape[0] == 4


def test_a_mixed_batch_reconstructs_the_lateral_of_the_studies_that_have_one():
    objective = _objective()
    batch = _batch([True, False, True])
    out = objective(_features(3), batch)
    assert float(out.metrics["lateral_present"]) == pytest.approx(2 / 3)
    assert float(out.metrics["subsets_per_sample"]) == pytest.approx((7 + 3 + 7) / 3)
    assert float(out.losses["rec_lateral"]) > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantom_cache):
    """The recipe shrunk to seconds, trained 4 steps straight and 2 + 2 with a resume."""
    tmp = tmp_path_factory.mktemp("mopoe")
    run_dir = check_trains_and_resumes(tmp, phantom_cache, RECIPE, TINY_MOPOE)
    return run_dir, phantom_cache


def test_the_recipe_trains_and_resumes_exactly_and_draws_its_figure(trained):
    run_dir, _ = trained
    figures = sorted((run_dir / "figures").glob("mopoe_samples_step-*.png"))
    assert figures, "no checkpoint figure"
    from PIL import Image

    with Image.open(figures[-1]) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_subset_probe_runs_end_to_end_on_a_tiny_export(trained, tmp_path):
    from vlp.cli import main as vlp_main
    from vlp.evaluation.features import eval_loader
    from vlp.training.export import export, load_model

    run_dir, cache = trained
    checkpoint = export(run_dir)
    shards = next(cache.glob("phantom-*/shards"))
    out = tmp_path / "subset-probe"
    # The tiny phantom's test split holds a handful of studies: evaluate on train.
    code = vlp_main(
        ["eval", "subset-probe", "--checkpoint", str(checkpoint), "--data",
         str(shards / "train"), "--train-data", str(shards / "train"), "--out", str(out),
         "--bootstrap", "20"]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["subsets"]) == ["F", "L", "T", "F+L", "F+T", "L+T", "F+L+T"]
    # Study counts by an independent pass over the loader's view masks.
    model, _ = load_model(checkpoint)
    studies = laterals = 0
    for batch in eval_loader(model, shards / "train", batch_size=8):
        studies += len(batch["keys"])
        laterals += int(batch["view_mask"]["lateral"][:, 0].sum())
    assert 0 < laterals < studies
    for name, entry in results["subsets"].items():
        expected = laterals if "L" in name else studies
        assert entry["test_studies"] == entry["train_studies"] == expected, name
        value = entry["mean_ap"]["value"]
        assert value is None or 0.0 <= value <= 1.0
    assert any(e["mean_ap"]["value"] is not None for e in results["subsets"].values())
    table = (out / "results.md").read_text()
    assert "| F+L+T |" in table and "mean AP [95% CI]" in table
    from PIL import Image

    with Image.open(out / "subset_probe_samples.png") as image:
        assert image.format == "PNG" and min(image.size) > 100
    texts = (out / "subset_probe_texts.txt").read_text()
    assert texts.count("real report:") == min(4, laterals)
    assert "decoded from frontal:" in texts


# --------------------------------------------------------------------------- metrics


def test_fast_average_precision_equals_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score

    from vlp.evaluation.subset_probe import fast_average_precision

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        s = rng.integers(0, 5, n).astype(float)  # many ties
        assert fast_average_precision(y, s) == pytest.approx(average_precision_score(y, s))
