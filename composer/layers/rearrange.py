"""The module behind the `rearrange` op."""

from __future__ import annotations

from torch import nn


class Rearrange(nn.Module):
    """(B, *in) -> (B, *split) -> permute(order) -> (B, *out): einops' rearrange with the sizes
    fixed at build time. Steps that change nothing are skipped, so a pure merge or split is one
    view and a permute stays a view until the final reshape needs a copy."""

    def __init__(self, split: tuple[int, ...], order: tuple[int, ...], out: tuple[int, ...]):
        super().__init__()
        self.split, self.order, self.out = tuple(split), tuple(order), tuple(out)
        self.permute = self.order != tuple(range(len(self.order)))
        self.dims = (0, *(i + 1 for i in self.order))

    def forward(self, x):
        b = x.shape[0]
        if self.permute:
            if tuple(x.shape[1:]) != self.split:
                x = x.reshape(b, *self.split)
            x = x.permute(self.dims)
        if tuple(x.shape[1:]) != self.out:
            x = x.reshape(b, *self.out)
        return x

    def extra_repr(self) -> str:
        return f"split={self.split}, order={self.order}, out={self.out}"
