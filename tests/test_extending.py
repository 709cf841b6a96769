"""Extending vlp from outside its core, and the recipe checks that guard it.

* A toy encoder that reads frontal + lateral + the first prior, a toy objective that needs
  the labels, and a toy evaluator (``tests/plugins``, one file each, registered by their
  decorators and named by the recipe's ``imports``) train under DeepSpeed and are
  evaluated with no edit to the model, loader, trainer or evaluators.
* An image-only recipe (no text encoder) trains.
* A recipe whose components need data the ``data`` section does not provide, or with two
  image sizes, fails at load with one line naming the key.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlp.config import ConfigError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "recipes" / "debug.yaml"
PLUGINS = "[tests.plugins.toy_encoder, tests.plugins.toy_objective, tests.plugins.toy_evaluator]"

TOY = f"""extends: {DEBUG}
name: toy
imports: {PLUGINS}
data: {{views: [frontal, lateral], priors: 1, workers: 0, batch_size: 4}}
model:
  encoders: {{image: null, toy: {{kind: toy, grid: 2}}}}
objectives: [{{name: toy_align}}]
train: {{steps: 3, log_every: 1}}
checkpoint: {{every: 3}}
"""

IMAGE_ONLY = f"""extends: {DEBUG}
name: image-only
imports: [tests.plugins.toy_objective]
data: {{workers: 0, batch_size: 4}}
model:
  encoders: {{text: null}}
optim:
  group_lr: {{text: null}}   # the extended recipe's text rate: no text encoder here
objectives: [{{name: toy_image_only}}]
train: {{steps: 3, log_every: 1}}
checkpoint: {{every: 3}}
"""


def _pretrain(tmp_path: Path, text: str, name: str) -> Path:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text)
    run_dir = tmp_path / name
    env = dict(
        os.environ,
        VLP_CACHE=str(tmp_path.parent / "extending-cache"),
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        PYTHONPATH=str(ROOT),
        CUDA_VISIBLE_DEVICES="",
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "vlp.cli", "pretrain", str(recipe), "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = (run_dir / "log.txt").read_text()
    assert "step 3/3" in log and (run_dir / "step-3" / "COMPLETE").is_file(), log[-2000:]
    return run_dir


def test_toy_encoder_objective_and_evaluator_plug_in(tmp_path):
    run_dir = _pretrain(tmp_path, TOY, "toy")
    import tests.plugins.toy_evaluator  # noqa: F401  (registers toy-eval in this process)
    from vlp.evaluation import run_evaluator
    from vlp.evaluation.features import eval_loader
    from vlp.training.export import load_model

    # The trained toy encoder reads all three images, laid out as it declares.
    module, cfg = load_model(run_dir)
    assert set(module.model.encoders) == {"toy", "text"}
    test = next((tmp_path.parent / "extending-cache").glob("phantom-*/shards/test"))
    batch = next(iter(eval_loader(module, test, batch_size=4)))
    # frontal and lateral at t = 0 and the prior's frontal (the eval loader reads the
    # model's requirements): T = 2 with the lateral decoded at the current study only.
    assert set(batch["images"]) == {"frontal", "lateral"}
    assert batch["images"]["frontal"].shape[:2] == batch["study_mask"].shape == (4, 2)
    assert not batch["view_mask"]["lateral"][:, 1].any()
    with torch.no_grad():
        features = module.model.encode(batch, {"toy_global"})
        layout = [(s.view, s.time, s.start, s.stop) for s in features["toy_layout"]]
        assert layout == [("frontal", 0, 0, 4), ("lateral", 0, 4, 8), ("frontal", 1, 8, 12)]
        assert features["toy_local"].shape[1] == 12
        # Changing only the lateral view changes the global embedding of studies that have
        # one: the encoder really reads it.
        has_lateral = batch["view_mask"]["lateral"][:, 0]
        assert bool(has_lateral.any())
        images = dict(batch["images"], lateral=255 - batch["images"]["lateral"])
        changed = dict(batch, images=images)
        other = module.model.encode(changed, {"toy_global"})["toy_global"]
        moved = (other - features["toy_global"]).abs().sum(1) > 1e-6
        assert torch.equal(moved, has_lateral)
    # The toy evaluator runs through the registry like the built-in ones.
    results = run_evaluator("toy-eval", run_dir, test, tmp_path / "eval", limit=5)
    assert results["studies"] == 5 and 0.0 <= results["top1"] <= 1.0
    assert (tmp_path / "eval" / "results.json").is_file()


def test_image_only_recipe_trains_without_a_text_encoder(tmp_path):
    run_dir = _pretrain(tmp_path, IMAGE_ONLY, "image-only")
    from vlp.training.export import load_model

    module, _ = load_model(run_dir)
    assert module.model.text is None and module.model.tokenizer is None
    assert not any(name.startswith("encoders.text") for name, _ in module.model.named_parameters())


def _fails(tmp_path: Path, body: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(f"extends: {DEBUG}\n{body}")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message[len(f"{path}: ") :]


def test_objective_needing_sentences_the_data_does_not_provide_fails_at_load(tmp_path):
    message = _fails(tmp_path, "data: {sentences: false}\n")
    assert message.startswith("data.sentences: objectives[0] (local_mi) needs report sentences")


def test_objective_needing_a_missing_text_encoder_fails_at_load(tmp_path):
    message = _fails(tmp_path, "model: {encoders: {text: null}}\n")
    assert message.startswith("objectives[0]: objective 'local_mi' needs the feature(s) ")
    assert "'sentence'" in message


def test_encoder_needing_views_and_priors_the_data_does_not_provide_fails_at_load(tmp_path):
    encoders = "model: {encoders: {image: null, toy: {kind: toy}}}\n"
    objectives = "objectives: [{name: toy_align}]\n"
    imports = f"imports: {PLUGINS}\n"
    message = _fails(tmp_path, imports + encoders + objectives)
    assert message.startswith("data.views: model.encoders.toy (toy) needs the view(s) ['lateral']")
    message = _fails(
        tmp_path, imports + encoders + objectives + "data: {views: [frontal, lateral]}\n"
    )
    assert message.startswith("data.priors: model.encoders.toy (toy) needs 1 prior")


def test_an_encoder_on_a_prior_view_the_data_does_not_decode_fails_at_load(tmp_path):
    encoders = "model: {encoders: {prior: {kind: image, view: lateral, time: 1}}}\n"
    data = "data: {views: [frontal, lateral], priors: 1, prior_views: [frontal]}\n"
    message = _fails(tmp_path, encoders + data)
    assert message.startswith(
        "data.prior_views: model.encoders.prior (image) needs the view(s) ['lateral'] of the "
        "prior studies, but data.prior_views is ['frontal']"
    )
    message = _fails(tmp_path, encoders + "data: {views: [frontal, lateral]}\n")
    assert message.startswith("data.priors: model.encoders.prior (image) needs 1 prior")
    # prior_views must be among the decoded views
    message = _fails(tmp_path, "data: {priors: 1, prior_views: [lateral]}\n")
    assert "prior_views must be a subset of views ['frontal']" in message


def test_two_image_sizes_fail_at_load(tmp_path):
    tower = "model: {encoders: {image: {tower: {name: vit_tiny_patch16_224, params: {img_size: 96}}}}}\n"
    message = _fails(tmp_path, tower)
    assert message.startswith(
        "model.encoders.image.tower.params.img_size: 96 disagrees with data.image_size (64)"
    )
    # The old second size key no longer exists: one image size per recipe.
    message = _fails(tmp_path, "model: {encoders: {image: {tower: {image_size: 64}}}}\n")
    assert message.startswith("model.encoders.image.tower.image_size: unknown key")


def test_group_lr_must_name_a_parameter_group(tmp_path):
    message = _fails(
        tmp_path,
        "model: {encoders: {text: null}}\nobjectives: [{name: toy_image_only}]\n"
        "imports: [tests.plugins.toy_objective]\n",
    )
    assert message.startswith("optim.group_lr.text: unknown parameter group; expected one of")


def test_unknown_encoder_kind_and_import_fail_at_load(tmp_path):
    message = _fails(tmp_path, "model: {encoders: {extra: {kind: imagee}}}\n")
    assert message.startswith(
        "model.encoders.extra: unknown encoder 'imagee'; did you mean 'image'?"
    )
    message = _fails(tmp_path, "imports: [tests.plugins.no_such_module_xyz]\n")
    assert message.startswith("imports[0]: cannot import 'tests.plugins.no_such_module_xyz'")


def test_the_loader_decodes_only_what_the_components_read(tmp_path):
    from vlp.config.components import requirements_of
    from vlp.data.requirements import narrowed

    def decoded(cfg):
        data = narrowed(cfg.data, requirements_of(cfg))
        return data.views, data.priors, data.prior_views, data.reports, data.sentences

    # local MI reads sentences only; CLIP reads reports only.
    local_mi, clip = (load_recipe(ROOT / "recipes" / f"{n}.yaml") for n in ("local_mi", "clip"))
    assert decoded(local_mi) == (["frontal"], 0, [], False, True)
    assert decoded(clip) == (["frontal"], 0, [], True, False)
    # A lateral view and priors in the data section that no component reads are not decoded.
    extra = tmp_path / "extra.yaml"
    extra.write_text(f"extends: {DEBUG}\ndata: {{views: [frontal, lateral], priors: 2}}\n")
    assert decoded(load_recipe(extra)) == (["frontal"], 0, [], False, True)
    toy = tmp_path / "toy.yaml"
    toy.write_text(TOY)
    # The toy encoder reads the prior's frontal only: its lateral is not decoded.
    assert decoded(load_recipe(toy)) == (["frontal", "lateral"], 1, ["frontal"], True, False)
