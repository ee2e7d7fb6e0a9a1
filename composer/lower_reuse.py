"""`reuse` while a model is lowered (composer/lower.py): the resolved part of a model at a module
path (`find_module`), and the check that a reused module's weights fit every input it gets where
it is reused (`check_reuses`)."""

from __future__ import annotations

from .diagnostics import error
from .plan import OpStep, Plan
from .resolved import Model, OpNode, ParallelNode, ResidualNode, SubSeq


def check_reuses(plan: Plan, reuses: list) -> None:
    """A reused module runs with the weights built for its first input: every op in it must get the
    same channels, and the same parameter count (grid-sized tables), where it is reused."""
    built = {s.path: s for sec in plan.sections for st in sec.steps for s in st.walk() if s.__class__ is OpStep}
    for r in reuses:
        for s in (t for st in r.reused for t in st.walk()):
            orig = built.get(s.path) if s.__class__ is OpStep else None
            if orig is None:
                continue
            if (s.x.channels, s.y.channels) != (orig.x.channels, orig.y.channels) \
                    or s.op.params(s.x, s.y) != orig.op.params(orig.x, orig.y):
                raise error("shape", f"`reuse {r.target}`: {s.path} was built for input {orig.x} but gets {s.x} here",
                            r.span, "a reused module must get inputs its weights fit: the same channels, and the "
                            "same grid where its parameters are sized by it")


def find_module(model: Model, path: str):
    """The resolved part of `model` at a state_dict module path: a Stage, a list of items (a section
    or block), or one item; a string saying what is missing when there is none."""
    parts = path.split(".")
    head, rest = parts[0], parts[1:]
    if head in ("stem", "head"):
        items = model.stem if head == "stem" else model.head
        where = head
    elif head == "stages":
        if not rest or not rest[0].isdigit() or int(rest[0]) >= len(model.stages):
            return f"it has {len(model.stages)} stages (stages.0 .. stages.{len(model.stages) - 1})"
        stage = model.stages[int(rest[0])]
        where, rest = f"stages.{rest[0]}", rest[1:]
        if not rest:
            return stage
        if rest[0] == "blocks":
            if len(rest) < 2 or not rest[1].isdigit() or int(rest[1]) >= len(stage.blocks):
                return f"{where} has {len(stage.blocks)} blocks"
            items, where, rest = stage.blocks[int(rest[1])].items, f"{where}.blocks.{rest[1]}", rest[2:]
        elif rest[0] in ("downsample", "norm") and getattr(stage, rest[0]):
            items, where, rest = getattr(stage, rest[0]), f"{where}.{rest[0]}", rest[1:]
        else:
            return f"{where} has no '{rest[0]}'"
    else:
        return f"a path starts with stem, stages or head, not '{head}'"
    if not rest:
        return items
    for name in rest:
        item = named_item(items, name)
        if item is None:
            return f"{where} has no layer '{name}'"
        where = f"{where}.{name}"
        items = item.items if isinstance(item, SubSeq) else None
        if items is None and name != rest[-1]:
            return f"{where} is an op, with no layers inside"
    return item


def named_item(items: list, name: str):
    """The item called `name` in one naming scope (residual bodies and branches share their scope)."""
    for it in items:
        if isinstance(it, (OpNode, SubSeq)) and it.name == name:
            return it
        inner = [*it.body, *it.shortcut] if isinstance(it, ResidualNode) else \
            [s for b in it.branches for s in b] if isinstance(it, ParallelNode) else []
        found = named_item(inner, name) if inner else None
        if found is not None:
            return found
    return None
