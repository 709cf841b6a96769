"""Load-time checks that span recipe sections: components, requirements, one image size.

Run by :func:`vlp.config.recipe_from_dict` after every section has been typed, before
anything heavy is built, so a recipe that cannot run fails with ``file: dotted.key:
message`` instead of a KeyError at step 1:

* every encoder of ``model.encoders`` is a registered kind with valid parameters (its
  tower's ``params`` included, through the encoder's ``check``);
* every feature an objective needs is produced by some encoder (``text: null`` and an
  objective that needs ``sentence`` fail here);
* the union of what encoders and objectives need from the batch (views, priors,
  sentences, label fields) is provided by the ``data`` section;
* one image size per recipe: a tower parameter that sizes the input (``img_size``,
  ``image_size``) must equal ``data.image_size``;
* ``optim.group_lr`` names existing parameter groups.
"""

from __future__ import annotations

from vlp.config.loader import ConfigError
from vlp.data.requirements import Requirements, unmet


def component_needs(cfg, source: str | None = None) -> list[tuple[str, Requirements]]:
    """``(component, what it needs from the batch)`` for every encoder and objective of
    ``cfg``, checking on the way that each is valid and that the features each objective
    needs are produced."""
    from vlp import registry
    from vlp.models.encoders import encoder_specs
    from vlp.models.model import produced_features, series_key

    needs: list[tuple[str, Requirements]] = []
    by_encoder: dict[str, Requirements] = {}
    for name, (kind, params) in encoder_specs(cfg.model.encoders).items():
        path = f"model.encoders.{name}"
        config = registry.config_of("encoder", kind, params, path, source)
        encoder_cls = registry.get("encoder", kind).builder
        encoder_cls.check(config, path, source, cfg.data.image_size)
        by_encoder[name] = encoder_cls.requirements(config)
        needs.append((f"{path} ({kind})", by_encoder[name]))

    try:
        produced = produced_features(cfg.model)
    except ValueError as err:
        raise ConfigError(source, "model.encoders", str(err)) from None
    for position, spec in enumerate(cfg.objectives):
        path = f"objectives[{position}]"
        objective_cls = registry.get("objective", spec.name).builder
        config = registry.config_of("objective", spec.name, spec.params, path, source)
        features = objective_cls.features_needed(config)
        missing = sorted(features - set(produced))
        if missing:
            encoders = sorted(set(produced.values())) or ["none"]
            raise ConfigError(
                source,
                path,
                f"objective {spec.name!r} needs the feature(s) {missing}, which no encoder of "
                f"model.encoders produces (encoders: {', '.join(encoders)})",
            )
        need = objective_cls.requirements(config)
        needs.append((f"{path} ({spec.name})", need))
        for name, encoder_need in by_encoder.items():
            if series_key(name) in features:
                # Encoder `name` runs at every prior step: its views (and its own priors)
                # are read there too.
                reach = Requirements(
                    priors=need.priors + encoder_need.priors,
                    prior_views=encoder_need.views | encoder_need.prior_views,
                )
                needs.append((f"{path} ({spec.name}, {series_key(name)})", reach))
    return needs


def requirements_of(cfg) -> Requirements:
    """Everything the recipe's encoders and objectives need from the batch (the union)."""
    return Requirements.union(need for _, need in component_needs(cfg))


def check_recipe(cfg, source: str | None) -> None:
    """Raise :class:`ConfigError` for the first problem of the module docstring."""
    from vlp.models.encoders import encoder_specs

    for who, need in component_needs(cfg, source):
        problems = unmet(need, cfg.data, who)
        if problems:
            key, message = problems[0]
            raise ConfigError(source, key, message)
    from vlp.registry import names

    for key in ("global_head", "text_head"):
        kind = getattr(cfg.model, key)
        if kind not in names("global_head"):
            raise ConfigError(
                source,
                f"model.{key}",
                f"unknown head {kind!r}; expected one of {sorted(names('global_head'))}",
            )
    groups = {*encoder_specs(cfg.model.encoders), "heads", "objectives"}
    for name, lr in cfg.optim.group_lr.items():
        if lr is not None and name not in groups:
            raise ConfigError(
                source,
                f"optim.group_lr.{name}",
                f"unknown parameter group; expected one of {sorted(groups)}",
            )
