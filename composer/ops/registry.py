"""The op registry: one pydantic class per op, holding its parameters, docs, shape, cost and builder.

An op class's fields are its parameters, its docstring is its documentation, and its methods are
its rules: `infer(x) -> Shape` (pure Python), `macs(x, y)`, `params(x, y)` and `build(x, y)` (the
only method that imports torch). Ops are registered by name with `@op("name")`.
"""

# no `from __future__ import annotations` in the op modules: pydantic evaluates every op class's
# annotations when it builds the class, and a string annotation costs a compile() each time

import math
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from ..shapes import Shape, ShapeError, TensorRef

OPS: dict[str, type["Op"]] = {}

# The ranges of op parameters, checked when an op is validated (at check time, before any build):
# a field typed `Pos` refuses 0 and negative numbers with a located error naming the parameter.
Pos = Annotated[int, Field(ge=1)]  # a count or a size: channels, kernel, stride, dilation, heads, groups
NonNeg = Annotated[int, Field(ge=0)]  # a padding, a shift, an offset, an index from the start
Probability = Annotated[float, Field(ge=0.0, le=1.0)]  # a dropout rate, a smoothing, a mixing weight
PosFloat = Annotated[float, Field(gt=0.0)]  # a scale, a temperature, a base
NonNegFloat = Annotated[float, Field(ge=0.0)]  # an epsilon, a standard deviation


class OpTraits:
    """What an op class is, beside its parameters: the class attributes of every op, which an op
    class sets in its body (`grid_bound = True`) or `@op` sets. A base of `Op` and not ClassVars
    of it: pydantic evaluates a model's annotations again for every subclass, which cost about 5%
    of the check's start-up over the ~150 op classes."""

    name = ""
    kind = "op"  # "op" applies to a tensor; "part" only configures another op
    category = "misc"
    layout = "any"  # the input layout the op needs: map, tokens, vector or any
    classifier = False
    tied = False  # True on an op class whose instances may share a parameter (see `tie_key`)
    # True on an op class whose built module works only at the grid it was built for (a table or a
    # buffer sized by it); a model refuses other input sizes that change such an op's grid
    grid_bound = False
    resamples = False  # a grid-bound table the module resamples under dynamic_img_size
    regrids = False  # tokens in, tokens on a new grid out, the module telling it at run time
    # the fields that take named tensors (typed `Tensor`), set by `@op`: lowering fills in their
    # shapes (`TensorRef.shape`) and the built module gets the tensors after the running one
    tensor_args = ()
    # a tensor field that, when given, is the op's input instead of the running tensor (`scores(q, k)`)
    input_arg = ""
    # an op of any layout given heads or scores runs on every head alike: its MACs count once per
    # head; False where `macs` counts the heads itself
    per_head = True
    # an op inside windows_to_batch (or another fold) runs on every piece of the batch: its MACs
    # count once per piece; False where its work is done once per forward (a table made from the
    # geometry alone and added to every window's scores)
    per_fold = True


class Op(OpTraits, BaseModel):
    # allow_inf_nan=False: `1e309` (inf) or nan is never a parameter value
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True,
                              allow_inf_nan=False)

    def ties(self) -> bool:
        """Whether this instance shares a parameter (`tie_key` then gives its key)."""
        return False

    def tie_key(self, x: Shape) -> tuple | None:
        """(key, parameters) when this op shares a parameter with the other ops of the same key (the
        first in forward order owns it; the others' counts leave it out); None when it does not."""
        return None

    def takes_tensors(self) -> bool:
        """Whether this instance is given named tensors (a field typed `Tensor` that holds one)."""
        return any(isinstance(getattr(self, a), TensorRef) for a in self.tensor_args)

    def deprecation(self) -> tuple[str, str] | None:
        """(what is deprecated, the new spelling) when this instance is written in a spelling kept
        only for older files; the resolver warns at the call."""
        return None

    def runtime_grid(self, x: Shape) -> bool:
        """Whether the module built for input `x` also runs at another grid (the grid it gets at
        run time); `composer.sizes` refuses input sizes that would change the grid of an op that
        does not."""
        return not self.grid_bound

    def admits_grid(self, built: Shape, got: Shape, dynamic: bool, outputs: tuple | None = None) -> str | None:
        """None when the module built for input `built` runs on input `got` (another grid, at
        another input size; `dynamic`: the model resamples its position tables); else why not.
        The default: a module that takes the runtime grid (`runtime_grid`) and whose parameter
        count does not depend on the grid, or a table it resamples under `dynamic`. `outputs`:
        the op's outputs for `built` and `got` where the caller has them (else inferred here)."""
        if dynamic and self.resamples:
            return None
        if not self.runtime_grid(built):
            hint = " (build it with dynamic_img_size=True to resample it)" if self.resamples else ""
            return f"is built for input {built} and would get {got}{hint}"
        built_y, got_y = outputs or (self.infer(built), self.infer(got))
        if self.params(built, built_y) != self.params(got, got_y):
            return f"has parameters sized for input {built}, and would get {got}"
        return None

    def dynamic_form(self) -> "Op":
        """This op as a model built with dynamic_img_size runs it at other input sizes (for shape
        inference there): itself, unless its module then behaves otherwise (window attention pads)."""
        return self

    def infer(self, x: Shape) -> Shape:
        return x

    def params(self, x: Shape, y: Shape) -> int:
        return 0

    def macs(self, x: Shape, y: Shape) -> int:
        return 0

    def buffer_elements(self, x: Shape, y: Shape) -> int:
        """Elements of the buffers the built module registers (index tables, masks, fixed tables):
        composer.memory counts them before anything is allocated. 0 by default; an op whose
        buffers grow with its grid or window says how many."""
        return 0

    def build(self, x: Shape, y: Shape):
        from torch import nn

        return nn.Identity()

    def describe(self) -> str:
        """`name(arg=value, ...)` with the non-default arguments, for summaries and diffs."""
        parts = []
        for key, field in type(self).model_fields.items():
            value = getattr(self, key)
            if field.is_required() or value != field.default:
                parts.append(f"{key}={show_value(value)}")
        return f"{self.name}({', '.join(parts)})"


# as a ClassVar would be: an op class may set a trait in its body without an annotation
Op.__class_vars__.update(k for k in vars(OpTraits) if not k.startswith("_"))


def show_value(value: Any) -> str:
    if isinstance(value, Op):
        return value.describe()
    if isinstance(value, str):
        return f'"{value}"'
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return str(value)


def op(name: str, *, kind: str = "op", category: str = "misc", layout: str = "any", classifier: bool = False):
    """Register an op class under `name`; a duplicate name is an error."""

    def register(cls: type[Op]) -> type[Op]:
        if name in OPS:
            raise RuntimeError(f"op '{name}' registered twice")
        cls.name, cls.kind, cls.category, cls.layout, cls.classifier = name, kind, category, layout, classifier
        cls.tensor_args = tuple(k for k, f in cls.model_fields.items() if TensorRef in _types(f.annotation))
        OPS[name] = cls
        return cls

    return register


_BOUNDS = (("ge", ">= {}"), ("gt", "> {}"), ("le", "<= {}"), ("lt", "< {}"))


def bounds_of(annotation, metadata=()) -> str:
    """The range a field admits, in words (">= 1", ">= 0.0 and <= 1.0"), from its constraints
    (those of the field, and of the ints or floats inside a union or list: ">= 1; or > 0.0 and
    < 1.0" for a count or a fraction); "" when it has none."""
    groups: list[str] = []

    def own(meta) -> list[str]:
        words = []
        for m in meta:
            if hasattr(m, "metadata"):  # a Field(...) inside an annotation holds its constraints
                words += own(m.metadata)
            for key, text in _BOUNDS:
                value = getattr(m, key, None)
                if value is not None:
                    words.append(text.format(value))
        return words

    def walk(ann, meta):
        words = " and ".join(own(meta))
        if words and words not in groups:
            groups.append(words)
        if typing.get_origin(ann) is Annotated:
            walk(typing.get_args(ann)[0], typing.get_args(ann)[1:])
        else:
            for a in typing.get_args(ann):
                walk(a, ())

    walk(annotation, metadata)
    return "; or ".join(groups)


_RANGE_WORDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
                "less_than": ("<", "lt")}


def range_problem(cls: type["Op"], field: str, errors: list, given: Any) -> tuple[str, str, str | None] | None:
    """(code, what is wrong, hint) when pydantic's `errors` for op `cls` say that the value `given`
    to `field` has the right type but is out of the field's range ("must be >= 1, got 0") or is
    infinite; None for any other error. Of a union's errors (`kernel`: an int or a list of ints)
    the range error is the one that counts."""
    for e in errors:
        if not e["loc"] or str(e["loc"][0]) != field:
            continue
        index = next((i for i in e["loc"][1:] if isinstance(i, int)), None)
        where = f" (entry {index} of {_cut(given)})" if index is not None else ""
        if e["type"] == "finite_number":
            return "type", f"must be a finite number, got {e['input']}{where}", None
        if e["type"] in _RANGE_WORDS:
            sign, key = _RANGE_WORDS[e["type"]]
            bounds = bounds_of(cls.model_fields[field].annotation, cls.model_fields[field].metadata)
            hint = f"'{field}' of '{cls.name}' takes {bounds}" if " or " in bounds or " and " in bounds else None
            return "value", f"must be {sign} {e['ctx'][key]}, got {_cut(e['input'])}{where}", hint
    return None


def _cut(value) -> str:
    text = repr(value)
    return text if len(text) < 40 else text[:37] + "..."


def plain_annotation(annotation):
    """`annotation` without its constraints (`Union[Annotated[int, Ge(1)], list[...]]` ->
    `Union[int, list[int]]`), for messages that name a field's type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return plain_annotation(args[0])
    if origin is typing.Union:
        return typing.Union[tuple(plain_annotation(a) for a in args)]
    if origin is list:
        return list[plain_annotation(args[0])]
    return annotation


def _types(annotation) -> tuple:
    """The classes an annotation admits (`Optional[Tensor]` -> (TensorRef, NoneType))."""
    args = typing.get_args(annotation)
    return tuple(t for a in args for t in _types(a)) if args else (annotation,)


Tensor = TensorRef  # the annotation of a field that takes a named tensor: `k: Tensor`


def spatial_out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_divides(what: str, n: int, by: int, hint: str | None = None) -> None:
    if by <= 0 or n % by:
        raise ShapeError(f"{what}: {by} does not divide {n}", hint)


def prod(xs) -> int:
    return math.prod(xs)


def spatial_axis(name: str, axis: int, x: Shape) -> int:
    """The size of spatial axis `axis` (0: the first) of map `x`, for an op `name` that works along it."""
    if x.layout != "map" or not x.spatial:
        raise ShapeError(f"{name} needs a map with a spatial grid, got {x}")
    if not 0 <= axis < x.ndim:
        raise ShapeError(f"{name} axis {axis} is not a spatial axis of the {x.ndim}-D map {x}",
                         f"axis counts the spatial axes from 0 (0 to {x.ndim - 1})")
    return x.spatial[axis]
