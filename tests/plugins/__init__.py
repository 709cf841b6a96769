"""Test-only components that extend vlp from outside its core, one file each.

Each module registers one component; a recipe names them through ``imports``. They prove
that a new encoder, objective or evaluator needs no edit to the model, loader, trainer or
evaluators.
"""
