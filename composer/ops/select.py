"""Data-dependent selection: keep the tokens (or regions of tokens) with the highest scores, and
choose per sample between an early exit's logits and the final ones.

These ops make a dynamic-computation model (token sparsification, coarse-to-fine re-tokenization,
early exit) a static graph: every SHAPE is fixed when the model is checked (how many tokens are
kept, how many logits come out), and only WHICH tokens are kept, or which logits are returned, is
decided per sample at run time. Nothing is skipped: a sample that exits early has still been
computed to the end (the dense form of an early exit).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Optional, Union

from pydantic import Field

from ..shapes import Shape, ShapeError
from .registry import Op, Pos, op, prod

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]  # a share of the regions, in (0, 1)


@op("topk_tokens", category="layout", layout="tokens")
class TopkTokens(Op):
    """Keep the `k` grid tokens (or `k` regions of tokens) with the highest scores, gathered per
    sample; the prefix (class) tokens are always kept, in front.

    Scores are computed from the score channels of every grid token: the first `score_channels`
    channels (`none`: all of them). `score="norm"`: their L2 norm; `"value"`: the value of the single
    score channel (`score_channels = 1`; the blueprint computes it, e.g. `parallel concat
    { linear(1) as score; identity }`); `"class"`: the dot product with the same channels of the
    first prefix token, times n^-0.5 (single-head, unprojected class attention, so the class token
    must be there). When `score_channels` is given those channels are dropped from the output, so a
    score source can ride along the gathered tokens: `parallel concat { scores; tokens }`.
    With `region = r` the grid is cut into r^d regions (row-major), a region's score is the mean of
    its tokens' scores, the best `k` regions are kept and each brings its r^d tokens (row-major
    inside the region): CF-ViT re-splits the informative 16x16 patches of a 7x7 coarse grid into
    their four 14x14 fine children this way (`region = 2`, the coarse scores upsampled). `k` is a
    count, or a fraction in (0, 1) of the regions (rounded up). `largest = false` keeps the lowest
    scores instead (the complement of a selection, up to ties).

    Output: tokens `(extra + k * r^d, C - score_channels)`, the kept tokens in order of decreasing
    (or increasing) score, as a 1-D sequence (the grid is gone). Static: the shape; data-dependent:
    which tokens. Gradients reach the kept tokens, not the scores (top-k is not differentiable).
    No parameters; MACs 0 (the scores are not counted, as `torch.utils.flop_counter`)."""

    grid_bound = True  # its module is built for one grid (composer.sizes refuses others)

    k: Union[Pos, Fraction]
    score: Literal["norm", "value", "class"] = "norm"
    score_channels: Optional[Pos] = None
    region: Pos = 1
    largest: bool = True

    def regions(self, x: Shape) -> int:
        return prod(g // self.region for g in x.spatial)

    def count(self, x: Shape) -> int:
        """Regions kept."""
        n = self.regions(x)
        if isinstance(self.k, float):
            if not 0 < self.k < 1:
                raise ShapeError(f"topk_tokens k as a fraction must be in (0, 1), got {self.k}")
            return max(1, math.ceil(self.k * n))
        return self.k

    def infer(self, x: Shape) -> Shape:
        if not x.ndim:
            raise ShapeError("topk_tokens needs tokens on a grid")
        if self.region <= 0:
            raise ShapeError(f"topk_tokens region must be positive, got {self.region}")
        for g in x.spatial:
            if g % self.region:
                raise ShapeError(f"topk_tokens region {self.region} does not divide feature size {g}",
                                 f"the grid ({'x'.join(map(str, x.spatial))}) must be a multiple of the region")
        s = self.score_channels
        if s is not None and not 0 < s < x.channels:
            raise ShapeError(f"topk_tokens score_channels must be in [1, {x.channels - 1}], got {s}",
                             "the score channels come first and at least one channel must remain")
        if self.score == "value" and s != 1:
            raise ShapeError("topk_tokens score=\"value\" needs score_channels = 1")
        if self.score == "class" and not x.extra:
            raise ShapeError("topk_tokens score=\"class\" needs a class token in front of the grid")
        n, k = self.regions(x), self.count(x)
        if not 0 < k <= n:
            raise ShapeError(f"topk_tokens k = {k} must be in [1, {n}] (the number of regions)")
        return Shape(x.channels - (s or 0), (k * self.region ** x.ndim,), "tokens", x.extra)

    def build(self, x, y):
        from ..layers.select import TopkTokens as Module

        return Module(x.spatial, x.extra, self.count(x), self.score, self.score_channels or 0, self.region,
                      self.largest)


@op("early_exit", category="head", layout="vector")
class EarlyExit(Op):
    """Per-sample early exit between two classifiers: the input vector is [exit logits (n), final
    logits (n)] (`parallel concat { { from early; ... }; ... }`); a sample whose exit logits are
    confident, max softmax >= `threshold`, gets them, any other the final logits. The output is n
    logits. Static: the shape, and that both classifiers run for every sample (the dense form: the
    final pass is computed even for samples that exit); data-dependent: which logits each sample
    returns. `threshold = 1` (CF-ViT's reported setting) returns the final logits except for
    saturated exits. No parameters, no MACs."""

    threshold: float = 1.0

    def infer(self, x: Shape) -> Shape:
        if x.channels % 2:
            raise ShapeError(f"early_exit needs [exit logits, final logits] of equal size, got {x.channels} channels")
        return x.with_(channels=x.channels // 2)

    def build(self, x, y):
        from ..layers.select import EarlyExit as Module

        return Module(self.threshold)
