"""The recipe schema: one dataclass tree that fully describes a run.

Each section is owned by the component it configures (torchtitan-style) and only
assembled here:

============  =====================================  ==========================
recipe key    dataclass                              owner
============  =====================================  ==========================
``data``      :class:`DataConfig` (loader + phantom)  ``vlp.data.loader``, ``vlp.data.phantom``
``model``     ``ModelConfig``                        ``vlp.models.model``
``objectives`` list of ``ObjectiveSpec``             ``vlp.objectives``
``optim``     ``OptimConfig``                        ``vlp.training.config``
``deepspeed`` ``DeepSpeedConfig``                    ``vlp.training.config``
``train``     ``TrainConfig``                        ``vlp.training.config``
``checkpoint`` ``CheckpointConfig``                  ``vlp.training.config``
============  =====================================  ==========================

Objective parameters are written flat beside ``name`` and ``weight`` in the YAML and are
validated against the dataclass the objective registered (see :func:`vlp.config.load_recipe`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vlp.data.loader import LoaderConfig
from vlp.data.phantom import PhantomConfig
from vlp.models.model import ModelConfig
from vlp.objectives.base import ObjectiveSpec
from vlp.training.config import CheckpointConfig, DeepSpeedConfig, OptimConfig, TrainConfig


@dataclass
class DataConfig(LoaderConfig):
    """The loader's parameters, plus the phantom used when ``shards`` is empty."""

    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    #: held-out shards for evaluation during/after training (optional).
    val_shards: str = ""

    def validate(self) -> None:
        # Empty shards is allowed here: the trainer then builds phantom shards.
        LoaderConfig.validate(self if self.shards else dataclasses.replace(self, shards="phantom"))
        if self.phantom.image_size < self.image_size:
            raise ValueError(
                f"phantom.image_size ({self.phantom.image_size}) is smaller than the model "
                f"input image_size ({self.image_size})"
            )


@dataclass
class RecipeConfig:
    name: str
    deepspeed: DeepSpeedConfig
    objectives: list[ObjectiveSpec]
    description: str = ""
    #: Python modules imported before the recipe is validated, so that components they
    #: register (encoders, objectives, evaluators, towers) can be named in the recipe.
    imports: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        if not self.objectives:
            raise ValueError("objectives: expected at least one objective")
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: each objective may appear once, got {names}")
