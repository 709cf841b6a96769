"""vlp: distributed vision-language pretraining for chest radiographs and reports.

The library is organised along the path of a run (see docs/architecture.md):
``vlp.data`` (phantom, converters, loader) → ``vlp.models`` (towers, heads) →
``vlp.objectives`` → ``vlp.training`` (DeepSpeed trainer) → ``vlp.evaluation``.
Importing ``vlp`` has no side effects and imports no heavy dependency.
"""

__version__ = "0.1.0"
