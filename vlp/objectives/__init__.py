"""Training objectives behind one interface; importing this package registers them all."""

from vlp.objectives import (  # noqa: F401  (registration side effects)
    contrastive,
    local_alignment,
    mi,
    mopoe,
    reconstruction,
    semisupervised,
    supervised,
    temporal,
)
from vlp.objectives.base import (
    FeatureDims,
    Objective,
    ObjectiveOutput,
    ObjectiveSpec,
    build_objective,
)

__all__ = ["FeatureDims", "Objective", "ObjectiveOutput", "ObjectiveSpec", "build_objective"]
