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
from dataclasses import replace
from pathlib import Path

from timm.models import register_model

from . import api
from . import resolve as _resolve
from .builder import build_module
from .diagnostics import did_you_mean, error
from .ops.act import Dropout
from .plan import OpStep, ParallelStep, Plan, ResidualStep, SeqStep
from .shapes import ShapeError

PREFIX = "composer_"
POOLS = ("avg", "max", "token")
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
    plan = api.load(target, **overrides)
    if drop_path_rate is not None:
        plan = with_drop_path(plan, drop_path_rate)
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


def _rate(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise error("value", f"{what} must be a number from 0 up to (not including) 1, got {value!r}")
    return float(value)


def with_drop_path(plan: Plan, rate) -> Plan:
    """The plan with stochastic depth `linspace(0, rate)` over all its blocks (timm's
    `drop_path_rate`), replacing the blueprint's `drop_path`: every residual of block k of N at
    `rate * k / (N - 1)`."""
    rate = _rate("drop_path_rate", rate)
    n = sum(len(st.blocks) for st in plan.stages)
    rates = [rate * k / (n - 1) if n > 1 else 0.0 for k in range(n)]
    it = iter(rates)
    stages = [replace(st, blocks=[_at_rate(b, next(it)) for b in st.blocks]) for st in plan.stages]
    return replace(plan, stages=stages, drop_path=rates)


def _at_rate(section, p: float):
    def steps(items):
        return [replace(_nested(s, steps), drop_path=p) if s.__class__ is ResidualStep else _nested(s, steps)
                for s in items]

    return replace(section, steps=steps(section.steps), drop_path=p)


def _nested(s, steps, seq: bool = True):
    """Step `s` with `steps` applied to its nested step lists (a composite's body only with `seq`)."""
    if s.__class__ is ResidualStep:
        return replace(s, body=steps(s.body), shortcut=steps(s.shortcut))
    if s.__class__ is ParallelStep:
        return replace(s, branches=[steps(b) for b in s.branches])
    if s.__class__ is SeqStep and seq:
        return replace(s, body=steps(s.body))
    return s


def with_head_dropout(plan: Plan, rate) -> Plan:
    """The plan with dropout at `rate` right before each classifier of the head (timm's
    `drop_rate`): the dropout already there takes the rate, or one named `head_drop` is added."""
    rate = _rate("drop_rate", rate)
    found = []

    def steps(items):
        out = []
        for s in items:
            if s.__class__ is OpStep and s.op.classifier:
                found.append(s)
                prev = out[-1] if out else None
                if prev is not None and prev.__class__ is OpStep and prev.op.name == "dropout":
                    out[-1] = replace(prev, op=prev.op.model_copy(update={"p": rate}))
                elif rate:
                    name = "head_drop"
                    while any(getattr(o, "name", None) == name for o in items):
                        name += "_"
                    path = s.path.rpartition(".")[0]
                    out.append(OpStep(f"{path}.{name}" if path else name, s.x, s.x, s.span, name, Dropout(p=rate)))
            else:
                s = _nested(s, steps, seq=False)
            out.append(s)
        return out

    head = replace(plan.head, steps=steps(plan.head.steps))
    if not found and rate:
        raise error("value", f"drop_rate={rate}: the head of '{plan.name}' has no classifier to drop before")
    return replace(plan, head=head)


def with_global_pool(plan: Plan, mode) -> Plan:
    """The plan with the head's `global_pool` ops pooling by `mode` (timm's `global_pool`)."""
    if mode not in POOLS:
        raise error("value", f"global_pool must be one of {', '.join(POOLS)} for a composer model, got {mode!r}")
    found = []

    def steps(items):
        out = []
        for s in items:
            if s.__class__ is OpStep and s.op.name == "global_pool":
                op = s.op.model_copy(update={"mode": mode})
                try:
                    op.infer(s.x)
                except ShapeError as e:
                    raise error("value", f"global_pool={mode!r} does not fit '{plan.name}': {e}") from None
                found.append(s)
                s = replace(s, op=op)
            else:
                s = _nested(s, steps)
            out.append(s)
        return out

    head = replace(plan.head, steps=steps(plan.head.steps))
    if not found:
        raise error("value", f"global_pool={mode!r}: the head of '{plan.name}' has no global_pool op to set")
    return replace(plan, head=head)


for _name, _path in api.zoo_index().items():
    _add(f"{_path}:{_name}", PREFIX + _name)
