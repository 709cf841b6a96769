"""End to end: every evaluator on a tiny phantom dataset and a debug checkpoint.

The checkpoint comes from ``vlp pretrain recipes/debug.yaml --set train.steps=2`` and
``vlp export`` when that works; if the trainer fails, from a hand-made export of the
debug recipe's freshly initialised model (``model.safetensors`` + resolved
``config.yaml``), which exercises the same loading path (``load_model``). Which one was
used is printed. The evaluators run through the ``vlp eval`` command line (in-process) and,
for the linear probe's random-encoder baseline and fine-tuning, through the Python API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from vlp.cli import main as vlp_main

PATIENTS = 12


def _trained_export(root) -> str | None:
    """Run pretrain + export as a user would; None when the trainer does not work."""
    env = {**os.environ, "VLP_CACHE": str(root / "vlp_cache")}
    run = root / "run"
    steps = [
        [
            sys.executable,
            "-m",
            "vlp.cli",
            "pretrain",
            "recipes/debug.yaml",
            "--run-dir",
            str(run),
            "--set",
            "train.steps=2",
        ],
        [sys.executable, "-m", "vlp.cli", "export", str(run)],
    ]
    for command in steps:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            print(f"{command[3]} failed, using a hand-made export:\n{done.stderr[-800:]}")
            return None
    return str(run / "export")


def _handmade_export(root) -> str:
    from safetensors.torch import save_file

    from vlp.config import load_recipe
    from vlp.config.loader import dump_yaml
    from vlp.training.module import build_pretraining_module

    cfg = load_recipe("recipes/debug.yaml")
    model = build_pretraining_module(cfg.model, cfg.objectives, cfg.data.image_size)
    folder = root / "export"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    dump_yaml(cfg, folder / "config.yaml")
    return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vlp.data.convert.api import ConvertOptions, convert_mimic
    from vlp.data.phantom import PhantomConfig, generate

    root = tmp_path_factory.mktemp("eval_e2e")
    # Seed 2: its train split has every progression class at least twice for three
    # findings (seed 0's, since phantom version 3, for none), so the temporal SVM is fitted.
    generate(
        root / "phantom", PhantomConfig(patients=PATIENTS, seed=2, image_size=128), progress=False
    )
    shards = root / "shards"
    workers = max(1, (os.cpu_count() or 1) - 1)  # the converter CLI's default
    options = ConvertOptions(image_size=128, priors=1, shard_size=50, workers=workers)
    convert_mimic(root / "phantom", shards, options)
    checkpoint = _trained_export(root) if os.environ.get("VLP_E2E_HANDMADE") is None else None
    print("checkpoint:", "trained" if checkpoint else "hand-made")
    checkpoint = checkpoint or _handmade_export(root)
    return root, shards, checkpoint


def _eval(setup, task: str, data: str, *extra: str, name: str | None = None):
    """``vlp eval TASK`` into ``root/(name or TASK)``; returns (results, table, out)."""
    root, shards, checkpoint = setup
    out = root / (name or task)
    code = vlp_main(
        [
            "eval",
            task,
            "--checkpoint",
            checkpoint,
            "--data",
            str(shards / data),
            "--out",
            str(out),
            "--bootstrap",
            "20",
            "--figures",
            *extra,
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    return results, table, out


def _png_ok(path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_zero_shot(setup):
    results, table, out = _eval(setup, "zero-shot", "train")
    assert results["similarity"].startswith("local MI critic")  # the debug recipe is local-MI
    auroc = results["auroc"]["Pleural Effusion"]
    assert 0.0 <= auroc["value"] <= 1.0 and auroc["ci"][0] <= auroc["value"] <= auroc["ci"][1]
    assert results["per_prompt_auroc"]["Cardiomegaly"]
    assert results["multiclass"]["definition"]["seed"] == 0
    assert "| Pleural Effusion |" in table and "AUROC of each single prompt" in table
    _png_ok(out / "zero_shot_roc.png")
    _png_ok(out / "zero_shot_confusion.png")


def test_zero_shot_from_embeddings_matches_evaluator(setup):
    """``aurocs_from_embeddings`` (how a model from another framework is scored, e.g. by
    benchmarks/learning_efficiency.py) gives the evaluator's AUROCs for a contrastive model."""
    import numpy as np
    import torch

    from vlp.config import load_recipe
    from vlp.evaluation import zero_shot
    from vlp.evaluation.features import eval_loader, image_features, text_embeddings
    from vlp.training.module import build_pretraining_module

    _, shards, _ = setup
    cfg = load_recipe(
        "recipes/clip.yaml",
        [
            "model.encoders.image.tower.name=resnet18",
            "data.image_size=64",
            "model.encoders.text.tower.name=tiny",
        ],
    )
    torch.manual_seed(0)
    model = build_pretraining_module(cfg.model, cfg.objectives, cfg.data.image_size).eval()
    data = shards / "train"
    results = zero_shot.evaluate(model, data, shards / "zs", val_data=None, bootstrap=20)
    assert results["similarity"].startswith("cosine")
    images, labels = [], []
    with torch.no_grad():
        for batch in eval_loader(model, data):
            images.append(image_features(model, batch, torch.device("cpu"))["image_global"])
            labels.append(batch["labels"][:, 0].numpy())
    spec = zero_shot.load_prompts()
    texts = [c[2] for c in zero_shot.prompt_columns(spec)]
    text = text_embeddings(model, texts, "report")
    mine = zero_shot.aurocs_from_embeddings(
        torch.cat(images), text, np.concatenate(labels), spec, bootstrap=20
    )
    for name, auc in results["auroc"].items():
        np.testing.assert_allclose(mine["auroc"][name]["value"], auc["value"], atol=1e-6)
    np.testing.assert_allclose(mine["mean_auroc"], results["mean_auroc"], atol=1e-6)


def test_linear_probe_cli_and_random_baseline(setup):
    # Evaluated on its own training split: the tiny phantom's validate/test splits hold one
    # or two studies. This checks the plumbing, not generalisation.
    results, table, out = _eval(
        setup, "linear-probe", "train", "--train-data", str(setup[1] / "train")
    )
    assert set(results["mean_auroc"]) == {"1%", "10%", "100%"}
    assert 0.0 <= results["mean_auroc"]["100%"] <= 1.0
    assert 0.0 <= results["auroc"]["100%"]["Cardiomegaly"]["value"] <= 1.0
    assert "| Cardiomegaly |" in table
    assert any((out / "cache").glob("features-*.npz"))
    _png_ok(out / "linear_probe_roc_100pct.png")

    from vlp.evaluation import linear_probe
    from vlp.training.export import load_model

    model, _ = load_model(setup[2])
    # The validation split doubles as training data here to keep the test fast: this checks
    # the plumbing of the random-encoder baseline and of fine-tuning, not their scores.
    api = linear_probe.evaluate(
        model,
        setup[1] / "validate",
        setup[0] / "probe_api",
        train_data=setup[1] / "validate",
        fractions=(1.0,),
        random_init=True,
        finetune=True,
        finetune_epochs=1,
        bootstrap=10,
        cache_dir=out / "cache",  # the pretrained features come from the CLI run's cache
    )
    assert "random_init" in api and "100%" in api["random_init"]["mean_auroc"]
    assert "finetune" in api and "Cardiomegaly" in api["finetune"]["auroc"]


def test_edema(setup):
    results, table, out = _eval(setup, "edema", "train", "--train-data", str(setup[1] / "train"))
    assert set(results["ordinal_auc"]) == {"0v123", "01v23", "012v3"}
    assert 0.0 <= results["ordinal_auc"]["0v123"]["value"] <= 1.0
    assert "ordinal 0v123" in table
    _png_ok(out / "edema_confusion.png")


def test_retrieval(setup):
    results, table, out = _eval(setup, "retrieval", "train")
    _png_ok(out / "recall_at_k.png")
    assert 0 <= results["image_to_report"]["R@1"]["value"] <= 1
    assert results["image_to_report"]["median_rank"]["value"] >= 1
    assert "image to report" in table
    assert "mean of its sentences" in results["similarity_note"]  # local-MI critic
    # Brute force: each image against each report, one study and one sentence at a time.
    import numpy as np
    import torch

    from vlp.evaluation.features import eval_loader, scorer_of
    from vlp.evaluation.retrieval import recall_at
    from vlp.training.export import load_model

    model, _ = load_model(setup[2])
    scorer = scorer_of(model)
    images, sentences = [], []
    with torch.no_grad():
        for batch in eval_loader(model, setup[1] / "train", batch_size=4):
            feats = model.model.encode_image(batch["images"]["frontal"][:, 0])
            for b, record in enumerate(batch["meta"]):
                images.append({"image_local": feats["image_local"][b : b + 1]})
                sentences.append(model.model.encode_text(record["sentences"], kind="sentence"))
        score = np.array(
            [[float(scorer.scores(im, s)[0].mean()) for s in sentences] for im in images]
        )
    rank = np.array([1 + int((row > row[i]).sum()) for i, row in enumerate(score)])
    assert results["samples"] == len(images)
    for k in (1, 5, 10):
        expected = recall_at(rank, k)
        assert results["image_to_report"][f"R@{k}"]["value"] == pytest.approx(expected)


def test_grounding(setup):
    results, table, out = _eval(setup, "grounding", "train")
    assert results["targets"] > 0 and results["dropped"].get("non_frontal_boxes", 0) >= 0
    assert results["mean_cnr"]["value"] >= 0
    assert "mean over categories" in table
    _png_ok(out / "grounding_overlays.png")


def test_a_scorer_the_model_lacks_and_data_without_studies_stop_in_one_line(
    setup, tmp_path, capsys
):
    root, shards, checkpoint = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "shard-000.tar").write_bytes(b"")
    cases = [
        (["grounding", "--data", str(shards / "train"), "--scorer", "nope"],
         "scorer: the model has no objective 'nope' (it has ["),
        (["zero-shot", "--data", str(empty)], f"{empty}: no readable study"),
    ]  # fmt: skip
    for args, expected in cases:
        code = vlp_main(["eval", *args, "--checkpoint", checkpoint, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2, err
        lines = [line for line in err.splitlines() if "error" in line]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"vlp eval: error: {expected}"), lines


def test_temporal_current_embedding_is_an_svm_on_the_current_embedding_alone(setup):
    """``--embedding current``: each finding's macro-accuracy equals scikit-learn's
    balanced accuracy of a LinearSVC cross-validated by hand on the cached current-study
    embeddings alone (the cache read here with numpy, not through vlp)."""
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    results, table, out = _eval(
        setup, "temporal", "train", "--embedding", "current", name="temporal_current"
    )
    assert results["embedding"] == "current"
    assert "current-study" in results["protocol"] and "current-study" in table
    (cache,) = (out / "cache").glob("features-*.npz")
    with np.load(cache, allow_pickle=False) as arrays:
        x, has_prior = arrays["image_global"], arrays["prior_mask"]
        meta = json.loads(arrays["sidecar"].tobytes().decode())["meta"]
    classes = ["improving", "stable", "worsening"]
    checked = 0
    for finding, entry in results["macro_accuracy"].items():
        if finding not in results["folds"]:
            continue
        rows = [
            i
            for i, m in enumerate(meta)
            if has_prior[i] and ((m.get("labels") or {}).get("progression") or {}).get(finding)
        ]
        y = np.array([classes.index(meta[i]["labels"]["progression"][finding]) for i in rows])
        folds = StratifiedKFold(results["folds"][finding], shuffle=True, random_state=0)
        # The same SVM through the other solver (dual coordinate descent, run to a tight
        # tolerance): the optimum is unique, so the predictions must agree.
        svm = make_pipeline(
            StandardScaler(), LinearSVC(dual=True, tol=1e-8, max_iter=10**6, random_state=0)
        )
        predicted = cross_val_predict(svm, x[rows], y, cv=folds)
        assert entry["value"] == pytest.approx(balanced_accuracy_score(y, predicted)), finding
        checked += 1
    assert checked > 0


def test_temporal_embedding_must_be_pair_or_current(setup, capsys):
    root, shards, checkpoint = setup
    argv = ["eval", "temporal", "--checkpoint", checkpoint, "--data", str(shards / "train")]
    with pytest.raises(SystemExit) as refused:
        vlp_main([*argv, "--out", str(root / "temporal_refused"), "--embedding", "both"])
    assert refused.value.code == 2
    assert "--embedding: invalid choice: 'both'" in capsys.readouterr().err
    assert not (root / "temporal_refused").exists()


def test_temporal(setup):
    results, table, out = _eval(setup, "temporal", "train")
    assert results["with_prior"] > 0
    assert "pleural_effusion" in results["macro_accuracy"]
    assert "| pleural_effusion |" in table
    _png_ok(out / "confusion.png")
    # Undefined findings (too few pairs) are null in the JSON and left out of the mean.
    values = [v["value"] for v in results["macro_accuracy"].values()]
    defined = [v for v in values if v is not None and v == v]
    assert results["mean_macro_accuracy"] == pytest.approx(sum(defined) / len(defined))
    # liblinear's iteration limit, counted per finding instead of warned per fold; the
    # primal solver reaches the optimum on every fold.
    assert set(results["folds_not_converged"]) == set(results["folds"])
    assert set(results["folds_not_converged"].values()) == {0}
    low, high = results["mean_macro_accuracy_ci"]
    assert low <= results["mean_macro_accuracy"] <= high
    # The confusion matrices hold every evaluated pair once, by its true class (rows).
    assert results["confusion"]
    for finding, matrix in results["confusion"].items():
        rows = [sum(row) for row in matrix]
        assert rows == list(results["counts"][finding].values()), finding
    # The per-study predictions a paired comparison reads: scikit-learn's balanced accuracy
    # of each finding's saved column is the reported macro-accuracy.
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score

    from vlp.evaluation.temporal import paired_difference

    with np.load(out / "predictions.npz") as saved:
        findings, targets, predicted = saved["findings"], saved["targets"], saved["predictions"]
        assert len(saved["study_id"]) == results["samples"]
    for column, finding in enumerate(findings):
        if finding in results["folds"]:
            rows = targets[:, column] >= 0
            expected = balanced_accuracy_score(targets[rows, column], predicted[rows, column])
            assert results["macro_accuracy"][finding]["value"] == pytest.approx(expected)
    same = paired_difference(out, out, bootstrap=50)
    assert same["value"] == 0 and same["ci"] == [0, 0]
