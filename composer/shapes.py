"""Symbolic tensor shapes used by inference: channels, spatial grid and layout, batch left out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Shape:
    """`map` is (B, C, *spatial); `tokens` is (B, extra + prod(spatial), C); `vector` is (B, C);
    `heads` is (B, heads, extra + prod(spatial), C), C the width of one head; `scores` is
    (B, heads, extra + prod(spatial), C) too, a score per query token and key: C is the number of
    keys and `keys` = (key grid, key prefix tokens) says where they lie. The last axis is always C."""

    channels: int
    spatial: tuple[int, ...] = ()
    layout: str = "map"
    extra: int = 0  # prefix tokens (class, distillation) ahead of the grid tokens
    heads: int = 0  # layouts `heads` and `scores`: the heads axis
    keys: tuple | None = None  # layout `scores`: (key grid, key prefix tokens)

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    @property
    def tokens(self) -> int:
        return self.extra + math.prod(self.spatial)

    @property
    def numel(self) -> int:
        return self.channels * (self.tokens if self.layout != "vector" else 1) * (self.heads or 1)

    def with_(self, **changes) -> "Shape":
        """`dataclasses.replace(self, **changes)`, without its per-field work (shape rules call it
        thousands of times in a check); an unknown field still raises replace's TypeError."""
        if not changes.keys() <= _SHAPE_FIELDS:
            return replace(self, **changes)
        fields = self.__dict__.copy()
        fields.update(changes)
        return frozen_instance(Shape, fields)

    def __str__(self) -> str:
        if self.layout == "vector":
            return f"({self.channels})"
        grid = "x".join(str(s) for s in self.spatial)
        if self.layout == "map":
            return f"({self.channels}, {grid})"
        extra = f"{self.extra}+" if self.extra else ""
        if self.layout == "heads":
            return f"({self.heads} heads, {extra}{grid} tokens, {self.channels})"
        if self.layout == "scores":
            kgrid, kextra = self.keys
            keys = (f"{kextra}+" if kextra else "") + ("x".join(str(s) for s in kgrid) or "")
            return f"({self.heads} heads, {extra}{grid} queries, {keys or self.channels} keys)"
        return f"({extra}{grid} tokens, {self.channels})"


_SHAPE_FIELDS = frozenset(Shape.__dataclass_fields__)


def frozen_instance(cls, fields: dict):
    """An instance of the frozen dataclass `cls` holding `fields` (every field, valid already),
    made without the constructor's per-field `object.__setattr__`: for the values a check makes
    tens of thousands of (`Shape.with_`, `expr.make_ref`)."""
    new = object.__new__(cls)
    object.__setattr__(new, "__dict__", fields)
    return new


class ShapeError(Exception):
    """Raised by an op's shape rule: one fact, the stage boundary adds where and why."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class TensorRef:
    """A named tensor used as a value: `k` in `scores(q, k)`, or a composite's argument
    `context = z`. `name` is what the blueprint wrote, `key` the name the forward pass keeps it
    under (a composite's own tensors are keyed apart from its caller's); lowering fills in `shape`."""

    name: str
    key: str
    span: object = field(default=None, compare=False, repr=False)  # where it was written: not part of its value
    shape: Shape | None = None

    def __str__(self) -> str:
        return self.name
