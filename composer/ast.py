"""The blueprint AST: what `parse` produces from .arch text or YAML, with a span on every node."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Union

from .source import Span

# ---- expressions ------------------------------------------------------------


@dataclass(frozen=True)
class Literal:
    value: object  # int, float, str, bool or None
    span: Span


@dataclass(frozen=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True)
class ListExpr:
    items: tuple
    span: Span


@dataclass(frozen=True)
class ListComp:
    """`[expr for name in items]`: bounded by the list, so still total."""

    expr: "Expr"
    var: str
    items: "Expr"
    span: Span


@dataclass(frozen=True)
class Index:
    target: "Expr"
    index: "Expr"
    span: Span


@dataclass(frozen=True)
class Call:
    func: "Expr"
    args: tuple  # of Expr
    kwargs: tuple  # of (name, Expr, Span)
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass(frozen=True)
class UnaryOp:
    op: str  # "-" or "not"
    operand: "Expr"
    span: Span


@dataclass(frozen=True)
class Conditional:
    test: "Expr"
    then: "Expr"
    orelse: "Expr"
    span: Span


@dataclass(frozen=True)
class Named:
    """`expr as name`: an element of a list literal that is a statement's (or a block's) value,
    naming its layer: `[conv(8, 3) as proj, relu]`. Anywhere else it is an error (`stray_names`)."""

    expr: "Expr"
    alias: str
    span: Span


Expr = Union[Literal, Name, ListExpr, ListComp, Index, Call, BinOp, UnaryOp, Conditional, Named]


# ---- statements -------------------------------------------------------------


@dataclass(frozen=True)
class Let:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class Assign:
    """`name = expr` at model level: a setting (drop_path, reference, paper) or a variant's override."""

    name: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class Apply:
    """An expression applied to the running tensor, optionally named: `conv(64, 3) as stem_conv`."""

    expr: Expr
    alias: str | None
    span: Span


@dataclass(frozen=True)
class Residual:
    args: tuple  # (positional Exprs, kwargs)
    kwargs: tuple
    body: tuple
    span: Span


@dataclass(frozen=True)
class Parallel:
    merge: str
    args: tuple
    kwargs: tuple
    branches: tuple  # each a tuple of body statements
    span: Span


@dataclass(frozen=True)
class Save:
    """`save name`: remember the running tensor under `name`."""

    name: str
    span: Span


@dataclass(frozen=True)
class Load:
    """`from name`: continue from a tensor saved earlier (a cross connection)."""

    name: str
    span: Span


@dataclass(frozen=True)
class Bind:
    """`q = linear(64)`: apply `expr` (or the statements of `body`) to the running tensor and name
    the result a tensor `q`; the running tensor stays what it was. Several names,
    `q, k, v = split_heads(4)`: one per part of a splitting op."""

    names: tuple
    expr: Expr | None
    alias: str | None
    body: tuple | None
    span: Span


@dataclass(frozen=True)
class Reuse:
    """`reuse stages.0`: run the module at that state_dict path again, with the same weights."""

    path: str
    span: Span


@dataclass(frozen=True)
class ParallelFor:
    """`parallel MERGE(split = ...) for var in items { body }` (or `in start..stop`): one branch
    per value, each the statements of `body` with `var` bound to the value."""

    merge: str
    args: tuple
    kwargs: tuple
    var: str
    items: Expr  # the list, or the start of a range
    stop: Expr | None  # the end of a range (exclusive), or None
    body: tuple
    span: Span


Body = Union[Let, Apply, Residual, Parallel, ParallelFor, Save, Load, Reuse, Bind]


@dataclass(frozen=True)
class Section:
    """`stem`, `head` or `downsample`: a statement list."""

    kind: str
    body: tuple
    span: Span


@dataclass(frozen=True)
class Repeat:
    count: Expr | None  # None: a single `block`
    var: str | None
    block: Expr
    span: Span


@dataclass(frozen=True)
class Stage:
    items: tuple  # Let, Section(downsample), Repeat, Reuse
    span: Span
    loop_var: str | None = None
    start: Expr | None = None
    stop: Expr | None = None


@dataclass(frozen=True)
class Input:
    expr: Expr
    span: Span


@dataclass(frozen=True)
class Param:
    name: str
    default: Expr | None
    span: Span


@dataclass(frozen=True)
class ModelDef:
    name: str
    params: tuple
    base: str | None
    body: tuple  # Input, Let, Assign, Section, Stage
    span: Span
    file: str = ""


@dataclass(frozen=True)
class CompositeDef:
    kind: str  # "block" or "mixer"
    name: str
    params: tuple
    body: tuple
    span: Span
    file: str = ""
    doc: str = ""


@dataclass(frozen=True)
class Import:
    path: str
    span: Span


@dataclass
class File:
    path: str
    imports: list = field(default_factory=list)
    models: list = field(default_factory=list)
    composites: list = field(default_factory=list)
    doc: str = ""


def shape(x):
    """An AST without its spans and file names (for comparing two parses)."""
    if isinstance(x, (list, tuple)):
        return tuple(shape(y) for y in x)
    if type(x).__name__ == "Span":
        return None
    if is_dataclass(x) and not isinstance(x, type):
        return (type(x).__name__,) + tuple(
            (f.name, shape(getattr(x, f.name))) for f in fields(x) if f.name not in ("span", "file", "path")
            or (f.name == "path" and isinstance(x, Import)))
    if isinstance(x, float):
        return ("float", x)
    return x


# ---- walking the tree -------------------------------------------------------


class NodeVisitor:
    """A walker over AST nodes, statements or expressions, as jinja2's: `visit(node, *args)` calls
    `self.visit_<ClassName>(node, *args)`. Adding a statement or an expression means a grammar
    rule, a node class above and one visit method per walker; a walker that lacks one fails here,
    naming both. A walker for which several classes are alike says so by name
    (`visit_Name = visit_Call = _leaf`), so a new class is never taken for one of them silently.

    The method for each node class is looked up once per walker class and kept (`resolve` visits
    every statement of the zoo on the hot path of `composer check`)."""

    _methods: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._methods = {}  # node class -> the unbound visit method, filled on first use

    def visit(self, node, *args):
        method = self._methods.get(node.__class__)
        if method is None:
            method = self._method_for(node.__class__)
        return method(self, node, *args)

    @classmethod
    def _method_for(cls, node_class: type):
        method = getattr(cls, "visit_" + node_class.__name__, None)
        if method is None:
            raise NotImplementedError(f"{cls.__name__} cannot walk a {node_class.__name__} node: "
                                      f"it has no visit_{node_class.__name__} method")
        cls._methods[node_class] = method
        return method


# ---- layer names ----------------------------------------------------------------------------


class _LayerNames(NodeVisitor):
    """`visit(e, out)`: the `Named` elements of the statement value `e`, appended to `out`. They
    stand in a list literal that is the value (or is nested in one), or in a branch of a
    conditional that is; nothing else holds names of layers."""

    def visit_ListExpr(self, e: ListExpr, out: list) -> None:
        for x in e.items:
            if x.__class__ is Named:
                out.append(x)
            else:
                self.visit(x, out)

    def visit_Conditional(self, e: Conditional, out: list) -> None:
        self.visit(e.then, out)
        self.visit(e.orelse, out)

    def _none(self, e, out: list) -> None:
        pass

    # `x as name` as the value itself names no layer (the parser reports it as stray)
    visit_Literal = visit_Name = visit_ListComp = visit_Index = visit_Call = _none
    visit_BinOp = visit_UnaryOp = visit_Named = _none


class _HasLayerNames(NodeVisitor):
    """`visit(e)`: does the statement value `e` name any of its layers? `_LayerNames`, stopping at
    the first (cheap: it is asked of every statement that `resolve` evaluates)."""

    def visit_ListExpr(self, e: ListExpr) -> bool:
        return any(x.__class__ is Named or has_layer_names(x) for x in e.items)

    def visit_Conditional(self, e: Conditional) -> bool:
        return has_layer_names(e.then) or has_layer_names(e.orelse)

    def _no(self, e) -> bool:
        return False

    visit_Literal = visit_Name = visit_ListComp = visit_Index = visit_Call = _no
    visit_BinOp = visit_UnaryOp = visit_Named = _no


_LAYER_NAMES, _HAS_LAYER_NAMES = _LayerNames(), _HasLayerNames()


def layer_names(e, out: list | None = None) -> list:
    """The `Named` elements of `e` that stand where a statement's value names layers: in a list
    literal that is the value (or is nested in one), or in a branch of a conditional that is."""
    out = [] if out is None else out
    _LAYER_NAMES.visit(e, out)
    return out


def has_layer_names(e) -> bool:
    """Does the statement value `e` name any of its layers (cheap: lists and conditionals only)?
    `_HasLayerNames().visit(e)`, its dispatch inlined (`resolve` asks it of statement values)."""
    return (_HasLayerNames._methods.get(e.__class__) or _HasLayerNames._method_for(e.__class__))(_HAS_LAYER_NAMES, e)
