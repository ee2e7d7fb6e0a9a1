"""Named tensors while resolving: tensor names as values of a scope (`q = ...`, `save q`, a
composite's tensor parameter) and the parts a splitting op gives to `a, b, c = op(...)`."""

from __future__ import annotations

from .diagnostics import error
from .expr import Ref, Scope, type_name
from .shapes import TensorRef
from .source import Span


def bind_tensor(scope: Scope, ref: TensorRef, span: Span | None = None) -> None:
    """Make tensor `ref` a value of `scope` by its name; a name a value already holds (a parameter, a
    `let`) keeps it for `save` (older files), and is an error for a binding (`span` given)."""
    held, inner = ref, scope
    while inner is not None:
        if ref.name in inner.values:
            held = inner.values[ref.name]
            break
        inner = inner.parent
    if isinstance(held, TensorRef):
        scope.values[ref.name] = ref
    elif span is not None:
        raise error("redefinition", f"'{ref.name}' is already a value here ({type_name(held)}), not a tensor",
                    span, "choose another name for the tensor")


def find_tensor(scope: Scope, name: str) -> TensorRef | None:
    while scope is not None:
        if name in scope.values:
            value = scope.values[name]
            return value if isinstance(value, TensorRef) else None
        scope = scope.parent
    return None


def split_parts(value, n: int, span: Span) -> list:
    """`a, b, c = op(...)`: the op once per name, with `part` = 0, 1, ... and `parts` = n."""
    cls = value.target if isinstance(value, Ref) and value.kind == "op" else None
    if cls is None or "part" not in cls.model_fields or "parts" not in cls.model_fields:
        raise error("type", f"{n} names are bound, but {type_name(value)} gives one tensor", span,
                    "several names take the parts of a splitting op, e.g. `q, k, v = split_heads(heads)`")
    args = dict(value.args)
    if "part" in args:
        raise error("arguments", "`part` is given by the names bound: leave it out", value.arg_span("part"))
    if args.get("parts") not in (None, n):
        raise error("value", f"parts = {args['parts']} but {n} names are bound", value.arg_span("parts"))
    return [Ref(value.name, value.kind, cls, tuple({**args, "parts": n, "part": i}.items()), value.spans, value.span)
            for i in range(n)]
