"""Label-aware edema methods (issue 15): Chauhan et al.'s ranking loss and joint model,
Liao et al. 2019's semi-supervised M2, the label fraction and the phases they rely on, and
the edema evaluator scoring an objective's own classifier."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from tests.helpers.training import SMALL, check_trains_and_resumes, run_training
from vlp.models.model import FeatureDims
from vlp.objectives.base import ObjectiveOutput
from vlp.objectives.contrastive import LabelRankingConfig, LabelRankingObjective
from vlp.objectives.semisupervised import M2Config, M2Objective

ROOT = Path(__file__).resolve().parents[1]
DIMS = FeatureDims(embed_dim=6, local_dim=6, sentence_dim=None)
IMAGE_ONLY = ["model.encoders.text=null"]


def _ranking_batch(y, study=None):
    y = torch.tensor(y)
    study = torch.arange(len(y)) if study is None else torch.tensor(study)
    return {"edema_severity": y[:, None], "study_id": study[:, None]}


def _ranking_loop(image, text, y, study, cfg):
    """Chauhan et al.'s loss written out pair by pair, with the dot product."""
    b, total = len(y), 0.0
    for i in range(b):
        j = (i + 1) % b
        if study[i] == study[j]:
            m = 0.0
        elif y[i] < 0 or y[j] < 0:
            m = cfg.unlabeled_margin
        else:
            m = max(cfg.min_margin, abs(y[i] - y[j]))
        true = float(image[i] @ text[i])
        total += max(0.0, float(image[j] @ text[i]) - true + m)
        total += max(0.0, float(image[i] @ text[j]) - true + m)
    return total / b


def test_ranking_loss_matches_a_pairwise_loop():
    torch.manual_seed(0)
    image, text = torch.randn(5, 6), torch.randn(5, 6)
    y, study = [0, 3, -1, 2, 2], [10, 11, 12, 13, 10]  # the last one's imposter is study 10
    cfg = LabelRankingConfig()
    out = LabelRankingObjective(cfg, DIMS)(
        {"image_global": image, "report": text}, _ranking_batch(y, study)
    )
    expected = _ranking_loop(image, text, y, study, cfg)
    assert expected > 0
    assert float(out.losses["ranking"]) == pytest.approx(expected, rel=1e-6)


def test_ranking_loss_is_zero_when_every_margin_holds():
    # Matching pairs score 10 and every imposter 0 (orthogonal codes): margins up to 3 hold.
    image = torch.eye(4) * math.sqrt(10.0)
    out = LabelRankingObjective(LabelRankingConfig(), DIMS)(
        {"image_global": image, "report": image.clone()}, _ranking_batch([0, 3, -1, 1])
    )
    assert float(out.losses["ranking"]) == 0.0
    # ... and a severity gap wider than the score gap is violated.
    image = torch.eye(4) * math.sqrt(2.0)
    out = LabelRankingObjective(LabelRankingConfig(), DIMS)(
        {"image_global": image, "report": image.clone()}, _ranking_batch([0, 3, 0, 0])
    )
    # pairs (0→1) and (1→2) have margin 3 against a gap of 2: 2 hinges of 1 each, twice.
    assert float(out.losses["ranking"]) == pytest.approx(4 * 1.0 / 4)


def _m2(**kw):
    torch.manual_seed(1)
    cfg = M2Config(latent_dim=3, hidden_dim=8, decoder_size=8, alpha=2.5, **kw)
    return M2Objective(cfg, DIMS), cfg


def _m2_batch(y, seed=2):
    g = torch.Generator().manual_seed(seed)
    b = len(y)
    return (
        {"image_global": torch.randn(b, 6, generator=g)},
        {
            "images": {"frontal": torch.randint(0, 256, (b, 1, 1, 16, 16), generator=g).byte()},
            "edema_severity": torch.tensor(y)[:, None],
        },
    )


def _bound_independently(objective, cfg, h, y, x, noise):
    """L(x, y) from torch.distributions: Gaussian pixel likelihood, closed-form KL."""
    onehot = F.one_hot(y, cfg.classes).float()
    mu, logvar = objective.posterior(torch.cat([h, onehot], -1)).chunk(2, -1)
    q = Normal(mu, (0.5 * logvar).exp())
    z = mu + q.scale * noise
    mean = objective.decoder(torch.cat([z, onehot], -1))
    nll = -Normal(mean, cfg.pixel_scale).log_prob(x).flatten(1).sum(1)
    kl = kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(1)
    return nll + kl + math.log(cfg.classes)  # -log p(y) of the uniform prior


def _pixels(batch, size):
    images = batch["images"]["frontal"][:, 0].float() / 255.0
    return F.avg_pool2d(images, images.shape[-1] // size)  # area resampling, exact here


def test_m2_reduces_to_the_supervised_loss_when_every_label_is_observed():
    objective, cfg = _m2()
    features, batch = _m2_batch([0, 1, 2, 3, 1])
    torch.manual_seed(7)
    out: ObjectiveOutput = objective(features, batch)
    torch.manual_seed(7)
    h, y = features["image_global"], batch["edema_severity"][:, 0]
    noise = torch.randn(5, cfg.latent_dim)
    bound = _bound_independently(objective, cfg, h, y, _pixels(batch, 8), noise)
    ce = F.cross_entropy(objective.classifier(h), y)
    assert float(out.losses["elbo"]) == pytest.approx(float(bound.mean()), rel=1e-5)
    assert float(out.losses["classification"]) == pytest.approx(cfg.alpha * float(ce), rel=1e-5)


def test_m2_unlabelled_bound_enumerates_the_classes():
    objective, cfg = _m2(unlabeled_weight=0.5)
    features, batch = _m2_batch([2, -1, -1, 0])
    torch.manual_seed(3)
    out = objective(features, batch)
    torch.manual_seed(3)
    h, y, x = features["image_global"], batch["edema_severity"][:, 0], _pixels(batch, 8)
    known = y >= 0
    # The objective draws the labelled noise first, then one draw per class.
    labelled = _bound_independently(
        objective, cfg, h[known], y[known], x[known], torch.randn(2, cfg.latent_dim)
    )
    per_class = torch.stack(
        [
            _bound_independently(
                objective,
                cfg,
                h[~known],
                torch.full((2,), c),
                x[~known],
                torch.randn(2, cfg.latent_dim),
            )
            for c in range(cfg.classes)
        ],
        -1,
    )
    q = objective.classifier(h[~known]).softmax(-1)
    entropy = -(q * q.log()).sum(-1)
    unlabelled = (q * per_class).sum(-1) - entropy
    expected = (labelled.sum() + 0.5 * unlabelled.sum()) / 4
    assert float(out.losses["elbo"]) == pytest.approx(float(expected), rel=1e-5)
    ce = F.cross_entropy(objective.classifier(h[known]), y[known], reduction="sum")
    assert float(out.losses["classification"]) == pytest.approx(cfg.alpha * float(ce) / 4)


def test_m2_without_any_label_still_reaches_every_parameter():
    objective, _ = _m2()
    features, batch = _m2_batch([-1, -1, -1])
    features["image_global"].requires_grad_(True)
    out = objective(features, batch)
    sum(out.losses.values()).backward()
    for name, param in objective.named_parameters():
        assert param.grad is not None, name
    assert float(features["image_global"].grad.abs().sum()) > 0


def test_label_fraction_hides_the_same_studies_on_every_pass():
    from vlp.data.collate import labels_kept

    ids = list(range(50_000_000, 50_004_000))
    kept = [labels_kept(i, 0.2, seed=0) for i in ids]
    assert 0.18 < sum(kept) / len(ids) < 0.22
    # A uniform hash of (seed, study): recomputed independently.
    assert kept == [zlib.crc32(f"0:{i}".encode()) / 2**32 < 0.2 for i in ids]
    assert kept != [labels_kept(i, 0.2, seed=1) for i in ids]
    assert all(labels_kept(i, 1.0, 0) for i in ids[:10])
    assert not any(labels_kept(i, 0.0, 0) for i in ids[:100])


def _small_phantom(cache: Path, recipe: str = "edema_supervised.yaml") -> Path:
    """The shards folder of the phantom that SMALL names (what the training tests build)."""
    from vlp.config import load_recipe
    from vlp.data.phantom_cache import phantom_shards

    cfg = load_recipe(str(ROOT / "recipes" / recipe), [*SMALL, *IMAGE_ONLY])
    return phantom_shards(cfg.data.phantom, cfg.data.priors, root=cache) / "shards"


def test_label_fraction_reaches_the_batch(phantom_cache):
    from vlp.data.collate import labels_kept
    from vlp.data.loader import LoaderConfig, build_loader

    shards = _small_phantom(phantom_cache)

    def batches(fraction):
        cfg = LoaderConfig(
            shards=str(shards / "train"),
            batch_size=8,
            workers=0,
            image_size=32,
            sentences=False,
            shuffle_buffer=0,
            shard_shuffle=False,
            label_fraction=fraction,
        )
        return list(build_loader(cfg, None))

    full, some = batches(1.0), batches(0.5)
    seen = hidden = 0
    for a, b in zip(full, some):
        for i in range(len(a["keys"])):
            keep = labels_kept(int(a["study_id"][i, 0]), 0.5, 0)
            if keep:
                assert torch.equal(a["edema_severity"][i], b["edema_severity"][i])
                assert torch.equal(a["labels"][i].nan_to_num(9), b["labels"][i].nan_to_num(9))
            else:
                hidden += 1
                assert int(b["edema_severity"][i, 0]) == -1
                assert bool(b["labels"][i].isnan().all())
            seen += 1
    assert 0 < hidden < seen


def test_start_step_counts_an_objective_only_from_that_step():
    from vlp.config import load_recipe
    from vlp.training.module import build_pretraining_module

    cfg = load_recipe(
        str(ROOT / "recipes" / "joint_edema.yaml"),
        [
            "model.encoders.image.tower.name=resnet18",
            "model.encoders.text.tower.name=tiny",
            "data.image_size=32",
            "objectives[1].start_step=5",
        ],
    )
    torch.manual_seed(0)
    module = build_pretraining_module(cfg.model, cfg.objectives, 32).eval()
    from vlp.data.batch import batch_from_images

    ids = torch.randint(5, 100, (4, 12))
    batch = batch_from_images(
        {"frontal": torch.randint(0, 256, (4, 1, 32, 32)).byte()},
        report_input_ids=ids,
        report_attention_mask=torch.ones_like(ids),
        edema_severity=torch.tensor([[0], [1], [-1], [3]]),
        study_id=torch.arange(4)[:, None],
    )
    module.step = 4
    before, logs = module(batch)
    assert float(before) == pytest.approx(float(logs["loss/label_ranking/ranking"]))
    module.step = 5
    after, logs = module(batch)
    parts = [v for k, v in logs.items() if k.startswith("loss/") and k != "loss/total"]
    assert len(parts) == 3
    assert float(after) == pytest.approx(float(sum(parts)), rel=1e-6)


def test_start_step_must_be_a_step(tmp_path):
    from vlp.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match=r"objectives\[1\]\.start_step"):
        load_recipe(str(ROOT / "recipes" / "joint_edema.yaml"), ["objectives[1].start_step=-1"])


# The phases cross the resume boundary: step 3 is the first with the severity CE.
JOINT = ["objectives[1].start_step=2"]


@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("joint_edema.yaml", JOINT),
        ("edema_semisup.yaml", [*IMAGE_ONLY, "data.label_fraction=0.5"]),
        ("edema_supervised.yaml", [*IMAGE_ONLY, "data.label_fraction=0.5"]),
    ],
)
def test_edema_recipes_train_and_resume_exactly(tmp_path, phantom_cache, recipe, extra):
    check_trains_and_resumes(tmp_path, phantom_cache, str(ROOT / "recipes" / recipe), extra)


def test_edema_evaluator_scores_the_objectives_own_classifier(tmp_path, phantom_cache):
    """``--classifier objective`` gives the ordinal AUCs of the trained head's own
    probabilities: recomputed here with scikit-learn from independently extracted
    features and the head applied by hand."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from vlp.evaluation import run_evaluator
    from vlp.evaluation.features import extract_features
    from vlp.training.export import export, load_model

    run = tmp_path / "run"
    run_training(
        tmp_path,
        "sup",
        recipe=str(ROOT / "recipes" / "edema_supervised.yaml"),
        overrides=[*SMALL, *IMAGE_ONLY, "train.steps=4"],
        run_dir=run,
        cache=phantom_cache,
    )
    exported = export(run)
    shards = _small_phantom(phantom_cache)
    results = run_evaluator(
        "edema", exported, shards / "test", tmp_path / "eval", classifier="objective", bootstrap=20
    )
    assert results["classifier"] == "objective" and results["C"]["value"] is None

    module, _ = load_model(exported)
    feats = extract_features(module, shards / "test")
    keep = feats.edema_severity >= 0
    head = module.objectives["classification"].heads["image_global"]
    with torch.no_grad():
        probs = head(torch.as_tensor(feats.image_global[keep])).softmax(-1).numpy()
    y = feats.edema_severity[keep]
    if len(set((y >= 1).tolist())) == 2:
        expected = roc_auc_score(y >= 1, probs[:, 1:].sum(1))
        assert results["ordinal_auc"]["0v123"]["value"] == pytest.approx(expected, abs=1e-9)
    assert np.asarray(results["confusion"]).sum() == keep.sum()

    with pytest.raises(ValueError, match="trains no edema_severity classifier|no objective"):
        run_evaluator("edema", exported, shards / "test", tmp_path / "e2", classifier="clip")
