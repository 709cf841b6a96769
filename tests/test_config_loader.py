"""The strict YAML → dataclass loader, on a small schema independent of vlp's recipes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from vlp.config.loader import (
    ConfigError,
    apply_overrides,
    dump_yaml,
    from_dict,
    resolve_extends,
)


@dataclass
class Inner:
    name: str
    size: int = 4
    ratio: float = 0.5
    kind: Literal["a", "b"] = "a"
    dims: list[int] = field(default_factory=lambda: [1, 2])
    path: str | None = None

    def validate(self):
        if self.size <= 0:
            raise ValueError(f"size must be > 0, got {self.size}")


@dataclass
class Outer:
    inner: Inner
    steps: int = 10
    enabled: bool = True
    extra: dict[str, float] = field(default_factory=dict)
    pair: tuple[float, float] = (0.9, 0.99)


def test_builds_nested_typed_objects():
    cfg = from_dict(Outer, {"inner": {"name": "x", "ratio": 1, "dims": [3]}, "pair": [0.1, 0.2]})
    assert cfg.inner == Inner(name="x", ratio=1.0, dims=[3])
    assert isinstance(cfg.inner.ratio, float)
    assert cfg.pair == (0.1, 0.2)


def test_unknown_key_names_file_path_and_suggests():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"name": "x", "sise": 3}}, source="r.yaml")
    msg = str(err.value)
    assert msg.startswith("r.yaml: inner.sise: unknown key; did you mean 'size'?")
    assert "valid keys: name, size" in msg


def test_wrong_type_names_expected_type():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"name": "x", "size": "big"}}, source="r.yaml")
    assert str(err.value) == "r.yaml: inner.size: expected int, got 'big' (str)"
    with pytest.raises(ConfigError, match=r"inner\.dims\[1\]: expected int"):
        from_dict(Outer, {"inner": {"name": "x", "dims": [1, "two"]}})
    with pytest.raises(ConfigError, match=r"enabled: expected bool"):
        from_dict(Outer, {"inner": {"name": "x"}, "enabled": "yes please"})


def test_missing_required_key():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"size": 3}}, source="r.yaml")
    assert str(err.value) == "r.yaml: inner.name: missing required key (expected str)"


def test_literal_suggests_and_validate_reports_path():
    with pytest.raises(
        ConfigError, match=r"inner\.kind: expected one of 'a', 'b', got 'c' \(str\)"
    ):
        from_dict(Outer, {"inner": {"name": "x", "kind": "c"}})
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"name": "x", "size": -1}}, source="r.yaml")
    assert str(err.value) == "r.yaml: inner: size must be > 0, got -1"


def test_extends_merges_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("inner: {name: base, size: 2, dims: [5, 6]}\nsteps: 3\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ninner: {size: 7}\n")
    data = resolve_extends(tmp_path / "child.yaml")
    cfg = from_dict(Outer, data)
    assert cfg.inner.name == "base" and cfg.inner.size == 7 and cfg.inner.dims == [5, 6]
    assert cfg.steps == 3


def test_extends_cycle_and_missing_parent(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="circular extends"):
        resolve_extends(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="extended recipe 'nowhere.yaml' not found"):
        resolve_extends(tmp_path / "c.yaml")


def test_set_overrides_are_typed_by_schema():
    data = apply_overrides(
        {"inner": {"name": "x"}},
        ["inner.size=12", "inner.ratio=1e-4", "enabled=false", "inner.path=/a/b", "extra.lr=3"],
    )
    cfg = from_dict(Outer, data)
    assert cfg.inner.size == 12 and cfg.inner.ratio == pytest.approx(1e-4)
    assert cfg.enabled is False and cfg.inner.path == "/a/b" and cfg.extra == {"lr": 3.0}
    with pytest.raises(ConfigError, match=r"--set: inner.size: expected int, got 'many'"):
        from_dict(
            Outer, apply_overrides({"inner": {"name": "x"}}, ["inner.size=many"]), source="--set"
        )
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["inner.size"])


def test_set_addresses_list_entries_by_index_without_touching_the_recipe():
    recipe = {"objectives": [{"name": "a"}, {"name": "b", "weight": 1.0}], "model": {"x": 1}}
    data = apply_overrides(
        recipe, ["objectives[1].start_step=5", "objectives[0]={name: c}", "model.y=2"]
    )
    assert data == {
        "objectives": [{"name": "c"}, {"name": "b", "weight": 1.0, "start_step": 5}],
        "model": {"x": 1, "y": 2},
    }
    assert recipe == {
        "objectives": [{"name": "a"}, {"name": "b", "weight": 1.0}],
        "model": {"x": 1},
    }
    with pytest.raises(ConfigError, match=r"objectives\[2\].weight: index 2 is beyond"):
        apply_overrides(recipe, ["objectives[2].weight=1"])
    with pytest.raises(ConfigError, match=r"model\[0\].x: model is not a list"):
        apply_overrides(recipe, ["model[0].x=1"])


def test_dump_and_reload_is_equal(tmp_path):
    cfg = from_dict(Outer, {"inner": {"name": "x", "kind": "b", "path": None}, "extra": {"a": 1.5}})
    dump_yaml(cfg, tmp_path / "c.yaml")
    again = from_dict(Outer, yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == cfg
