"""Symbolic tensor shapes used by inference: channels, spatial grid and layout, batch left out."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Shape:
    """`map` is (B, C, *spatial); `tokens` is (B, extra + prod(spatial), C); `vector` is (B, C)."""

    channels: int
    spatial: tuple[int, ...] = ()
    layout: str = "map"
    extra: int = 0  # prefix tokens (class, distillation) ahead of the grid tokens

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    @property
    def tokens(self) -> int:
        return self.extra + math.prod(self.spatial)

    @property
    def numel(self) -> int:
        return self.channels * (self.tokens if self.layout != "vector" else 1)

    def with_(self, **changes) -> "Shape":
        return replace(self, **changes)

    def __str__(self) -> str:
        if self.layout == "vector":
            return f"({self.channels})"
        grid = "x".join(str(s) for s in self.spatial)
        if self.layout == "map":
            return f"({self.channels}, {grid})"
        extra = f"{self.extra}+" if self.extra else ""
        return f"({extra}{grid} tokens, {self.channels})"


class ShapeError(Exception):
    """Raised by an op's shape rule: one fact, the stage boundary adds where and why."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
