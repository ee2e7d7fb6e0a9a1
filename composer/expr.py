"""The expression evaluator: a small total language over numbers, strings, lists and op references.

No `eval`, no loops, no attribute access: every expression terminates, and every failure is a
located `ComposerError`.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from . import ast
from .budget import MAX_BITS, STATE as _BUDGET, charge, exhausted, product_bits, too_big
from .diagnostics import did_you_mean, error
from .shapes import TensorRef, frozen_instance
from .source import Span


@dataclass(frozen=True)
class Ref:
    """An op, part or composite with its arguments bound by name; applied later to a tensor."""

    name: str
    kind: str  # "op", "part" or "composite"
    target: Any  # an Op class or an ast.CompositeDef
    args: tuple  # ((name, value), ...)
    spans: tuple  # ((name, Span), ...) where each argument was written
    span: Span

    def arg_span(self, name: str) -> Span:
        return dict(self.spans).get(name, self.span)


def make_ref(name: str, kind: str, target, args: tuple, spans: tuple, span) -> Ref:
    """`Ref(name, kind, target, args, spans, span)` without the frozen dataclass constructor's
    per-field `object.__setattr__` (evaluation makes tens of thousands in a check of the zoo)."""
    return frozen_instance(Ref, {"name": name, "kind": kind, "target": target, "args": args, "spans": spans,
                                 "span": span})


@dataclass(frozen=True)
class Cycle:
    """`alternate(a, b, ...)`: the value for block k of a stage is values[k % len(values)]."""

    values: tuple
    span: Span


@dataclass(frozen=True)
class Schedule:
    """`linspace(start, end)`: block k of N blocks in the model gets start + (end - start) * k / (N - 1)."""

    start: float
    end: float
    span: Span

    def at(self, index: int, total: int) -> float:
        if total <= 1:
            return float(self.start)
        return self.start + (self.end - self.start) * index / (total - 1)


@dataclass(frozen=True)
class InputSpec:
    kind: str  # image, signal, volume
    channels: int
    size: tuple
    span: Span


class Scope:
    """Variables visible to an expression, innermost first; `names` resolves definitions and ops."""

    def __init__(self, names: "Namespace", values: dict | None = None, parent: "Scope | None" = None):
        self.names, self.values, self.parent = names, dict(values or {}), parent

    def child(self, values: dict | None = None) -> "Scope":
        return Scope(self.names, values, self)

    def lookup(self, name: str):
        scope = self
        while scope is not None:
            if name in scope.values:
                return scope.values[name]
            scope = scope.parent
        raise KeyError(name)

    def visible(self) -> set[str]:
        out, scope = set(), self
        while scope is not None:
            out |= set(scope.values)
            scope = scope.parent
        return out


@dataclass
class Namespace:
    composites: dict = field(default_factory=dict)  # name -> ast.CompositeDef
    ops: dict = field(default_factory=dict)  # name -> Op class

    def all_names(self) -> set[str]:
        return set(self.composites) | set(self.ops) | set(BUILTINS)


def from_python(value: Any) -> Any:
    """A value given from Python (`build(..., depths=...)`) as the language's: any sequence but a
    string (tuple, OmegaConf's ListConfig, ...) as a list, any mapping (DictConfig, ...) as a dict,
    integers and reals of other types (numpy's) as int and float, recursively; others as they are."""
    if value is None or isinstance(value, (bool, str)) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        return {from_python(k): from_python(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [from_python(v) for v in value]
    if hasattr(value, "__array__") and getattr(value, "shape", None) == ():  # a 0-d array (numpy.bool_ ...)
        item = value.item()
        return item if type(item) in (bool, int, float) else value
    return value


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if value is None:
        return "none"
    if isinstance(value, Ref):
        return f"{value.kind} '{value.name}'"
    if isinstance(value, TensorRef):
        return f"tensor '{value.name}'"
    if isinstance(value, (list, tuple)):
        return "list"
    return {int: "int", float: "float", str: "string"}.get(type(value), type(value).__name__)


def _num(value, span: Span, what: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error("type", f"{what} needs a number, got {type_name(value)}", span)
    return value


def _divide(a, b):
    if b == 0:
        raise ZeroDivisionError
    if isinstance(a, int) and isinstance(b, int) and a % b == 0:
        return a // b  # exact division of integers stays an integer: `dim / heads`
    return a / b


_ARITH: dict[str, Callable] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": _divide,
    "//": operator.floordiv, "%": operator.mod, "**": operator.pow,
}
_COMPARE: dict[str, Callable] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def evaluate(node: ast.Expr, scope: Scope) -> Any:
    """Evaluate an expression node in `scope`, by its function in `_EVAL`."""
    try:
        method = _EVAL[node.__class__]
    except KeyError:  # a node class without one (a `Named` is the parser's to reject): fail here, naming it
        raise NotImplementedError(f"evaluate cannot walk a {node.__class__.__name__} node: "
                                  f"_EVAL has no function for it") from None
    budget = _BUDGET  # one unit of the check's work budget per node evaluated (composer/budget.py)
    budget.left -= 1
    if budget.left < 0:
        budget.left = 0
        raise exhausted(node.span, "evaluating this")
    return method(node, scope)


def _eval_literal(node: ast.Literal, scope):
    return node.value


def _eval_name(node: ast.Name, scope: Scope):
    name, inner = node.id, scope
    while inner is not None:
        values = inner.values
        if name in values:
            return values[name]
        inner = inner.parent
    return _global_name(node, scope)


def _global_name(node: ast.Name, scope: Scope):
    """A name no scope binds: a definition or an op, else the located error."""
    names = scope.names
    if node.id in names.composites:
        return make_ref(node.id, "composite", names.composites[node.id], (), (), node.span)
    if node.id in names.ops:
        cls = names.ops[node.id]
        return make_ref(node.id, cls.kind, cls, (), (), node.span)
    if node.id in BUILTINS:
        raise error("type", f"'{node.id}' is a function: call it with arguments", node.span)
    hint = did_you_mean(node.id, scope.visible() | names.all_names())
    op_hint = did_you_mean(node.id, set(names.ops) | set(names.composites))
    if op_hint and not did_you_mean(node.id, scope.visible()):  # most likely a misspelt op or block: say so
        raise error("unknown-op", f"unknown op '{node.id}'", node.span, op_hint)
    raise error("unknown-name", f"unknown name '{node.id}'", node.span,
                hint or "it is not a variable, op or block here; `composer list ops` shows the ops")


def _eval_list(node: ast.ListExpr, scope):
    return [evaluate(item, scope) for item in node.items]


def _eval_list_comp(node: ast.ListComp, scope: Scope):
    items = evaluate(node.items, scope)
    if not isinstance(items, list):
        raise error("type", f"a list comprehension needs a list, got {type_name(items)}", node.items.span)
    charge(6 * len(items), node.span, "this list comprehension")  # a scope per item, as much work as 6 nodes
    return [evaluate(node.expr, scope.child({node.var: item})) for item in items]


def _eval_index(node: ast.Index, scope):
    target, index = evaluate(node.target, scope), evaluate(node.index, scope)
    if not isinstance(target, list):
        raise error("type", f"cannot index {type_name(target)}", node.target.span)
    if isinstance(index, bool) or not isinstance(index, int):
        raise error("type", f"list index must be an int, got {type_name(index)}", node.index.span)
    if not -len(target) <= index < len(target):
        raise error("index", f"index {index} is out of range for a list of {len(target)}", node.index.span,
                    f"valid indices are 0..{len(target) - 1}")
    return target[index]


def _eval_binop(node: ast.BinOp, scope):
    if node.op in ("and", "or"):
        left = evaluate(node.left, scope)
        if node.op == "and":
            return evaluate(node.right, scope) if left else left
        return left if left else evaluate(node.right, scope)
    left, right = evaluate(node.left, scope), evaluate(node.right, scope)
    if node.op in _COMPARE:
        if node.op in ("==", "!="):
            if isinstance(left, (list, str)):  # a comparison walks the list
                charge(len(left), node.span, "this comparison")
            return _COMPARE[node.op](left, right)
        _num(left, node.left.span, f"'{node.op}'")
        _num(right, node.right.span, f"'{node.op}'")
        return _COMPARE[node.op](left, right)
    if node.op == "+" and (isinstance(left, list) and isinstance(right, list)
                           or isinstance(left, str) and isinstance(right, str)):
        charge(len(left) + len(right), node.span, "the list or string made here")
        return left + right
    if node.op == "*" and isinstance(left, list) and isinstance(right, int) and not isinstance(right, bool):
        charge(len(left) * max(right, 0), node.span, "the list made here")  # before it is made
        return left * right
    _num(left, node.left.span, f"'{node.op}'")
    _num(right, node.right.span, f"'{node.op}'")
    if node.op == "**" and abs(right) > 64:
        raise error("value", f"exponent {right} is too large", node.right.span)
    if left.__class__ is int and right.__class__ is int:  # refuse a huge product or power before computing it
        if node.op == "*" and product_bits(left, right) > MAX_BITS + 1 or \
                node.op == "**" and right > 0 and (abs(left).bit_length() - 1) * right > MAX_BITS:
            raise error("too-large", "too large: this number", node.span, "numbers must stay below 1.8e+308 in magnitude")
    try:
        return too_big(_ARITH[node.op](left, right), node.span)
    except ZeroDivisionError:
        raise error("value", "division by zero", node.span) from None
    except OverflowError:  # a float power beyond the float range
        raise error("too-large", "too large: this number", node.span, "numbers must stay below 1.8e+308 in magnitude")



def _eval_unary(node: ast.UnaryOp, scope):
    value = evaluate(node.operand, scope)
    if node.op == "not":
        return not value
    return -_num(value, node.operand.span, "'-'")


def _eval_conditional(node: ast.Conditional, scope):
    return evaluate(node.then, scope) if evaluate(node.test, scope) else evaluate(node.orelse, scope)


def _eval_call(node: ast.Call, scope: Scope):
    args = [evaluate(a, scope) for a in node.args]
    kwargs = {name: evaluate(value, scope) for name, value, _ in node.kwargs}
    func = node.func
    if func.__class__ is ast.Name:
        callee = _find(func.id, scope)
        if func.id in BUILTINS and (callee is _MISSING or callee is None):
            return BUILTINS[func.id](node, args, kwargs)
        if callee is _MISSING:
            callee = _global_name(func, scope)  # a definition or an op, else the located error
    else:
        callee = evaluate(func, scope)
    if not isinstance(callee, Ref):
        what = f"'{node.func.id}'" if isinstance(node.func, ast.Name) else "this"
        raise error("type", f"cannot call {what}: it is a value of type {type_name(callee)} {_short_value(callee)}"
                    .rstrip(), node.func.span,
                    "only ops, blocks, mixers and built-in functions take arguments")
    if callee.args:
        raise error("type", f"'{callee.name}' already has its arguments", node.func.span)
    names = signature(callee)
    bound, spans = {}, {}
    if len(args) > len(names):
        raise error("arguments", f"'{callee.name}' takes at most {len(names)} positional argument(s), got {len(args)}",
                    node.args[len(names)].span, f"its parameters are: {', '.join(names) or '(none)'}")
    for name, value, arg in zip(names, args, node.args):
        bound[name], spans[name] = value, arg.span
    for (name, _, span), value in zip(node.kwargs, kwargs.values()):
        if name not in names:
            hint = did_you_mean(name, names) or f"its parameters are: {', '.join(names) or '(none)'}"
            raise error("unknown-parameter", f"'{callee.name}' has no parameter '{name}'", span, hint)
        if name in bound:
            raise error("arguments", f"argument '{name}' of '{callee.name}' given twice", span,
                        f"the positional arguments already give: {', '.join(names[:len(args)])}")
        bound[name], spans[name] = value, span
    return make_ref(callee.name, callee.kind, callee.target, tuple(bound.items()), tuple(spans.items()), node.span)


def _short_value(value) -> str:
    text = repr(value)
    return f"({text})" if len(text) < 30 and not isinstance(value, Ref) else ""


_MISSING = object()


def _find(name: str, scope: Scope):
    """`scope.lookup(name)`, or `_MISSING` (no exception: most names looked up are ops)."""
    while scope is not None:
        values = scope.values
        if name in values:
            return values[name]
        scope = scope.parent
    return _MISSING


def signature(ref: Ref) -> list[str]:
    if ref.kind == "composite":
        return [p.name for p in ref.target.params]
    fields = _FIELDS.get(ref.target)
    if fields is None:
        fields = _FIELDS[ref.target] = tuple(ref.target.model_fields)
    return list(fields)


_FIELDS: dict = {}  # op class -> its parameter names, in order


# ---- built-in functions -------------------------------------------------------


def _builtin(fn: Callable, arity: tuple[int, int], doc: str):
    def call(node: ast.Call, args: list, kwargs: dict):
        name = node.func.id
        if kwargs:
            raise error("arguments", f"{name}() takes no keyword arguments", node.kwargs[0][2])
        if not arity[0] <= len(args) <= arity[1]:
            want = str(arity[0]) if arity[0] == arity[1] else f"{arity[0]} to {arity[1]}"
            raise error("arguments", f"{name}() takes {want} argument(s), got {len(args)}", node.span)
        try:
            return too_big(fn(node, *args), node.span)
        except (TypeError, ValueError) as exc:
            raise error("type", f"{name}(): {exc}", node.span) from None
        except OverflowError:  # int(1e308 * 10), round(inf)
            raise error("too-large", f"{name}(): too large a number", node.span,
                        "numbers must stay below 1.8e+308 in magnitude") from None

    call.__doc__ = doc
    return call


def _walked(node, value):
    """A list a built-in walks, its length charged to the work budget."""
    if isinstance(value, (list, str)):
        charge(len(value), node.span, "the list walked here")
    return value


def _range(node, *bounds):
    if any(isinstance(b, bool) or not isinstance(b, int) for b in bounds):
        raise TypeError("needs int bounds")
    numbers = range(*bounds)
    charge(len(numbers), node.span, f"a range of {len(numbers):,} numbers")  # before it is made
    return list(numbers)


def _alternate(node, *values):
    return Cycle(tuple(values), node.span)


def _cycle(node, values):
    if not isinstance(values, list) or not values:
        raise ValueError("needs a non-empty list")
    return Cycle(tuple(values), node.span)


def _linspace(node, start, end):
    _num(start, node.args[0].span, "linspace")
    _num(end, node.args[1].span, "linspace")
    return Schedule(float(start), float(end), node.span)


def _make_divisible(node, value, divisor=8):
    value, divisor = _num(value, node.span, "make_divisible"), _num(divisor, node.span, "make_divisible")
    if not 1 <= divisor < math.inf or divisor != int(divisor):
        raise ValueError(f"the divisor must be a positive int, got {divisor!r}")
    divisor = int(divisor)
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def _require(node, condition, message):
    """`let sized = require(img_size == 160, "...")`: a blueprint's own check, reported at the call."""
    if not isinstance(message, str):
        raise ValueError("the second argument must be a message string")
    if not condition:
        raise error("requirement", message, node.span, "the blueprint states this requirement")
    return True


def _saved(node, name):
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError("needs the name of a saved tensor, as a string")
    return TensorRef(name, name, node.span)


def _input(kind: str, ndim: int):
    def make(node, channels, size):
        if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
            raise error("type", f"{kind}() channels must be a positive int, got {channels!r}", node.args[0].span)
        sizes = size if isinstance(size, list) else [size] * ndim
        if len(sizes) != ndim or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
            raise error("type", f"{kind}() size must be a positive int or a list of {ndim}, got {size!r}",
                        node.args[1].span)
        return InputSpec(kind, channels, tuple(sizes), node.span)

    return make


BUILTINS: dict[str, Callable] = {
    "min": _builtin(lambda n, *a: min(_walked(n, a[0])) if len(a) == 1 else min(a), (1, 8),
                    "Smallest of the arguments or of a list."),
    "max": _builtin(lambda n, *a: max(_walked(n, a[0])) if len(a) == 1 else max(a), (1, 8),
                    "Largest of the arguments or of a list."),
    "round": _builtin(lambda n, x: round(x), (1, 1), "Round to the nearest int."),
    "int": _builtin(lambda n, x: int(x), (1, 1), "Truncate to an int."),
    "float": _builtin(lambda n, x: float(x), (1, 1), "Convert to a float."),
    "len": _builtin(lambda n, x: len(x), (1, 1), "Length of a list."),
    "sum": _builtin(lambda n, x: sum(_walked(n, x)), (1, 1), "Sum of a list."),
    "range": _builtin(_range, (1, 3), "A list of ints."),
    "make_divisible": _builtin(_make_divisible, (1, 2), "Round a channel count to a multiple of 8 (MobileNet)."),
    "alternate": _builtin(_alternate, (1, 16), "A value cycling over the blocks of a stage: alternate(0, 3)."),
    "cycle": _builtin(_cycle, (1, 1), "Like alternate, from a list."),
    "linspace": _builtin(_linspace, (2, 2), "A schedule over all blocks of the model: linspace(0, 0.1)."),
    "require": _builtin(_require, (2, 2), "Fail with a located error and `message` unless `condition` holds: "
                        "let ok = require(img_size == 160, \"CMT-Ti is defined at 160 px\")."),
    "saved": _builtin(_saved, (1, 1), "The tensor saved as NAME at model level, as a value: a tensor "
                      "parameter's default, e.g. `tokens = saved(\"z\")`."),
    "image": _builtin(_input("image", 2), (2, 2), "A 2-D input: image(channels, size or [h, w])."),
    "signal": _builtin(_input("signal", 1), (2, 2), "A 1-D input: signal(channels, length)."),
    "volume": _builtin(_input("volume", 3), (2, 2), "A 3-D input: volume(channels, size or [d, h, w])."),
}

_EVAL = {
    ast.Literal: _eval_literal, ast.Name: _eval_name, ast.ListExpr: _eval_list, ast.ListComp: _eval_list_comp,
    ast.Index: _eval_index,
    ast.BinOp: _eval_binop, ast.UnaryOp: _eval_unary, ast.Conditional: _eval_conditional, ast.Call: _eval_call,
}
