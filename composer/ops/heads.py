"""Attention as an algebra of tensor primitives: heads, scores, weights, values.

A token mixer is written with these as a composite (`blueprints/lib/attention.arch`): project,
`split_heads`, `scores(q, k)`, position terms added to the scores, `softmax`, `weighted_sum(v)`,
`merge_heads`, project. The shapes read as in the papers: a `heads` tensor is (B, heads, N, d),
a `scores` tensor (B, heads, N queries, M keys). Nothing here depends on the input size: the
grids of queries and keys are the ones seen at run time.
"""


from typing import Literal, Optional

from ..shapes import Shape, ShapeError
from .registry import NonNeg, NonNegFloat, Op, Pos, PosFloat, Tensor, op


def _need(name: str, what: str, s: Shape, layout: str) -> None:
    if s.layout != layout:
        hint = {"heads": "split the channels into heads with split_heads(heads)",
                "scores": "make scores with scores(q, k)"}[layout]
        raise ShapeError(f"{name} needs {what} split into heads ({layout}), got {s.layout} {s}", hint)


def _grouped(name: str, heads: int, kv_heads: int) -> None:
    """Multi-query and grouped-query attention: keys and values may have fewer heads, each shared
    by `heads / kv_heads` query heads."""
    if kv_heads <= 0 or heads % kv_heads:
        raise ShapeError(f"{name}: {kv_heads} key/value heads do not divide {heads} query heads",
                         "each key/value head serves the same number of query heads (grouped-query attention)")


@op("split_heads", category="attention", layout="tokens")
class SplitHeads(Op):
    """Split the channels of tokens (B, N, C) into `heads` heads: (B, heads, N, C / heads).
    With `parts`, the channels hold several tensors (a fused q, k, v projection) and `part` picks
    one: `q, k, v = split_heads(heads)` binds all three (the names give `parts` and `part`).
    `widths` gives each part's width per head when they differ (q and k narrower than v);
    by default the parts are equal. `order = "parts"`: the channels are [part 0 of every head,
    part 1 of every head, ...] (timm's fused qkv); `order = "heads"`: [every part of head 0,
    every part of head 1, ...] (LeViT's). Prefix (class) tokens stay ahead of the grid."""

    heads: Pos
    part: NonNeg = 0
    parts: Optional[Pos] = None
    widths: Optional[list[Pos]] = None
    order: Literal["parts", "heads"] = "parts"

    def split(self, channels: int) -> list[int]:
        """The width per head of every part."""
        n = self.parts or (len(self.widths) if self.widths else 1)
        if self.heads <= 0:
            raise ShapeError(f"split_heads needs at least one head, got {self.heads}")
        if self.widths is not None:
            if len(self.widths) != n or any(w <= 0 for w in self.widths):
                raise ShapeError(f"split_heads: widths {self.widths} must give {n} positive widths, one per part")
            if self.heads * sum(self.widths) != channels:
                raise ShapeError(f"split_heads: {self.heads} heads x widths {self.widths} = "
                                 f"{self.heads * sum(self.widths)} channels, but the input has {channels}")
            return list(self.widths)
        if n <= 0 or channels % (self.heads * n):
            raise ShapeError(f"split_heads: {self.heads} heads x {n} parts do not divide {channels} channels",
                             "the channels must be heads x parts x the width of a head")
        return [channels // (self.heads * n)] * n

    def infer(self, x: Shape) -> Shape:
        widths = self.split(x.channels)
        if not 0 <= self.part < len(widths):
            raise ShapeError(f"split_heads: part {self.part} of {len(widths)} parts does not exist")
        return Shape(widths[self.part], x.spatial, "heads", x.extra, heads=self.heads)

    def build(self, x, y):
        from ..layers.heads import SplitHeads as Module

        return Module(self.heads, self.split(x.channels), self.part, self.order)


@op("merge_heads", category="attention", layout="heads")
class MergeHeads(Op):
    """Heads (B, heads, N, d) back to tokens (B, N, heads * d). `order = "heads"`: channel
    `h * d + j` is channel j of head h (the usual); `"channels"`: channel `j * heads + h`."""

    order: Literal["heads", "channels"] = "heads"

    def infer(self, x: Shape) -> Shape:
        return Shape(x.heads * x.channels, x.spatial, "tokens", x.extra)

    def build(self, x, y):
        from ..layers.heads import MergeHeads as Module

        return Module(self.order)


@op("scores", category="attention", layout="heads")
class Scores(Op):
    """Attention scores `q·kᵀ·scale`: for every head, query token and key token, the dot product
    of their vectors, (B, heads, N, M). `q` is the running tensor unless given; `scale` defaults to
    head_dim^-0.5. Keys with fewer heads than the queries serve groups of query heads (multi-query,
    grouped-query attention). `over = "channels"`: scores between channels instead of tokens,
    `qᵀ·k`, (B, heads, d, d) (cross-covariance attention; `scale` then defaults to 1). For cosine
    scores, `l2norm` q and k first."""

    q: Optional[Tensor] = None
    k: Tensor
    scale: Optional[PosFloat] = None
    over: Literal["tokens", "channels"] = "tokens"
    input_arg = "q"

    def factor(self, x: Shape) -> float:
        if self.scale is not None:
            return self.scale
        return x.channels ** -0.5 if self.over == "tokens" else 1.0

    def infer(self, x: Shape) -> Shape:
        _need("scores", "queries", x, "heads")
        k = self.k.shape
        _need("scores", "keys", k, "heads")
        _grouped("scores", x.heads, k.heads)
        if self.over == "channels":
            if x.tokens != k.tokens:
                raise ShapeError(f"scores over channels need as many query tokens as key tokens, got {x} and {k}")
            # channel scores lie on the query channels as a 1-D "grid", by the key channels
            return Shape(k.channels, (x.channels,), "scores", heads=x.heads, keys=((k.channels,), 0))
        if x.channels != k.channels:
            raise ShapeError(f"scores: queries of width {x.channels} and keys of width {k.channels} per head",
                             "q and k need the same width per head (v may differ)")
        return Shape(k.tokens, x.spatial, "scores", x.extra, heads=x.heads, keys=(k.spatial, k.extra))

    def macs(self, x, y):
        return x.heads * x.tokens * x.channels * self.k.shape.tokens if self.over == "tokens" \
            else x.heads * x.channels * self.k.shape.channels * x.tokens

    def build(self, x, y):
        from ..layers.heads import Scores as Module

        return Module(self.factor(x), self.over == "channels", x.heads // self.k.shape.heads)


@op("weighted_sum", category="attention", layout="scores")
class WeightedSum(Op):
    """The attention output: every query's values weighted by its scores, `scores · v`,
    (B, heads, N, d_v), on the queries' grid. `over = "channels"` weighs channels: `(scores · vᵀ)ᵀ`,
    for scores made over channels (cross-covariance attention); the output lies on v's grid."""

    v: Tensor
    over: Literal["tokens", "channels"] = "tokens"

    def infer(self, x: Shape) -> Shape:
        v = self.v.shape
        _need("weighted_sum", "values", v, "heads")
        _grouped("weighted_sum", x.heads, v.heads)
        if self.over == "channels":
            if x.keys != ((v.channels,), 0) or x.ndim != 1 or x.extra:
                raise ShapeError(f"weighted_sum over channels needs scores over channels of width {v.channels}, "
                                 f"got {x}", "make them with scores(q, k, over = \"channels\")")
            return Shape(x.spatial[0], v.spatial, "heads", v.extra, heads=x.heads)
        if x.channels != v.tokens:
            raise ShapeError(f"weighted_sum: {x.channels} keys per query but {v.tokens} value tokens",
                             "values come from the tokens the keys came from")
        return Shape(v.channels, x.spatial, "heads", x.extra, heads=x.heads)

    def macs(self, x, y):
        return x.heads * x.tokens * x.channels * self.v.shape.channels if self.over == "tokens" \
            else x.heads * x.tokens * x.channels * self.v.shape.tokens

    def build(self, x, y):
        from ..layers.heads import WeightedSum as Module

        return Module(self.over == "channels", x.heads // self.v.shape.heads)


@op("softmax", category="attention")
class Softmax(Op):
    """Softmax over the last axis (the keys of scores; the channels of tokens; the last spatial
    axis of a map: one distribution per row), or over the tokens (`axis = "tokens"`: of tokens
    or heads, or every position of a map)."""

    axis: Literal["last", "tokens"] = "last"

    def infer(self, x: Shape) -> Shape:
        if self.axis == "tokens" and x.layout not in ("tokens", "heads", "map"):
            raise ShapeError(f"softmax over tokens needs tokens, heads or a map, got {x.layout} {x}")
        if self.axis == "last" and x.layout == "map" and not x.spatial:
            raise ShapeError(f"softmax over the last axis of a map needs a spatial axis, got {x}")
        return x

    def build(self, x, y):
        from ..layers.heads import Softmax as Module

        if self.axis == "last":
            return Module(-1)
        return Module({"tokens": 1, "heads": 2}.get(x.layout, "positions"))


@op("weighted_pool", category="attention")
class WeightedPool(Op):
    """Pool the tokens of the running tensor x (a map or tokens) into one vector per sample, each
    token weighted by a one-channel tensor `weights` on the same tokens: `Σ_n w_n · x_n`. With
    weights soft-maxed over the tokens (`softmax(axis = "tokens")`) it is attention with a single
    query that scores each token by its own projection (separable self-attention's context
    vector). The output is a map of size 1 along every spatial axis, (B, C, 1, ..., 1), which
    `parallel mul` broadcasts over a map as a gate. `axis = "last"` pools a map along its last
    spatial axis only, one vector per row, (B, C, ..., 1) (with weights soft-maxed the same way,
    `softmax(axis = "last")`: one sequence per row). MACs: one per channel and token."""

    weights: Tensor
    axis: Literal["tokens", "last"] = "tokens"

    def infer(self, x: Shape) -> Shape:
        w = self.weights.shape
        if x.layout not in ("map", "tokens") or w.layout not in ("map", "tokens"):
            raise ShapeError(f"weighted_pool needs a map or tokens and weights of either, got {x.layout} {x} "
                             f"and {w.layout} {w}")
        if w.channels != 1:
            raise ShapeError(f"weighted_pool: the weights have {w.channels} channels, not one",
                             "project them to one channel first, e.g. linear(1)")
        if (w.spatial, w.extra) != (x.spatial, x.extra) or not x.spatial:
            raise ShapeError(f"weighted_pool: weights {w} do not lie on the tokens of {x}",
                             "both must have the same grid and prefix tokens")
        if self.axis == "last":
            if "tokens" in (x.layout, w.layout):
                raise ShapeError(f"weighted_pool along the last axis needs a map and weights on a map, got "
                                 f"{x.layout} {x} and {w.layout} {w}", "fold tokens into a map first: to_map")
            return Shape(x.channels, (*x.spatial[:-1], 1), "map")
        return Shape(x.channels, (1,) * x.ndim, "map")

    def macs(self, x, y):
        return x.channels * x.tokens

    def build(self, x, y):
        from ..layers.heads import WeightedPool as Module

        if self.axis == "last":
            return Module(False, False, x.ndim, rows=True)
        return Module(x.layout == "tokens", self.weights.shape.layout == "tokens", x.ndim)


@op("normalize_sum", category="attention")
class NormalizeSum(Op):
    """Divide by the sum over the last axis (plus `eps`): the normalisation of linear attention,
    `φ(q)φ(k)ᵀ / Σ φ(q)φ(k)ᵀ`, for non-negative scores (after `relu` or another kernel)."""

    eps: NonNegFloat = 0.0

    def build(self, x, y):
        from ..layers.heads import NormalizeSum as Module

        return Module(self.eps)


@op("l2norm", category="attention")
class L2Norm(Op):
    """Divide by the L2 norm over the last axis (each head's vector; cosine attention), or over
    the tokens (`axis = "tokens"`: cross-covariance attention). `eps` bounds the norm from below."""

    axis: Literal["last", "tokens"] = "last"
    eps: NonNegFloat = 1e-12

    def infer(self, x: Shape) -> Shape:
        if self.axis == "tokens" and x.layout not in ("tokens", "heads"):
            raise ShapeError(f"l2norm over tokens needs tokens or heads, got {x.layout} {x}")
        return x

    def build(self, x, y):
        from ..layers.heads import L2Norm as Module

        return Module(-1 if self.axis == "last" else (1 if x.layout == "tokens" else 2), self.eps)


@op("mix_heads", category="attention")
class MixHeads(Op):
    """A linear map across the heads axis of heads or scores (talking heads): every output head
    is a learned sum of the input heads. `heads`: the number out (default: as many as in).
    Parameters `weight` (heads out, heads in) and `bias`."""

    heads: Optional[Pos] = None
    bias: bool = True
    per_head = False

    def infer(self, x: Shape) -> Shape:
        if x.layout not in ("heads", "scores"):
            raise ShapeError(f"mix_heads needs heads or scores, got {x.layout} {x}")
        if self.heads is not None and self.heads <= 0:
            raise ShapeError(f"mix_heads needs at least one head out, got {self.heads}")
        return x.with_(heads=self.heads or x.heads)

    def params(self, x, y):
        return x.heads * y.heads + (y.heads if self.bias else 0)

    def macs(self, x, y):
        return x.heads * y.heads * x.tokens * x.channels

    def build(self, x, y):
        from ..layers.heads import MixHeads as Module

        return Module(x.heads, y.heads, self.bias)


@op("add_bias", category="attention")
class AddBias(Op):
    """Add a learned bias per channel, initialised to `init` (a bias on q and v only: BEiT's
    `q_bias`, `v_bias`). On heads it is one vector of heads x width, head-major, as a fused
    projection's bias would be. Parameter `bias`."""

    init: float = 0.0

    def params(self, x, y):
        return x.channels * (x.heads or 1)

    def build(self, x, y):
        from ..layers.heads import AddBias as Module

        return Module(x.channels, x.heads, x.layout == "map", self.init)


@op("head_scale", category="attention")
class HeadScale(Op):
    """Multiply each head by a learned scale (a temperature), initialised to `init`. With
    `log = true` the parameter holds the scale's logarithm and the scale is `exp` of it, at most
    `max` if given (Swin V2's logit scale: `head_scale(10, log = true, max = 100)`). Parameter
    `scale` (heads, 1, 1)."""

    init: float = 1.0
    log: bool = False
    max: Optional[PosFloat] = None

    def infer(self, x: Shape) -> Shape:
        if x.layout not in ("heads", "scores"):
            raise ShapeError(f"head_scale needs heads or scores, got {x.layout} {x}")
        if self.log and (self.init <= 0 or (self.max is not None and self.max <= 0)):
            raise ShapeError("head_scale(log = true) needs a positive init and max")
        return x

    def params(self, x, y):
        return x.heads

    def build(self, x, y):
        from ..layers.heads import HeadScale as Module

        return Module(x.heads, self.init, self.log, self.max)


@op("blend", category="attention")
class Blend(Op):
    """A learned per-head mix of the running heads or scores x and another tensor of the same shape:
    `(1 - σ(g)) · x + σ(g) · other`, one gate g per head (parameter `gate` (heads,), initialised
    to `init`). Two soft-maxed score tensors mixed this way stay a distribution over the keys
    (content and position attention gated per head)."""

    other: Tensor
    init: float = 1.0
    per_head = False

    def infer(self, x: Shape) -> Shape:
        if x.layout not in ("heads", "scores"):
            raise ShapeError(f"blend needs heads or scores, got {x.layout} {x}")
        o = self.other.shape
        if o != x:
            raise ShapeError(f"blend: the other tensor is {o.layout} {o}, the running one {x.layout} {x}",
                             "both must have the same shape")
        return x

    def params(self, x, y):
        return x.heads

    def build(self, x, y):
        from ..layers.heads import Blend as Module

        return Module(x.heads, self.init)
