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
                 dims: tuple[int, ...] = (), left=(), right=(), given=None, onto: bool = False):
        super().__init__()
        self.split, self.order, self.out = tuple(split), tuple(order), tuple(out)
        self.permute = self.order != tuple(range(len(self.order)))
        self.dims = (0, *(i + 1 for i in self.order))
        self.input = tuple(dims)
        self.left, self.right = tuple(map(tuple, left)), tuple(map(tuple, right))
        self.given = dict(given or {})
        self.onto = onto  # forward gets a second map whose grid the output takes (`like`)

    def sizes(self, dims, grid=None) -> tuple[tuple, tuple]:
        """(split, out) for input dims `dims` (channels first) and, with `like`, the grid of the
        output."""
        if not self.input or (tuple(dims) == self.input and (grid is None or tuple(grid) == self.out[1:])):
            return self.split, self.out
        known = dict(self.given)
        if grid is not None:  # an output axis with one open elementary axis: its size over the others
            for _ in range(len(self.split)):
                for axes, dim in zip(self.right[1:], grid):
                    free = [a for a in axes if a not in known]
                    if len(free) == 1:
                        known[free[0]] = dim // math.prod(known[a] for a in axes if a in known)
        for axes, dim in zip(self.left, dims):
            free = [a for a in axes if a not in known]
            if free:
                known[free[0]] = dim // math.prod(known[a] for a in axes if a in known)
        split = tuple(known[a] for a in range(len(known)))
        return split, tuple(math.prod(known[a] for a in axes) for axes in self.right)

    def forward(self, x, like=None):
        b = x.shape[0]
        split, out = self.sizes(x.shape[1:], None if like is None else like.shape[2:])
        if like is not None and math.prod(split) != math.prod(x.shape[1:]):
            raise ValueError(f"rearrange: a ({', '.join(map(str, x.shape[1:]))}) input does not split into "
                             f"({', '.join(map(str, split))}) for the grid {tuple(like.shape[2:])} it goes back onto")
        if self.permute:
            if tuple(x.shape[1:]) != split:
                x = x.reshape(b, *split)
            x = x.permute(self.dims)
        if tuple(x.shape[1:]) != out:
            x = x.reshape(b, *out)
        return x

    def extra_repr(self) -> str:
        return f"split={self.split}, order={self.order}, out={self.out}"


class SplitChannels(nn.Module):
    """Channels [start, start + width) of a map (B, C, ...) or of tokens (B, N, C): a view."""

    def __init__(self, start: int, width: int, tokens: bool):
        super().__init__()
        self.start, self.width, self.tokens = start, width, tokens

    def forward(self, x):
        return x.narrow(-1 if self.tokens else 1, self.start, self.width)

    def extra_repr(self) -> str:
        return f"start={self.start}, width={self.width}"
