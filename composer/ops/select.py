"""Data-dependent selection: keep the tokens (or regions of tokens) with the highest scores, and
choose per sample between an early exit's logits and the final ones.

These ops make a dynamic-computation model (token sparsification, coarse-to-fine re-tokenization,
early exit) a static graph: every SHAPE is fixed when the model is checked (how many tokens are
kept, how many logits come out), and only WHICH tokens are kept, or which logits are returned, is
decided per sample at run time. Nothing is skipped: a sample that exits early has still been
computed to the end (the dense form of an early exit).
"""


import math
from typing import Annotated, Literal, Optional, Union

from pydantic import Field

from ..shapes import Shape, ShapeError
from .registry import Op, Pos, Tensor, op, prod

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]  # a share of the regions, in (0, 1)


@op("topk_tokens", category="layout", layout="tokens")
class TopkTokens(Op):
    """Keep the `k` grid tokens (or `k` regions of tokens) with the highest scores, gathered per
    sample; the prefix (class) tokens are always kept, in front.

    `score = s` takes the scores from the named tensor `s`, one score per grid token or per region:
    tokens or a map of one channel (`s = linear(1)`; prefix tokens of `s` are skipped), or the
    scores of one query over keys on the grid, averaged over the heads (class attention, as CF-ViT
    ranks its patches: `cls = { select_tokens(0, 1); split_heads(1) }`, `patches = { select_tokens(1);
    split_heads(1) }`, `a = scores(cls, patches)`, then `topk_tokens(k, score = a)`; key prefix
    tokens are skipped). `s` lies on the input's grid (a region's score is then the mean of its
    tokens' scores) or on the grid of regions (one score per region). Without a tensor the scores
    come from the grid tokens of the input: `score="norm"`, their L2 norm; `"class"`, their dot
    product with the first prefix token, times C^-0.5 (single-head, unprojected class attention, so
    the class token must be there).
    With `region = r` the grid is cut into r^d regions (row-major), a region's score is the mean of
    its tokens' scores, the best `k` regions are kept and each brings its r^d tokens (row-major
    inside the region): CF-ViT re-splits the informative 16x16 patches of a 7x7 coarse grid into
    their four 14x14 fine children this way (`region = 2`, one score per coarse patch). `k` is a
    count, or a fraction in (0, 1) of the regions (rounded up). `largest = false` keeps the lowest
    scores instead (the complement of a selection, up to ties).

    Output: tokens `(extra + k * r^d, C)`, the kept tokens in order of decreasing (or increasing)
    score, as a 1-D sequence (the grid is gone). Static: the shape; data-dependent: which tokens.
    Gradients reach the kept tokens, not the scores (top-k is not differentiable). No parameters;
    MACs 0 (the scores are not counted, as `torch.utils.flop_counter`).
    Deprecated: `score_channels = n` reads the scores packed in the input's first n channels
    (`parallel concat { scores; tokens }`; `"norm"` and `"class"` then use those channels,
    `"value"` the single one), dropped from the output."""

    grid_bound = True  # its module is built for one grid (composer.sizes refuses others)

    k: Union[Pos, Fraction]
    score: Union[Literal["norm", "value", "class"], Tensor] = "norm"
    score_channels: Optional[Pos] = None
    region: Pos = 1
    largest: bool = True

    def deprecation(self):
        if self.score_channels is not None:
            return ("topk_tokens(score_channels = ...), which reads its scores packed in the input's first "
                    "channels, is deprecated",
                    "pass the scores by name: `s = ...` (one score per token or region, or one query's "
                    "scores), then topk_tokens(k, score = s) on the tokens alone")
        return None

    def given(self, x: Shape) -> tuple | None:
        """(layout, prefix tokens to skip, per region) of the score tensor `score`, checked against
        the input `x`; None when the scores come from the input itself."""
        if isinstance(self.score, str):
            return None
        s = self.score.shape
        if self.score_channels is not None:
            raise ShapeError("topk_tokens takes its scores either by name (score = tensor) or packed "
                             "(score_channels), not both", "drop score_channels")
        if s.layout == "scores":
            if s.tokens != 1:
                raise ShapeError(f"topk_tokens: the scores {s} have {s.tokens} queries, not one",
                                 "give the scores of a single query, e.g. the class token's")
            grid, skip = s.keys
        elif s.layout in ("tokens", "map"):
            if s.channels != 1:
                raise ShapeError(f"topk_tokens: the score tensor {s} has {s.channels} channels, not one "
                                 "score per token", "project it to one channel first, e.g. linear(1)")
            grid, skip = s.spatial, s.extra
        else:
            raise ShapeError(f"topk_tokens: the scores must be tokens or a map of one channel, or the scores "
                             f"of one query, got {s.layout} {s}")
        coarse = tuple(g // self.region for g in x.spatial)
        if tuple(grid) not in (tuple(x.spatial), coarse):
            on = "x".join(map(str, x.spatial))
            also = f" or the {'x'.join(map(str, coarse))} grid of its regions" if self.region > 1 else ""
            raise ShapeError(f"topk_tokens: the scores lie on {'x'.join(map(str, grid)) or 'no grid'}, "
                             f"not on the input's {on} grid{also}")
        return s.layout, skip, self.region > 1 and tuple(grid) == coarse

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
        self.given(x)
        if self.score == "value" and s != 1:
            raise ShapeError("topk_tokens score=\"value\" needs score_channels = 1",
                             "or give the scores by name: topk_tokens(k, score = s)")
        if self.score == "class" and not x.extra:
            raise ShapeError("topk_tokens score=\"class\" needs a class token in front of the grid")
        n, k = self.regions(x), self.count(x)
        if not 0 < k <= n:
            raise ShapeError(f"topk_tokens k = {k} must be in [1, {n}] (the number of regions)")
        return Shape(x.channels - (s or 0), (k * self.region ** x.ndim,), "tokens", x.extra)

    def build(self, x, y):
        from ..layers.select import TopkTokens as Module

        given = self.given(x)
        score = "given" if given is not None else self.score
        return Module(x.spatial, x.extra, self.count(x), score, self.score_channels or 0, self.region,
                      self.largest, given)


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
