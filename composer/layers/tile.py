"""The module behind the `tile` op."""

from __future__ import annotations

from torch import nn


class Tile(nn.Module):
    """(B, C, *S) -> (B, C, *S * times): the map repeated along every spatial dim."""

    def __init__(self, times: int):
        super().__init__()
        self.times = times

    def forward(self, x):
        return x.repeat(1, 1, *[self.times] * (x.ndim - 2))

    def extra_repr(self) -> str:
        return f"times={self.times}"
