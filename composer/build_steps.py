"""The torch-free part of composer/builder.py: what a Sequence's program is compiled from, read off
a plan's steps. The instructions that run an op step (`op_instructions`), the tensors a body keeps
for itself (`own_tensors`), the modules `reuse` steps run (`reuse_targets`), the head's classifiers
(`classifier_steps`, `classifier_out`) and a program with modules left out (`program_without`)."""

from __future__ import annotations

from .plan import OpStep, ParallelStep, Plan, ResidualStep, ReuseStep, SaveStep, SeqStep
from .program import Call, GridCall, MapGrid, Parallel, Residual, StaticGrid, TensorCall
from .shapes import TensorRef


def op_instructions(s: OpStep, module) -> list:
    """The instructions that run op step `s`'s module and keep the grid its output tokens lie on:
    a module with `takes_grid` gets the grid (and one with `out_grid(grid)` tells the new one);
    tokens made from a map on the same grid take the map's; tokens put on another grid by a module
    that does not tell it take the grid inferred at the build size (`StaticGrid`: the size check
    refuses input sizes that would change it)."""
    # a module tied to its build grid keeps it (one that resamples its table gets the grid: the size
    # check admits other grids for it only with dynamic_img_size)
    takes = getattr(module, "takes_grid", False) and (s.op.runtime_grid(s.x) or getattr(s.op, "resamples", False))
    regrid = takes and hasattr(module, "out_grid")
    x, y = s.x, s.y
    if s.op.takes_tensors():  # named tensors in: the input one is loaded before (lowering), the others passed
        given = [getattr(s.op, a) for a in s.op.tensor_args if a != s.op.input_arg]
        keys = tuple(t.key for t in given if isinstance(t, TensorRef))  # a field may also take a mode
        out = [TensorCall(s.name, keys, takes, regrid)]
        # tokens put on a grid of the op's own (topk_tokens' kept tokens): the grid inferred here
        if not (regrid or s.op.regrids) and y.layout == "tokens" and y.spatial and x.layout == "tokens" \
                and x.spatial != y.spatial:
            out.append(StaticGrid(tuple(y.spatial)))
        return out
    on_grid = y.layout == "tokens" and bool(y.spatial) and not regrid
    from_map = on_grid and x.layout == "map" and y.spatial == x.spatial
    # a module that takes the grid and gets a map gets the map's own grid
    out = [MapGrid()] if from_map or (takes and x.layout == "map") else []
    out.append(GridCall(s.name, regrid) if takes else Call(s.name))
    if on_grid and not from_map and (x.layout not in ("tokens", "heads") or x.spatial != y.spatial):
        out.append(StaticGrid(tuple(y.spatial)))
    return out


def own_tensors(steps) -> tuple:
    """The keys of the tensors a body keeps for itself: a binding's (`q = ...` in a composite,
    keyed `NAME@DEPTH.q`) and the running tensor a binding holds (`~...`); not nested composites'."""
    keys, todo = [], list(steps)
    while todo:
        s = todo.pop()
        if s.__class__ is SaveStep and (s.tensor.startswith("~") or "@" in s.tensor) and s.tensor not in keys:
            keys.append(s.tensor)
        elif s.__class__ is not SeqStep:
            for child in s.children():
                todo += child
    return tuple(keys)


def reuse_targets(plan: Plan) -> set:
    """The paths of the modules the `reuse` steps of `plan` run."""
    return {s.target for sec in plan.sections for st in sec.steps for s in st.walk() if s.__class__ is ReuseStep}


def classifier_steps(steps):
    """The classifier ops of a section, inside its residuals and parallel branches too."""
    for s in steps:
        cls = s.__class__
        if cls is OpStep and s.op.classifier:
            yield s
        elif cls is ResidualStep or cls is ParallelStep:
            yield from classifier_steps([x for sub in s.children() for x in sub])


def program_without(prog, names) -> list:
    """A program with the named modules left out (the head without its classifiers: pre-logits)."""
    out = []
    for ins in prog:
        cls = ins.__class__
        if cls is Call and ins.name in names:
            continue
        if cls is Residual:  # never adds into the body: it may end with a module left out
            ins = Residual(program_without(ins.body, names), program_without(ins.shortcut, names), ins.drop_path)
        elif cls is Parallel:
            ins = ins._replace(branches=[program_without(b, names) for b in ins.branches])
        out.append(ins)
    return out


def classifier_out(steps) -> int:
    """The number of classes of the first classifier of a section (0: none)."""
    return next((s.op.num_classes for s in classifier_steps(steps)), 0)
