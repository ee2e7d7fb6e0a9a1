"""The values of a model's statements while it is resolved (composer/resolve.py): where a value is
used (`Ctx`) and per-block values made this block's (`concretize`), a statement's value whose list
elements may name their layers (`layer_value`, `Aliased`), the name a layer takes from its
expression (`layer_name`), a `reuse` path, a parallel's merge and split, and the error of a name
defined twice (`twice`)."""

from __future__ import annotations

from dataclasses import dataclass

from . import ast
from .diagnostics import ComposerError, did_you_mean, error
from .expr import Cycle, Ref, Schedule, Scope, evaluate, make_ref
from .source import Span
from .speed import PER_BLOCK

MERGES = ("concat", "add", "mean", "mul", "sub", "tokens")  # tokens: concatenate along the token axis


@dataclass(frozen=True)
class Aliased:
    """The value of a list element `x as name` of a statement's value: the layer and its name."""

    value: object
    alias: str
    span: Span


class _LayerValue(ast.NodeVisitor):
    """`layer_value(expr, scope)`: the value of a statement's (or block's) expression, whose list
    elements may name their layers: `[conv(8, 3) as proj, relu]`, `c ? [patch_merging(d) as merge]
    : none`. Only a list or a conditional can hold such names (`ast.has_layer_names`)."""

    def visit_Named(self, expr: ast.Named, scope: Scope):
        return Aliased(self.visit(expr.expr, scope), expr.alias, expr.span)

    def visit_ListExpr(self, expr: ast.ListExpr, scope: Scope):
        if not ast.has_layer_names(expr):
            return evaluate(expr, scope)
        return [self.visit(x, scope) for x in expr.items]

    def visit_Conditional(self, expr: ast.Conditional, scope: Scope):
        if not ast.has_layer_names(expr):
            return evaluate(expr, scope)
        return self.visit(expr.then if evaluate(expr.test, scope) else expr.orelse, scope)  # tested as evaluate does

    def _value(self, expr, scope: Scope):
        return evaluate(expr, scope)

    visit_Literal = visit_Name = visit_ListComp = visit_Index = visit_Call = visit_BinOp = visit_UnaryOp = _value


_LAYER_VALUE, _LAYER_VALUE_METHODS = _LayerValue(), _LayerValue._methods


def layer_value(expr, scope: Scope):
    """`_LayerValue().visit(expr, scope)`, its dispatch inlined (every statement's value is one)."""
    return (_LAYER_VALUE_METHODS.get(expr.__class__) or _LayerValue._method_for(expr.__class__))(
        _LAYER_VALUE, expr, scope)


def layer_name(expr) -> str | None:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name):
        return expr.func.id
    return None


@dataclass
class Ctx:
    """Where a value is being used: the block's index in its stage and in the model."""

    stage_block: int | None = None
    block: int | None = None
    total: int = 0
    drop_path: float = 0.0
    depth: int = 0
    scope: str = ""  # inside a composite: the prefix that keys its own tensors apart from its caller's


def concretize(value, ctx: Ctx, span: Span):
    """Replace per-block values (cycles, schedules) by this block's value, recursively."""
    cls = value.__class__
    if cls in _PLAIN:
        return value
    if cls is Ref:
        args = value.args
        for i, (key, v) in enumerate(args):  # `span` is only passed along
            if v.__class__ in _PLAIN:
                continue
            c = concretize(v, ctx, span)
            if c is not v:  # something per-block inside: a new reference, the other arguments in order
                out = list(args[:i])
                out.append((key, c))
                out += [(k, concretize(w, ctx, span)) for k, w in args[i + 1:]]
                return make_ref(value.name, value.kind, value.target, tuple(out), value.spans, value.span)
        return value  # nothing per-block inside: the same (frozen) reference
    if isinstance(value, (Cycle, Schedule)):
        PER_BLOCK.n += 1
    if isinstance(value, Cycle):
        if ctx.stage_block is None:
            raise error("per-block", "alternate(...) varies per block, but is used outside a stage's blocks",
                        value.span, "use it inside a `repeat` of a stage")
        return concretize(value.values[ctx.stage_block % len(value.values)], ctx, span)
    if isinstance(value, Schedule):
        if ctx.block is None:
            raise error("per-block", "linspace(...) varies per block, but is used outside a stage's blocks",
                        value.span, "use it for `drop_path = linspace(a, b)` or inside a `repeat` of a stage")
        return value.at(ctx.block, ctx.total)
    if isinstance(value, list):
        return [concretize(v, ctx, span) for v in value]
    return value


_PLAIN = frozenset({int, float, str, bool, type(None)})


def twice(stmt: ast.Let) -> ComposerError:
    """A second `let` of one name in one scope: the first would be silently lost."""
    return error("redefinition", f"'{stmt.name}' is already defined here", stmt.span,
                 "a name holds one value in a block or model: give the second value another name")


def reuse_path(stmt: ast.Reuse, scope: Scope) -> str:
    """The module path of `reuse`, each part `{NAME}` replaced by the value of that int variable
    (`reuse stages.{i}.blocks.0.cpe` in a composite that takes `i`)."""
    def value(part: str) -> str:
        if not part.startswith("{"):
            return part
        name = part[1:-1]
        try:
            v = scope.lookup(name)
        except KeyError:
            raise error("undefined", f"`reuse {stmt.path}`: no variable '{name}' here", stmt.span,
                        "a part {NAME} of a reuse path names an int parameter or let") from None
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise error("type", f"`reuse {stmt.path}`: '{name}' is {v!r}, not an index (an int >= 0)", stmt.span)
        return str(v)
    return ".".join(value(p) for p in stmt.path.split("."))


def parallel_split(stmt, scope, n: int, what: str) -> list | None:
    """A parallel's merge checked and its `split` evaluated: one part per branch."""
    if stmt.merge not in MERGES:
        raise error("unknown-merge", f"unknown merge '{stmt.merge}'", stmt.span,
                    did_you_mean(stmt.merge, MERGES) or f"merges: {', '.join(MERGES)}")
    split = None
    for k, v, s in stmt.kwargs:
        if k != "split":
            raise error("unknown-parameter", f"parallel has no parameter '{k}'", s, "its parameter is: split")
        split = evaluate(v, scope)
        if not isinstance(split, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in split):
            raise error("type", f"split must be a list of positive ints, got {split!r}", v.span)
        if len(split) != n:
            raise error("value", f"split has {len(split)} parts but there are {n} {what}", v.span,
                        "give one part per branch" if what == "branches" else "give one part per value of the loop")
    return split

