"""Score-based token selection and per-sample early exit (see composer/ops/select.py)."""

from __future__ import annotations

import math

import torch
from torch import nn


class TopkTokens(nn.Module):
    """(B, extra + N, C) -> (B, extra + k * r^d, C - score_channels): the prefix tokens, then the
    tokens of the k best regions (by mean score), gathered with a fixed region-to-token table.
    `score = "given"`: the scores are a tensor passed after the input, `forward(x, scores)`, and
    `given` = (its layout, prefix tokens or keys to skip, whether it holds one score per region)."""

    def __init__(self, grid, extra, k, score="norm", score_channels=0, region=1, largest=True, given=None):
        super().__init__()
        self.grid, self.extra, self.k = tuple(grid), extra, k
        self.score, self.score_channels, self.largest = score, score_channels, largest
        self.given = given
        self.region = region
        # token index of every (region, member): regions row-major, members row-major inside them
        ndim = len(self.grid)
        index = torch.arange(math.prod(self.grid)).reshape(self.grid)
        shape = [s for g in self.grid for s in (g // region, region)]
        perm = [2 * d for d in range(ndim)] + [2 * d + 1 for d in range(ndim)]
        table = index.reshape(shape).permute(*perm).reshape(-1, region ** ndim)
        self.register_buffer("region_index", table, persistent=False)

    def scores(self, x):
        grid = x[:, self.extra:]
        src = grid[..., : self.score_channels] if self.score_channels else grid
        if self.score == "norm":
            s = src.norm(dim=-1)
        elif self.score == "value":
            s = src[..., 0]
        else:  # class: dot product with the first prefix token
            cls = x[:, :1, : self.score_channels] if self.score_channels else x[:, :1]
            s = (src * cls).sum(-1) * src.shape[-1] ** -0.5
        return s[:, self.region_index].mean(-1)  # (B, regions)

    def given_scores(self, t):
        """(B, regions) from the score tensor `t` (see `given`)."""
        layout, skip, per_region = self.given
        if layout == "scores":  # (B, heads, 1, keys): the one query's scores, averaged over the heads
            s = t[:, :, 0, skip:].mean(1)
        elif layout == "tokens":  # (B, skip + N, 1)
            s = t[:, skip:, 0]
        else:  # map (B, 1, *grid)
            s = t.flatten(1)
        return s if per_region else s[:, self.region_index].mean(-1)

    def forward(self, x, scores=None):
        with torch.no_grad():
            s = self.given_scores(scores.detach()) if scores is not None else self.scores(x.detach())
            top = s.topk(self.k, dim=1, largest=self.largest).indices  # (B, k)
        index = self.region_index[top].flatten(1) + self.extra  # (B, k * r^d)
        out = x[..., self.score_channels:] if self.score_channels else x
        picked = out.gather(1, index[..., None].expand(-1, -1, out.shape[-1]))
        return torch.cat([out[:, : self.extra], picked], 1) if self.extra else picked

    def extra_repr(self) -> str:
        return f"k={self.k}, score={self.score}, region={self.region}, largest={self.largest}"


class EarlyExit(nn.Module):
    """[exit logits, final logits] -> the exit logits where max softmax >= threshold, else the final."""

    def __init__(self, threshold=1.0):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        early, final = x.chunk(2, dim=-1)
        confident = early.softmax(-1).amax(-1, keepdim=True) >= self.threshold
        return torch.where(confident, early, final)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"
