"""Files from others cannot run code when vlp reads them (issue 16, "Untrusted files").

Each test plants a file whose unpickling would execute code (it would create a marker
file) where vlp reads one, and checks that vlp refuses it and the code never ran.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch


class _Payload:
    """Unpickles by calling ``os.mkdir(marker)``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_export_refuses_a_checkpoint_that_would_run_code(tmp_path):
    from vlp.training.export import export

    run = tmp_path / "run"
    step = run / "step-1"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("")
    (run / "latest").write_text("step-1")
    (run / "config.yaml").write_text("name: planted\n")
    marker = tmp_path / "code-ran"
    state = {"module": {"w": torch.zeros(2)}, "extra": _Payload(marker)}
    torch.save(state, step / "mp_rank_00_model_states.pt")
    # The planted file really would run code if it were unpickled in full.
    with open(step / "mp_rank_00_model_states.pt", "rb") as fh:
        assert fh.read(2) == b"PK"  # torch's zip format, holding the pickle
    with pytest.raises(pickle.UnpicklingError):
        export(run)
    assert not marker.exists()
    assert not (run / "export" / "model.safetensors").exists()
    # The same file unpickled without the guard creates the marker: the test can fail.
    torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["/etc/s1.json", "../s1.json", "a/../../s1.json"])
def test_a_shard_member_with_an_absolute_or_parent_path_is_refused(tmp_path, name):
    import io
    import tarfile

    from vlp.data.shards import ShardError, iter_tar_samples

    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for member in ("s0.json", name):
            data = b"{}"
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match="absolute path or '..'"):
        list(iter_tar_samples(str(shard)))


def test_a_recipe_with_a_python_tag_is_refused_without_running_it(tmp_path):
    from vlp.config import ConfigError, load_recipe

    marker = tmp_path / "code-ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"name: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(ConfigError):
        load_recipe(recipe)
    assert not marker.exists()
    # The same text under PyYAML's unsafe loader runs the code: the test can fail.
    import yaml

    yaml.unsafe_load(recipe.read_text())
    assert marker.exists()


def test_a_recipe_cannot_import_a_module_the_user_did_not_trust(tmp_path, monkeypatch):
    """A recipe's ``imports`` run code: a planted module next to it (on ``sys.path``, as the
    working directory is under ``python -m``) is refused unless ``VLP_TRUSTED_IMPORTS``
    names it."""
    import sys

    from vlp.config import ConfigError, load_recipe

    marker = tmp_path / "code-ran"
    (tmp_path / "planted_plugin.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    recipe = tmp_path / "recipe.yaml"
    debug = Path(__file__).resolve().parents[1] / "recipes" / "debug.yaml"
    recipe.write_text(f"extends: {debug}\nimports: [planted_plugin]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("VLP_TRUSTED_IMPORTS", "tests.plugins")
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    message = str(err.value)
    assert "imports[0]: 'planted_plugin' is not a trusted import" in message
    assert "VLP_TRUSTED_IMPORTS=planted_plugin" in message and "\n" not in message
    assert not marker.exists() and "planted_plugin" not in sys.modules
    # vlp's own modules are always trusted, a listed prefix covers its submodules only.
    monkeypatch.setenv("VLP_TRUSTED_IMPORTS", "planted")  # a prefix of the name, not a package
    with pytest.raises(ConfigError):
        load_recipe(recipe)
    # Trusted by the user, the same recipe imports it: the refusal is what kept it out.
    monkeypatch.setenv("VLP_TRUSTED_IMPORTS", "tests.plugins,planted_plugin")
    load_recipe(recipe)
    assert marker.exists()
    monkeypatch.delitem(sys.modules, "planted_plugin")


def test_a_planted_feature_cache_is_not_unpickled(tmp_path):
    """Evaluators cache features as ``.npz``; a cache holding a pickled object array (which
    would run code when loaded with pickles allowed) is refused and recomputed."""
    import numpy as np

    from vlp.evaluation import features

    marker = tmp_path / "code-ran"
    planted = tmp_path / "features-planted.npz"
    np.savez(planted, sidecar=np.array([_Payload(marker)], dtype=object))
    assert features._load(planted) is None
    assert not marker.exists()
    with np.load(planted, allow_pickle=True) as arrays:  # what the guard prevents
        arrays["sidecar"]
    assert marker.exists()
