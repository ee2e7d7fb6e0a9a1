"""composer models in timm's registry. `import composer.timm` registers every zoo model as
`composer_<name>` (`timm.create_model("composer_convnext_atto", num_classes=10)`);
`register(target, name)` registers a blueprint of one's own. Registering is lazy: an entry point
builds its model when timm calls it, nothing is planned at import (the zoo's names come from
parsing its files, `api.zoo_index`).

timm's arguments reach the model: `num_classes`, `img_size`, `in_chans`, `features_only`,
`out_indices`, `drop_rate` (the head's dropout before its classifier), `drop_path_rate`
(stochastic depth `linspace(0, rate)` over all blocks, as timm's models schedule it), `global_pool`
(the head's `global_pool` mode: avg, max or token), `dynamic_img_size`, `device`, `dtype`;
`checkpoint_path` is timm's (a safetensors or .pt state_dict); any other keyword sets a parameter
of the blueprint. `pretrained=True` is refused: composer models come without weights, and nothing
is downloaded."""

from __future__ import annotations

import sys
from pathlib import Path

from timm.models import register_model

from . import api
from . import resolve as _resolve
from .builder import build_module
from .diagnostics import did_you_mean, error
from .head_edits import POOLS, with_global_pool, with_head_dropout  # noqa: F401  (POOLS: timm's modes)

PREFIX = "composer_"
# timm keywords with no meaning for a blueprint: refused by name rather than taken for parameters
REFUSED = {"output_stride": "set the strides in the blueprint", "feature_cfg": "use out_indices",
           "pretrained_strict": "composer models come without pretrained weights"}


def register(target, name: str | None = None) -> str:
    """Put a blueprint in timm's registry: `target` is `file.arch` (one model) or `file.arch:MODEL`,
    `name` the registry name (default `composer_<model>`). The file is read (and its model looked
    up) now, the model built when timm creates it. Returns the name."""
    path, model = api.resolve_target(str(target))
    models = [m.name for m in _resolve.load(path).file.models]
    if model is None:
        if len(models) != 1:
            raise error("ambiguous", f"{path} defines {len(models)} models; name one as {path}:MODEL", None,
                        f"models: {', '.join(models)}" if models else None)
        model = models[0]
    elif model not in models:
        raise error("unknown-model", f"no model '{model}' in {path}", None,
                    did_you_mean(model, models) or f"models in this file: {', '.join(models) or '(none)'}")
    name = name or PREFIX + model
    if not name.isidentifier():
        raise error("value", f"a timm model name must be a Python identifier, got {name!r}")
    _add(f"{Path(path).resolve()}:{model}", name)
    return name


def _add(target: str, name: str) -> None:
    def entry(pretrained: bool = False, **kwargs):
        return create(target, pretrained=pretrained, architecture=name, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"The composer blueprint {target} (see composer.timm)."
    setattr(sys.modules[__name__], name, entry)
    register_model(entry)


def create(target: str, *, pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
           cache_dir=None, architecture: str | None = None, drop_rate: float | None = None,
           drop_path_rate: float | None = None, global_pool: str | None = None, features_only: bool = False,
           out_indices=None, dynamic_img_size: bool = False, device=None, dtype=None, seed: int | None = 0,
           **overrides):
    """Build blueprint `target` as timm's `create_model` asks for it (see the module's doc)."""
    if pretrained:
        raise error("pretrained", f"{architecture or target}: composer models come without pretrained weights "
                    "and nothing is downloaded", None,
                    "create it with pretrained=False; checkpoint_path=FILE loads a state_dict of your own")
    for key, hint in REFUSED.items():
        if key in overrides:
            raise error("value", f"{key} has no meaning for a composer model", None, hint)
    if drop_path_rate is not None:  # the blueprint's drop_path, as linspace(0, rate) (composer.build's keyword)
        overrides["drop_path_rate"] = drop_path_rate
    plan = api.load(target, **overrides)
    if not features_only:
        if drop_rate is not None:
            plan = with_head_dropout(plan, drop_rate)
        if global_pool is not None:
            plan = with_global_pool(plan, global_pool)
    model = build_module(plan, seed=seed, device=device, features_only=features_only, out_indices=out_indices,
                         dynamic_img_size=dynamic_img_size)
    if dtype is not None:
        model.to(dtype)
    cfg = dict(model.pretrained_cfg, architecture=architecture or plan.name)
    if isinstance(pretrained_cfg, dict):
        cfg.update(pretrained_cfg)
    cfg.update(pretrained_cfg_overlay or {})
    model.pretrained_cfg = cfg
    return model


for _name, _path in api.zoo_index().items():
    _add(f"{_path}:{_name}", PREFIX + _name)
