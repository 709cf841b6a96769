"""The registry of evaluators: one place lists them; ``vlp eval`` is generated from it.

An evaluator registers as kind ``evaluator`` with the dataclass of its own options (its
docstring is the command's one-line help), and a
runner ``run(options, model, data, out, **common) -> dict`` where ``common`` holds the
options every evaluator takes (``figures``, ``seed``, ``bootstrap``, ``batch_size``). Each
options field becomes a ``vlp eval NAME --flag`` (the field name with dashes, or
``metadata["flag"]``; its help text is ``metadata["help"]``, its allowed values
``metadata["choices"]``). ``model`` is the training
module that ``vlp.training.export.load_model`` rebuilds (the model and the objectives whose
scorers the evaluators call); evaluators read views and priors from the model's
requirements, never an objective's name.

This module is imported to build the command line, so it stays light: the built-in
evaluators' modules are imported only when they run.

A new evaluator is one function plus a registration::

    @register("evaluator", "my-eval", config=MyOptions)
    def my_eval(options, model, data, out, **common): ...
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field

from vlp.registry import register

SCORER_HELP = (
    "score images against texts with this objective's scorer (default: the recipe's first "
    "objective that defines one)"
)
TRAIN_HELP = "training split for the probes (default: the sibling train/ of --data)"


def _builtin(module: str):
    """A runner that calls ``vlp.evaluation.<module>.evaluate`` with the options."""

    def run(options, model, data, out, **common) -> dict:
        evaluate = importlib.import_module(f"vlp.evaluation.{module}").evaluate
        return evaluate(model, data, out, **common, **asdict(options))

    run.__name__ = run.__qualname__ = f"run_{module}"
    run.__doc__ = f"``vlp.evaluation.{module}.evaluate`` (see its docstring)."
    return run


@dataclass
class ZeroShotOptions:
    """zero-shot AUROC per finding from positive/negative prompts"""

    prompts: str | None = field(
        default=None, metadata={"help": "prompt YAML (default: the shipped CheXpert prompts)"}
    )
    objective: str | None = field(default=None, metadata={"flag": "--scorer", "help": SCORER_HELP})


@dataclass
class LinearProbeOptions:
    """linear probes on frozen features at 1/10/100 %% labels, against a random encoder"""

    train_data: str = field(default="auto", metadata={"help": TRAIN_HELP})
    finetune: bool = field(default=False, metadata={"help": "tune the encoder end to end"})


@dataclass
class EdemaOptions:
    """edema severity (0-3): ordinal AUCs and macro-F1 of probes"""

    train_data: str = field(default="auto", metadata={"help": TRAIN_HELP})
    classifier: str = field(
        default="probe",
        metadata={
            "help": "probe: a logistic regression on frozen features; objective: the "
            "recipe's own severity classifier (an objective's predictor); or an "
            "objective's name"
        },
    )


@dataclass
class RetrievalOptions:
    """image-to-report and report-to-image retrieval R@1/5/10"""

    objective: str | None = field(default=None, metadata={"flag": "--scorer", "help": SCORER_HELP})


@dataclass
class GroundingOptions:
    """phrase grounding: CNR and IoU of region-score maps against boxes"""

    objective: str | None = field(default=None, metadata={"flag": "--scorer", "help": SCORER_HELP})


#: what the temporal SVM reads per study (``--embedding``), with the words the results'
#: protocol line uses for it; here rather than in ``temporal`` so that the option's choices
#: are known without importing scikit-learn (``vlp --help``).
TEMPORAL_EMBEDDINGS = {
    "pair": "[current, prior]",
    "current": "current-study (no prior concatenated)",
}


@dataclass
class TemporalOptions:
    """temporal progression (improved/stable/worsened) from current and prior images"""

    embedding: str = field(
        default="pair",
        metadata={
            "choices": tuple(TEMPORAL_EMBEDDINGS),
            "help": "pair: the SVM reads [current, prior] embeddings (Med-ST's protocol); "
            "current: the current study's embedding alone, which a multi-image encoder "
            "(biovil_t) fuses with the prior: what the embedding itself holds of the change",
        },
    )


register("evaluator", "zero-shot", config=ZeroShotOptions)(_builtin("zero_shot"))
register("evaluator", "linear-probe", config=LinearProbeOptions)(_builtin("linear_probe"))
register("evaluator", "retrieval", config=RetrievalOptions)(_builtin("retrieval"))
register("evaluator", "edema", config=EdemaOptions)(_builtin("edema"))
register("evaluator", "grounding", config=GroundingOptions)(_builtin("grounding"))
register("evaluator", "temporal", config=TemporalOptions)(_builtin("temporal"))


@dataclass
class SubsetProbeOptions:
    """MoPoE: AP of linear probes on each modality subset's latent, and generated samples"""

    train_data: str = field(default="auto", metadata={"help": TRAIN_HELP})
    objective: str | None = field(
        default=None,
        metadata={"help": "the MoPoE objective to read (default: the recipe's first one)"},
    )


register("evaluator", "subset-probe", config=SubsetProbeOptions)(_builtin("subset_probe"))
