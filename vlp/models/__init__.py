"""Models: image and text towers, encoders, projection heads and the :class:`VLPModel`.

Names are resolved lazily so that importing a submodule (``vlp.models.image``, which the
registry and the objectives import) does not pull in the whole model.
"""

from __future__ import annotations

_EXPORTS = {
    "FeatureDims": "vlp.models.model",
    "ModelConfig": "vlp.models.model",
    "VLPModel": "vlp.models.model",
    "build_model": "vlp.models.model",
    "ImageTowerConfig": "vlp.models.image",
    "TextTowerConfig": "vlp.models.text",
    "HeadConfig": "vlp.models.heads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vlp.models' has no attribute {name!r}")
