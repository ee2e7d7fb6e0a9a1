"""The module behind the `rearrange` op."""

from __future__ import annotations

import math

from torch import nn


class Rearrange(nn.Module):
    """(B, *in) -> (B, *split) -> permute(order) -> (B, *out): einops' rearrange. Steps that change
    nothing are skipped, so a pure merge or split is one view and a permute stays a view until the
    final reshape needs a copy.

    The sizes follow the input at run time: `left` holds, per input axis, the indices of its
    elementary axes (in the left side's order of named axes) and `given` the sizes fixed by the
    op's `sizes`; an input axis's one other elementary axis is its size divided by the given ones
    (as the op's shape rule solves it). `right` groups the elementary axes of every output axis. At
    the build input (`dims`) the sizes computed once are used."""

    def __init__(self, split: tuple[int, ...], order: tuple[int, ...], out: tuple[int, ...],
                 dims: tuple[int, ...] = (), left=(), right=(), given=None):
        super().__init__()
        self.split, self.order, self.out = tuple(split), tuple(order), tuple(out)
        self.permute = self.order != tuple(range(len(self.order)))
        self.dims = (0, *(i + 1 for i in self.order))
        self.input = tuple(dims)
        self.left, self.right = tuple(map(tuple, left)), tuple(map(tuple, right))
        self.given = dict(given or {})

    def sizes(self, dims) -> tuple[tuple, tuple]:
        """(split, out) for input dims `dims` (channels first)."""
        if not self.input or tuple(dims) == self.input:
            return self.split, self.out
        known = dict(self.given)
        for axes, dim in zip(self.left, dims):
            free = [a for a in axes if a not in known]
            if free:
                known[free[0]] = dim // math.prod(known[a] for a in axes if a in known)
        split = tuple(known[a] for a in range(len(known)))
        return split, tuple(math.prod(known[a] for a in axes) for axes in self.right)

    def forward(self, x):
        b = x.shape[0]
        split, out = self.sizes(x.shape[1:])
        if self.permute:
            if tuple(x.shape[1:]) != split:
                x = x.reshape(b, *split)
            x = x.permute(self.dims)
        if tuple(x.shape[1:]) != out:
            x = x.reshape(b, *out)
        return x

    def extra_repr(self) -> str:
        return f"split={self.split}, order={self.order}, out={self.out}"
