"""The head of a plan edited as timm's keywords ask (pure Python, no torch): `drop_rate` (dropout
before each classifier: `with_head_dropout`) and `global_pool` (the pooling mode of the head's
`global_pool` ops: `with_global_pool`). Used by the timm bridge (composer/timm.py) and by
`reset_classifier(num_classes, global_pool)` of a built model."""

from __future__ import annotations

from dataclasses import replace

from .diagnostics import ComposerError, error
from .ops.act import Dropout
from .plan import OpStep, ParallelStep, Plan, ResidualStep, SeqStep
from .shapes import ShapeError

POOLS = ("avg", "max", "token")
NO_TARGET = "head-edit"  # the code of "the head has no classifier / global_pool to edit"


def _rate(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise error("value", f"{what} must be a number from 0 up to (not including) 1, got {value!r}")
    return float(value)


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
        raise error(NO_TARGET, f"drop_rate={rate}: the head of '{plan.name}' has no classifier to drop before")
    return replace(plan, head=head, head_edits={**plan.head_edits, "drop_rate": rate})


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
        raise error(NO_TARGET, f"global_pool={mode!r}: the head of '{plan.name}' has no global_pool op to set")
    return replace(plan, head=head, head_edits={**plan.head_edits, "global_pool": mode})


def with_head_edits(plan: Plan, edits: dict) -> Plan:
    """The plan with the edits another plan recorded in `head_edits` (a saved model's). An edit
    whose target is gone (overrides that removed the classifier or the pooling) has nothing to do."""
    for key, edit in (("drop_rate", with_head_dropout), ("global_pool", with_global_pool)):
        if key in edits:
            try:
                plan = edit(plan, edits[key])
            except ComposerError as e:
                if e.code != NO_TARGET:  # a bad value in config.json, not a missing target
                    raise
    return plan
