"""vlp's own recipes: every one validates, errors name file and key, resolved configs round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlp.config import ConfigError, load_recipe, recipe_from_dict
from vlp.config.loader import dump_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
RUNNABLE = [p for p in RECIPES if p.name != "base.yaml"]  # base.yaml is a fragment to extend


def test_there_are_recipes():
    assert {p.name for p in RUNNABLE} >= {
        "clip.yaml",
        "global_mi.yaml",
        "local_mi.yaml",
        "debug.yaml",
        "demo.yaml",
    }


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.name)
def test_recipe_validates_and_round_trips(path, tmp_path):
    cfg = load_recipe(path)
    assert cfg.deepspeed.gradient_clipping >= 0
    dump_yaml(cfg, tmp_path / "config.yaml")
    again = recipe_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


def test_local_mi_defaults_to_cpc_and_switches_to_mine_in_one_line(tmp_path):
    cfg = load_recipe(ROOT / "recipes" / "local_mi.yaml")
    assert cfg.objectives[0].name == "local_mi" and cfg.objectives[0].params["estimator"] == "cpc"
    text = (ROOT / "recipes" / "local_mi.yaml").read_text()
    assert text.count("estimator: cpc") == 1
    mine = tmp_path / "local_mi.yaml"
    mine.write_text(text.replace("estimator: cpc", "estimator: mine"))
    (tmp_path / "base.yaml").write_text((ROOT / "recipes" / "base.yaml").read_text())
    assert load_recipe(mine).objectives[0].params["estimator"] == "mine"


def _child(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "child.yaml"
    path.write_text(f"extends: {ROOT / 'recipes' / 'debug.yaml'}\n{body}")
    return path


def test_typo_in_nested_key_names_file_path_and_suggestion(tmp_path):
    path = _child(tmp_path, "model:\n  encoders:\n    image: {tower: {nmae: resnet18}}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value).startswith(
        f"{path}: model.encoders.image.tower.nmae: unknown key; did you mean 'name'?"
    )


def test_typo_in_objective_parameter(tmp_path):
    path = _child(tmp_path, "objectives:\n  - {name: local_mi, estimater: cpc}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value).startswith(
        f"{path}: objectives[0].estimater: unknown key; did you mean 'estimator'?"
    )
    path = _child(tmp_path, "objectives:\n  - {name: local_mii}\n")
    with pytest.raises(
        ConfigError,
        match=r"objectives\[0\]\.name: unknown objective 'local_mii'; did you mean 'local_mi'\?",
    ):
        load_recipe(path)


def test_wrong_type_and_impossible_value(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_recipe(_child(tmp_path, "train: {steps: many}\n"))
    assert "train.steps: expected int, got 'many' (str)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_recipe(_child(tmp_path, "deepspeed: {zero_stage: 4}\n"))
    assert "deepspeed: zero_stage must be 0, 1, 2 or 3, got 4" in str(err.value)


def test_missing_required_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nobjectives: [{name: clip}]\ndeepspeed: {zero_stage: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert (
        str(err.value)
        == f"{path}: deepspeed.gradient_clipping: missing required key (expected float)"
    )


def test_extends_and_set_are_typed(tmp_path):
    cfg = load_recipe(
        ROOT / "recipes" / "debug.yaml",
        ["train.steps=12", "optim.lr=3e-4", "data.views=[frontal, lateral]"],
    )
    assert (
        cfg.train.steps == 12
        and cfg.optim.lr == pytest.approx(3e-4)
        and cfg.data.views == ["frontal", "lateral"]
    )
    # debug extends local_mi extends base: values come from all three levels.
    assert (
        cfg.name == "debug" and cfg.optim.group_lr == {"text": 2e-5} and cfg.data.drop_last is True
    )
    with pytest.raises(
        ConfigError, match=r"--set train\.steps=1\.5\): train\.steps: expected int, got 1\.5"
    ):
        load_recipe(ROOT / "recipes" / "debug.yaml", ["train.steps=1.5"])


def test_readme_recipe_snippets_load(tmp_path):
    """Every ``<!-- recipe-snippet -->`` YAML block of the README is a valid recipe on top
    of ``recipes/local_mi.yaml`` (the loader's cross-section checks included)."""
    import re

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- recipe-snippet -->\n```yaml\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        path = tmp_path / f"snippet{i}.yaml"
        path.write_text(f"extends: {ROOT / 'recipes' / 'local_mi.yaml'}\n{block}")
        cfg = load_recipe(path)
        assert cfg.model.encoders, block
