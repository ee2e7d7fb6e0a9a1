"""Token slicing (see composer/ops/tokens_extra.py)."""

from __future__ import annotations

from torch import nn


class SelectTokens(nn.Module):
    def __init__(self, start: int, count: int | None):
        super().__init__()
        self.start, self.count = start, count

    def forward(self, x):
        return x[:, self.start :] if self.count is None else x[:, self.start : self.start + self.count]

    def extra_repr(self) -> str:
        return f"start={self.start}, count={self.count}"
