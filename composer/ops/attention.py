"""One attention op with pluggable parts: which tokens a query sees (`partition`), where keys and
values come from (`kv`, any `KeySource`; `extra_kv`), how q/k/v are projected (`projection`),
which tokens are queries (`query`), position information (`position`), the score (`score`,
`scale`) and agent attention (`agents`). The module is `composer.layers.attention.Attention`.

Over 500 lines: it is one op with pluggable parts, each part's options and shape checks beside the
op that reads them; splitting the parts into objects of their own is the token-mixer issue's work
(attention as an algebra of primitives), which rewrites this module."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional, Union

from ..shapes import Shape, ShapeError
from .registry import Op, op, prod, spatial_out


def _check_groups(kind: str, size: int, grid: tuple[int, ...]) -> None:
    if size <= 0:
        raise ShapeError(f"{kind} size must be positive, got {size}")
    for g in grid:
        if g % size:
            raise ShapeError(
                f"{kind} {size} does not divide feature size {g}",
                f"choose an input size so that the grid ({'x'.join(map(str, grid))}) is a multiple of {size}",
            )


@op("window", kind="part", category="attention part")
class Window(Op):
    """Partition the token grid into non-overlapping `size`-wide windows, cyclically shifted by
    `shift` (Swin; queries and keys from different regions of the rolled grid are masked with
    -100). As in the reference, a window that covers the whole grid drops the shift. `pad=true`
    zero-pads the grid at the end of every dim up to a multiple of the window (unmasked, as timm's
    Twins and Swin) and crops the output; otherwise the window must divide the grid.

    `messengers=true`: the input's prefix tokens are one messenger per window, in window raster
    order (as `window_tokens` makes them); each joins its window's attention as one more query and
    key (MSG-Transformer), and the output keeps them ahead of the grid. With `position =
    relative_bias` the messengers, which have no offset, get two learned scalars per head,
    `rel_pos_msg` (heads, 2, 1, 1), trunc-normal(0.02): [1] on every score of a messenger query,
    [0] on the scores of grid queries for the messenger key. Not with `shift` or `pad`."""

    size: int
    shift: int = 0
    pad: bool = False
    messengers: bool = False
    mode: ClassVar[str] = "window"

    def effective(self, grid: tuple[int, ...]) -> tuple[int, int]:
        if min(grid) <= self.size:
            return min(grid), 0
        return self.size, self.shift

    def padded(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        """The grid the windows tile: with `pad=true` the tokens are zero-padded at the end of every
        dim up to a multiple of the window, and the padded tokens are unmasked keys (timm's Twins and
        Swin); the output is cropped back."""
        size, _ = self.effective(grid)
        return tuple(-(-g // size) * size for g in grid) if self.pad and size > 0 else grid

    def check(self, grid: tuple[int, ...]) -> None:
        size, shift = self.effective(grid)
        _check_groups("window", size, self.padded(grid))
        if not 0 <= shift < size:
            raise ShapeError(f"window shift {shift} must be in [0, {size})")


@op("grid", kind="part", category="attention part")
class Grid(Op):
    """Partition the token grid into groups of `size`^d tokens taken at stride grid/size, so every
    group spans the whole map (MaxViT's grid attention; `size` must divide the grid)."""

    size: int
    mode: ClassVar[str] = "grid"

    def effective(self, grid: tuple[int, ...]) -> tuple[int, int]:
        return self.size, 0

    def padded(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        return grid

    def check(self, grid: tuple[int, ...]) -> None:
        _check_groups("grid", self.size, grid)


class KeySource(Op):
    """Base class of the `kv` parts: where an attention's keys and values come from.

    Protocol (pure Python except `build`; `x` is the attention's input Shape, tokens on a grid, no
    prefix tokens):
      `grid(x) -> tuple`   the grid of the key/value tokens (raise ShapeError when `x` does not fit;
                           this is also the check, called by the attention's `infer`);
      `tokens(x) -> int`   the number M of key/value tokens (default: prod(grid(x)));
      `params(x) -> int`   parameters of the source module (not counting the attention's `kv`
                           linear, which projects the source tokens to keys and values);
      `macs(x) -> int`     its multiply-accumulates;
      `build(x)`           a torch module mapping the input as a map (B, C, *x.spatial) to the
                           key/value input tokens (B, M, C). With `needs_query = True` it is called
                           as `module(x_map, q_map)`, `q_map` the projected queries (B, C, *grid)
                           before the head split (deformable sampling predicts offsets from them).
      `score_bias() -> bool`  whether the source also gives the attention an additive score bias
                           (default False). Such a source counts the bias's parameters in
                           `bias_params(x, heads) -> int` (added to the attention's), is built as
                           `build(x, heads=heads)` with the attention's head count, and its module
                           returns `(tokens (B, M, C), bias (B, heads, N, M))`, N = prod(x.spatial)
                           queries; the bias is added to the scaled scores before the softmax
                           (`deformable(..., bias = true)`: DAT's interpolated relative positions).
    The attention then projects queries with a `q` linear (C -> C) from its input tokens and keys and
    values with one `kv` linear (C -> 2C) from the source tokens. The built module is registered on
    the attention module as the submodule `module_name`; with `module_name = None` its children and
    its own parameters are registered directly on the attention module (state_dict names without a
    prefix, as `reduce`'s `sr`/`norm`, `deformable`'s `conv_offset`/`rpe_table`; such a module must
    keep no buffers of its own).
    Subclasses register themselves with `@op(name, kind="part", category="attention part")` in any
    file; the attention's `kv` field accepts every KeySource."""

    needs_query: ClassVar[bool] = False
    module_name: ClassVar[Optional[str]] = "source"

    def grid(self, x: Shape) -> tuple[int, ...]:
        return x.spatial

    def tokens(self, x: Shape) -> int:
        return prod(self.grid(x))

    def params(self, x: Shape, y: Optional[Shape] = None) -> int:
        return 0

    def macs(self, x: Shape, y: Optional[Shape] = None) -> int:
        return 0

    def score_bias(self) -> bool:
        return False

    def bias_params(self, x: Shape, heads: int) -> int:
        return 0

    def build(self, x: Shape, y: Optional[Shape] = None):
        from ..layers.attention import TokensOf

        return TokensOf()


@op("reduce", kind="part", category="attention part")
class Reduce(KeySource):
    """Keys and values from a spatially reduced copy of the tokens, reduced by `ratio` in every
    dim: `mode="conv"` a ratio-strided conv with bias (PVT's spatial reduction, submodule `sr`),
    `mode="depthwise"` the same conv with one group per channel (CMT), `mode="pool"` average
    pooling (LITv2's Lo-Fi keys, submodule `pool`), then `norm` (submodule `norm`; a batch norm
    runs on the reduced map, any other norm on its tokens). `ratio=1` keeps the tokens but still uses separate `q` and `kv` linears. With
    `pointwise=true` (pool mode) a 1x1 conv with bias (submodule `sr`) runs before the pooling;
    `act` (an activation) follows the conv, or comes first without one: TransNeXt's pooled keys are
    `reduce(sr, "pool", pointwise = true, act = gelu, norm = layernorm(1e-6))`. Submodules are
    registered directly on the attention (no prefix)."""

    ratio: int
    mode: Literal["conv", "depthwise", "pool"] = "conv"
    norm: Optional[Op] = None
    pointwise: bool = False
    act: Optional[Op] = None
    module_name: ClassVar[Optional[str]] = None

    def grid(self, x: Shape) -> tuple[int, ...]:
        if self.ratio <= 0:
            raise ShapeError(f"reduction ratio must be positive, got {self.ratio}")
        if self.pointwise and self.mode != "pool":
            raise ShapeError("reduce(pointwise = true) is for mode \"pool\" (a 1x1 conv before the pooling)")
        if self.act is not None and self.act.params(x, x):
            raise ShapeError(f"reduce's act must be an activation without parameters, got {self.act.describe()}")
        if self.ratio == 1:
            return x.spatial
        for g in x.spatial:
            if g < self.ratio:
                raise ShapeError(f"reduction ratio {self.ratio} is larger than feature size {g}")
        return tuple(g // self.ratio for g in x.spatial)

    def _conv(self) -> bool:
        return self.ratio > 1 and self.mode != "pool"

    def _conv_in(self, c: int) -> int:  # input channels per group of the strided conv
        return 1 if self.mode == "depthwise" else c

    def params(self, x: Shape, y: Optional[Shape] = None) -> int:
        c = x.channels
        n = self._conv_in(c) * c * self.ratio ** x.ndim + c if self._conv() else 0
        n += c * c + c if self.pointwise else 0
        g = Shape(c, self.grid(x), "tokens")
        return n + (self.norm.params(g, g) if self.norm else 0)

    def macs(self, x: Shape, y: Optional[Shape] = None) -> int:
        c = x.channels
        n = prod(self.grid(x)) * self._conv_in(c) * c * self.ratio ** x.ndim if self._conv() else 0
        return n + (prod(x.spatial) * c * c if self.pointwise else 0)

    def build(self, x: Shape, y: Optional[Shape] = None):
        from ..layers.attention import ReduceKeys

        g = Shape(x.channels, self.grid(x), "tokens")
        norm = self.norm.build(g, g) if self.norm is not None else None
        act = self.act.build(x, x) if self.act is not None else None
        return ReduceKeys(x.channels, len(x.spatial), self.ratio if self.ratio > 1 else 0, self.mode, norm,
                          pointwise=self.pointwise, act=act)


@op("conv_proj", kind="part", category="attention part")
class ConvProj(Op):
    """CvT's convolutional projection: q, k and v each come from a depthwise `kernel` conv (no
    bias, padding kernel//2; stride 1 for q and `stride_kv` for k and v) followed by batch norm
    (submodules `conv_q`, `conv_k`, `conv_v`, each `.conv` and `.bn`), then a linear each (`q`,
    `k`, `v`). Prefix (class) tokens bypass the convolutions. CvT scales scores by channels^-0.5:
    pass `scale` to reproduce that."""

    kernel: int = 3
    stride_kv: int = 1

    def grid(self, x: Shape) -> tuple[int, ...]:
        if self.kernel <= 0 or self.stride_kv <= 0:
            raise ShapeError("conv_proj kernel and stride must be positive")
        return tuple(spatial_out(g, self.kernel, self.stride_kv, self.kernel // 2) for g in x.spatial)


@op("relative_bias", kind="part", category="attention part")
class RelativeBias(Op):
    """A learned bias per head for every relative offset inside a window or grid group (Swin,
    MaxViT): a table of (2w-1)^d x heads entries, trunc-normal(std 0.02) initialised, gathered by a
    fixed index. Needs a partition."""

    std: float = 0.02


@op("relative_bias_map", kind="part", category="attention part")
class RelativeBiasMap(Op):
    """A learned relative-position bias stored as one (2w-1)^d map per head, read at the
    key-minus-query offset (TensorFlow MaxViT's layout, timm's `RelPosBiasTf`): the table is
    `relative_position_bias_table` of shape (heads, 2w-1, ..., 2w-1), normal(std 0.02)
    initialised. The same number of parameters as `relative_bias`. Needs a partition."""

    std: float = 0.02


@op("neighbourhood", kind="part", category="attention part")
class Neighbourhood(Op):
    """Every query sees the `size`^d keys around it (sliding-window attention; `size` odd), taken
    at spacing `dilation`: the key grid is zero-padded by dilation*(size-1)/2 on every side, as
    `nn.Unfold(size, dilation, padding)` does (DilateFormer). Padded keys are zero vectors (after
    projection) and take part in the softmax with logit 0, unless `mask=true` masks them out
    (-inf; TransNeXt's local branch). The key index table is built once.

    `bias=true` adds a learned bias per head and neighbour offset to the scores
    (`relative_pos_bias_local` (heads, size^d), trunc-normal(0.0004)). `tokens=true` adds
    query-conditioned weights to the neighbours' softmax weights (after the softmax, not normalised):
    l2norm(q) @ `learnable_tokens` (heads, head_dim, size^d, trunc-normal 0.02) + `learnable_bias`
    (heads, 1, size^d, zeros), with the un-scaled normalised query (TransNeXt's learnable tokens).
    With `extra_kv = reduce(...)` every query also sees the pooled keys, under the same softmax
    (TransNeXt's aggregated attention)."""

    size: int
    dilation: int = 1
    mask: bool = False
    bias: bool = False
    tokens: bool = False
    mode: ClassVar[str] = "neighbourhood"

    def check(self, grid: tuple[int, ...]) -> None:
        if self.size <= 0 or self.size % 2 == 0:
            raise ShapeError(f"{self.name} size must be a positive odd number, got {self.size}")
        if self.dilation <= 0:
            raise ShapeError(f"{self.name} dilation must be positive, got {self.dilation}")


@op("dilated", kind="part", category="attention part")
class Dilated(Neighbourhood):
    """`neighbourhood` with a required `dilation`: every query sees `size`^d keys around it at
    spacing `dilation`, zero-padded (DilateFormer's dilated attention; its multi-scale form is a
    `parallel concat` of dilated attentions over head groups)."""

    size: int
    dilation: int
    mask: bool = False
    bias: bool = False
    tokens: bool = False


@op("routed", kind="part", category="attention part")
class Routed(Op):
    """Bi-level routing (BiFormer): the grid is cut into `regions` regions per dim; region-level
    queries and keys are the means of the region's q and k (no gradient); every region keeps the
    `topk` regions of highest affinity (q_region . k_region) and its queries attend to the tokens
    of those regions (topk * region tokens keys each). `regions` must divide the grid."""

    regions: int
    topk: int
    mode: ClassVar[str] = "routed"

    def region(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(g // self.regions for g in grid)

    def check(self, grid: tuple[int, ...]) -> None:
        _check_groups("routed regions", self.regions, grid)
        count = self.regions ** len(grid)
        if not 0 < self.topk <= count:
            raise ShapeError(f"routed topk {self.topk} must be in [1, {count}] (the number of regions)")


@op("learned_bias", kind="part", category="attention part")
class LearnedBias(Op):
    """A dense learned bias per head for every (query, key) pair of an attention group: a
    parameter `relative_pos` of shape (heads, queries, keys) for the current resolution (CMT; the
    model must be built at its input size), normal(0, `std`) initialised (CMT uses randn: std 1).
    `tie`: attentions whose learned_bias has the same `tie` value and the same table shape share
    one table (CMT: one per stage, `tie = i`); the first in forward order owns the parameter, so
    the state_dict holds it once and the parameter count counts it once."""

    std: float = 0.02
    tie: Optional[Union[int, str]] = None


@op("relative_xl", kind="part", category="attention part")
class RelativeXL(Op):
    """Transformer-XL relative position (Conformer's relative-position MHSA, ESPnet layout): fixed
    sinusoidal embeddings of the offsets T-1 .. -(T-1) over the token index (a buffer), projected by
    `linear_pos` (no bias); learned per-head biases `pos_bias_u`, `pos_bias_v` (heads, head_dim,
    xavier-uniform). score = ((q + u) k^T + rel_shift((q + v) P^T)) * scale, where rel_shift (the
    pad-reshape-slice trick) reads the embedding of offset i - j for query i, key j; here it is a
    gather with an index built once. Self-attention over the tokens only (no kv, partition). At
    another length T' (another input size) the table and the index are made for T' (as ESPnet's
    `extend_pe` and the reference's positional encoding do for the length they see)."""


@op("kv_tokens", kind="part", category="attention part")
class KvTokens(Op):
    """`count` learned key/value pairs prepended to the keys and values of every query (persistent
    memory / learnable kv): parameter `kv_tokens` (2, count, channels) in the projected space,
    trunc-normal(`std`). They are not projected, get zero relative/shift bias and are normalised with
    the keys under `cosine`. (TransNeXt's 'learnable tokens' are query-conditioned weights on the
    local values rather than keys; this part is the generic learnable-kv form.)"""

    count: int
    std: float = 0.02


@op("agents", kind="part", category="attention part")
class Agents(Op):
    """Agent attention (Han et al.): `count` agent tokens (a square number in 2-D) are the queries
    average-pooled to a sqrt(count)^d grid (`AdaptiveAvgPool`). Two softmaxes: the agents attend to
    the keys (agent aggregation, bias `an_bias` (heads, count, 7, 7) resized bilinearly to the key
    grid plus one per-dim table per grid axis: `ah_bias`, `aw_bias`), then the queries attend to the
    agents, whose values are those aggregates (bias `na_bias` resized to the query grid plus `ha_bias`,
    `wa_bias`). The biases are trunc-normal(0.02). A depthwise `kernel` conv with bias over V as a map
    (`dwc`; V resized to the query grid when keys are reduced) is added before `proj`. 1-D or 2-D;
    works with `kv = reduce(...)` and with unshifted windows."""

    count: int
    kernel: int = 3
    table: int = 7

    def side(self, ndim: int) -> int:
        side = round(self.count ** (1 / ndim)) if ndim else 0
        if side ** ndim != self.count:
            raise ShapeError(f"agents count {self.count} must be a {('square', 'cube')[min(ndim, 3) - 2] if ndim > 1 else 'number'}",
                             "the agents are the queries pooled to a sqrt(count) x sqrt(count) grid")
        return side


@op("given", kind="part", category="attention part")
class Given(Op):
    """The queries come with the input: its channels are [tokens (C), queries (C)]. Keys and values
    are projected from the tokens by `qkv` (a C -> 2C linear); the queries are used as given, not
    projected (GC-ViT's global query: a map of query tokens from elsewhere, `tile`d to the grid and
    concatenated in a `parallel concat`, so that every window sees the same queries). The
    attention's channels, heads and output are those of C."""


@op("first", kind="part", category="attention part")
class First(Op):
    """Only the first `count` tokens are queries; keys and values come from all tokens
    (`keys="all"`) or only from the remaining ones (`keys="rest"`). The output is the `count` query
    tokens (a 1-D sequence). Separate linears `q`, `k`, `v`. With two streams joined by
    `parallel tokens { ... }` this is cross-attention: CrossViT's class token attending to the
    other branch (`first(1)`), or one stream's tokens attending to the other's (`keys="rest"`)."""

    count: int = 1
    keys: Literal["all", "rest"] = "all"


@op("dot", kind="part", category="attention part")
class Dot(Op):
    """Scaled dot-product scores q k^T * scale (the default; scale head_dim^-0.5 unless given)."""


@op("cosine", kind="part", category="attention part")
class Cosine(Op):
    """Length-scaled cosine scores (TransNeXt): q and k are l2-normalised per head; with
    `query_embedding` a learned per-head vector `query_embedding` (heads, 1, head_dim,
    trunc-normal 0.02) is added to the normalised q; the scores are multiplied by
    softplus(`temperature`) per head (parameter `temperature` (heads, 1, 1), initialised so that
    softplus gives `init`, 1/0.24) and, with `length_scale`, by log(keys seen by the query)
    (buffer `seq_length_scale`; with a masked neighbourhood the count of unpadded keys per query).
    The attention's `scale` is not used."""

    init: float = 1 / 0.24
    query_embedding: bool = True
    length_scale: bool = True


@op("performer", kind="part", category="attention part")
class Performer(Op):
    """Linear attention with positive random features (Performer's FAVOR+, T2T-ViT's T2T layers):
    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m) for the un-scaled q and k of every head, W a frozen
    (m = `features`, head_dim) random matrix with orthogonal rows scaled by sqrt(m) (a parameter `w`
    with requires_grad=False, shared by the heads, drawn at build time); the output is
    phi(q) (phi(K)^T V) / (phi(q) . sum_j phi(k_j) + `eps`), never forming the N x M scores.
    The attention's `scale` is not used; no partition, position, extra_kv or agents."""

    features: int
    eps: float = 1e-8


@op("continuous_bias", kind="part", category="attention part")
class ContinuousBias(Op):
    """A continuous relative position bias (TransNeXt's, after Swin v2's CPB): an MLP (`cpb_fc1`
    2 -> `hidden`, ReLU, dropout `drop` (training only), `cpb_fc2` hidden -> heads, with biases) of
    the log-spaced relative coordinates between every query and every key on a grid, per axis
    (a 1-D grid uses one axis and `cpb_fc1` 1 -> hidden). `coords="normalized"` (TransNeXt, Swin
    v2): sign(r) log2(1 + |r|) / log2(8) with r = (query - key) / (grid - 1) * 8; `coords="raw"`
    (timm's RelPosMlp 'cr' mode): sign(r) ln(1 + |r|) with r = query - key.
    Keys of a reduced source sit at the centres of their pooling cells (adaptive average pooling of
    the axis). The keys are the attention's tokens, or its `kv` source's, or, with a neighbourhood
    partition, the pooled keys of its `extra_kv` source; with a window or grid partition, the
    queries and keys are one group's (the grid is the group's, the same bias for every group). The
    table of distinct coordinates and the (queries, keys) index are buffers, built once for the
    input size."""

    hidden: int = 512
    coords: Literal["normalized", "raw"] = "normalized"
    drop: float = 0.0


@op("lepe", kind="part", category="attention part")
class LePE(Op):
    """Locally-enhanced position encoding (CSWin, BiFormer): a depthwise `kernel` conv with bias,
    added to the attention output before `proj` (submodule `lepe`). `source="v"`: over V as a map (per
    group for window/grid partitions, over the whole map otherwise: BiFormer's routed attention);
    `source="input"`: over the attention's input tokens as a map (BiFormer's global stage). Needs
    keys on the query grid (no reduction) and no prefix tokens."""

    kernel: int = 3
    source: Literal["v", "input"] = "v"


def cpb_centres(size: int, keys: int) -> list[float]:
    """The positions of `keys` keys pooled from an axis of `size` positions: the mean of each
    adaptive-average-pooling cell [floor(j size / keys), ceil((j + 1) size / keys))."""
    return [(j * size // keys + -(-(j + 1) * size // keys) - 1) / 2 for j in range(keys)]


def cpb_counts(grid: tuple[int, ...], keys: tuple[int, ...]) -> list[int]:
    """Per axis, the number of distinct query-minus-key offsets of `continuous_bias` (the table has
    their product of rows)."""
    return [len({q - k for q in range(g) for k in cpb_centres(g, m)}) for g, m in zip(grid, keys)]


def _is_local(partition) -> bool:
    return isinstance(partition, (Window, Grid))


@op("attention", category="attention", layout="tokens")
class Attention(Op):
    """Multi-head attention over tokens, with pluggable parts.

    Heads: `heads`, or `head_dim` (heads = channels / head_dim). Projections: one `qkv` linear; `q`
    and `kv` linears with a key source `kv=reduce(...)` (or any KeySource part); `q`, `k`, `v` with
    `projection=conv_proj(...)` (CvT) or `query=first(...)`; output projection `proj` to `out`
    channels. Which keys a query sees: `partition=window(...)|grid(...)|neighbourhood(k)|
    dilated(k, r)|routed(regions, topk)`. Position: `position=relative_bias|relative_bias_map|
    learned_bias|relative_xl|lepe(...)`. Extra keys: `extra_kv=kv_tokens(n)`. Queries:
    `query=given` (queries come with the input) or `first(n, keys="all"|"rest")`. Scores:
    `score=dot` (default; `scale` defaults to head_dim^-0.5) or `cosine(...)`. `agents=agents(n)`
    turns it into agent attention. `dim` sets the width of q, k and v (default: the input's; heads
    divide it) and `proj=false` drops the output projection (the output then has `dim` channels):
    DilateFormer's multi-scale dilated attention is a `parallel concat` of `attention(h,
    partition = dilated(3, r), dim = C / n, proj = false)` branches followed by one `linear`.
    `score=performer(m)` is linear attention with random features (T2T-ViT). `value_skip=true` adds
    the values V (heads merged) to the output after `proj` (T2T's layers: y = v + proj(attn); keys
    from the tokens, and the output as wide as V). `extra_kv=reduce(...)` (any key source) adds its
    keys to every query's keys under the same softmax, projected by the same `kv` linear as the
    tokens' (q and kv linears): with `partition=neighbourhood(3, mask=true, bias=true, tokens=true)`,
    `score=cosine` and `position=continuous_bias` this is TransNeXt's aggregated attention.
    `partition=window(w, messengers=true)` lets one prefix token per window join that window
    (MSG-Transformer).
    Computed with `F.scaled_dot_product_attention` where it applies;
    masks and index tables are built once. Linear weights trunc-normal(0.02), biases zero."""

    heads: Optional[int] = None
    head_dim: Optional[int] = None
    qkv_bias: bool = True
    proj_bias: bool = True
    out: Optional[int] = None
    partition: Optional[Union[Window, Grid, Dilated, Neighbourhood, Routed]] = None
    kv: Optional[KeySource] = None
    projection: Optional[ConvProj] = None
    position: Optional[Union[RelativeBias, RelativeBiasMap, LearnedBias, RelativeXL, LePE, ContinuousBias]] = None
    scale: Optional[float] = None
    query: Optional[Union[Given, First]] = None
    score: Optional[Union[Dot, Cosine, Performer]] = None
    extra_kv: Optional[Union[KvTokens, KeySource]] = None
    agents: Optional[Agents] = None
    dim: Optional[int] = None
    proj: bool = True
    value_skip: bool = False

    # -------------------------------------------------------------- geometry
    def _given(self) -> bool:
        return isinstance(self.query, Given)

    def _tokens_kv(self) -> int:
        """The number of learned kv tokens (`extra_kv = kv_tokens(n)`)."""
        return self.extra_kv.count if isinstance(self.extra_kv, KvTokens) else 0

    def _source(self) -> Optional[KeySource]:
        """The extra key source (`extra_kv = reduce(...)` or any KeySource)."""
        return self.extra_kv if isinstance(self.extra_kv, KeySource) else None

    def _messengers(self) -> bool:
        return isinstance(self.partition, Window) and self.partition.messengers

    def _split_qkv(self) -> bool:
        """Separate q and kv linears (a key source, for the keys or for extra keys)."""
        return self.kv is not None or self._source() is not None

    def _first(self) -> Optional[First]:
        return self.query if isinstance(self.query, First) else None

    def dynamic_form(self) -> "Attention":
        """Under dynamic_img_size window attention pads the grid up to a multiple of its window (timm's
        Swin with strict_img_size=False); the built module pads whenever the grid needs it."""
        part = self.partition
        if isinstance(part, Window) and not part.pad and not part.messengers:
            return self.model_copy(update={"partition": part.model_copy(update={"pad": True})})
        return self

    def admits_grid(self, built: Shape, got: Shape, dynamic: bool) -> str | None:
        """Window and grid attention keep the window, shift and tables of the build grid (timm's
        Swin does the same): another grid must be a multiple of the window, or is padded up to one
        (`window(pad = true)`, or any window under dynamic_img_size)."""
        if self.partition is None or not self.runtime_grid(built):
            return super().admits_grid(built, got, dynamic)
        size, _ = self.partition.effective(built.spatial)
        pads = isinstance(self.partition, Window) and (self.partition.pad or dynamic)
        if not pads and any(g % size for g in got.spatial):
            return (f"keeps its {self.partition.mode} of {size} from the build grid {built}, which does not "
                    f"divide the grid {got}" + (" (build it with dynamic_img_size=True to pad it)"
                                                   if isinstance(self.partition, Window) else ""))
        return None

    def runtime_grid(self, x: Shape) -> bool:
        """Whether the module runs at another grid than `x`'s (it is given the grid at run time):
        global attention with keys from the tokens or a `reduce` of their map, position none, LePE
        or relative_xl (its sinusoidal table made for the length it gets); window (not messengers) and grid attention with position parts sized by the window,
        the shifted windows' mask made for each grid (padded up to a multiple of the window). Other
        parts hold tables, masks or counts sized by the build grid (for now)."""
        if self.agents is not None or self.query is not None or self.extra_kv is not None \
                or not (self.kv is None or isinstance(self.kv, Reduce)):
            return False
        if self.partition is None:
            return (self.position is None or isinstance(self.position, (LePE, RelativeXL))) \
                and not (isinstance(self.score, Cosine) and self.score.length_scale)
        if isinstance(self.partition, Window) and not self.partition.messengers or isinstance(self.partition, Grid):
            return self.position is None or isinstance(self.position, (RelativeBias, RelativeBiasMap, LePE, ContinuousBias))
        return False

    def _x(self, x: Shape) -> Shape:
        """The shape the attention works in: the token half of the channels with `query=given`."""
        return x.with_(channels=x.channels // 2) if self._given() else x

    def inner(self, x: Shape) -> int:
        """The width of q, k and v."""
        return self.dim if self.dim is not None else self._x(x).channels

    def geometry(self, x: Shape) -> tuple[int, int]:
        """(heads, head_dim) for input `x`."""
        x = self._x(x).with_(channels=self.inner(x))
        if x.channels <= 0:
            raise ShapeError(f"attention dim must be positive, got {x.channels}")
        if self.heads is None and self.head_dim is None:
            raise ShapeError("attention needs `heads` or `head_dim`")
        if self.heads is not None:
            if self.heads <= 0 or x.channels % self.heads:
                raise ShapeError(
                    f"{self.heads} heads do not divide the {x.channels} channels",
                    "the channel count must be a multiple of the number of heads",
                )
            return self.heads, x.channels // self.heads
        if self.head_dim <= 0 or x.channels % self.head_dim:
            raise ShapeError(f"head_dim {self.head_dim} does not divide the {x.channels} channels")
        return x.channels // self.head_dim, self.head_dim

    def _group(self, x: Shape) -> tuple[int, ...]:
        """The grid of one window/grid group, else the whole grid."""
        if _is_local(self.partition):
            return (self.partition.effective(x.spatial)[0],) * x.ndim
        return x.spatial

    def _kv_grid(self, x: Shape) -> tuple[int, ...]:
        if self.kv is not None:
            return self.kv.grid(x)
        if self.projection is not None:
            return self.projection.grid(x)
        return self._group(x)

    def _queries(self, x: Shape) -> int:
        """Queries per attention group."""
        first = self._first()
        if first is not None:
            return first.count
        if _is_local(self.partition):
            return prod(self._group(x)) + self._messengers()
        if isinstance(self.partition, Routed):
            return prod(self.partition.region(x.spatial))
        return x.tokens  # also a neighbourhood: one group per batch element, one key set per query

    def _keys(self, x: Shape) -> int:
        """Keys seen by one query (learned kv tokens and extra source keys included)."""
        extra = self._tokens_kv() + (self._source().tokens(self._x(x)) if self._source() is not None else 0)
        first = self._first()
        if first is not None:
            return extra + x.tokens - (first.count if first.keys == "rest" else 0)
        if isinstance(self.partition, Neighbourhood):
            return extra + self.partition.size ** x.ndim
        if isinstance(self.partition, Routed):
            return extra + self.partition.topk * prod(self.partition.region(x.spatial))
        if self.kv is not None:
            return extra + self.kv.tokens(x)
        if _is_local(self.partition):
            return extra + prod(self._group(x)) + self._messengers()
        return extra + x.extra + prod(self._kv_grid(x))

    def _bias_grid(self, x: Shape) -> tuple[int, ...]:
        """The key grid of `continuous_bias`: the kv source's, the extra source's, or the tokens'."""
        if self.kv is not None:
            return self.kv.grid(x)
        if self._source() is not None and isinstance(self.partition, Neighbourhood):
            return self._source().grid(x)
        return self._group(x)

    def _windows(self, x: Shape) -> int:
        """The number of windows (messengers) of a window partition."""
        size, _ = self.partition.effective(x.spatial)
        return prod(g // size for g in self.partition.padded(x.spatial))

    # -------------------------------------------------------------- shape rule
    def infer(self, x: Shape) -> Shape:
        first = self._first()
        if self._given():
            if x.channels % 2:
                raise ShapeError(f"query=given needs [tokens, queries] channels of equal size, got {x.channels}")
            if self.kv is not None or self.projection is not None or isinstance(self.position, LePE):
                raise ShapeError("query=given cannot be combined with kv, projection or lepe parts")
            x = self._x(x)
        self.geometry(x)
        p = self.partition
        if first is not None:
            if first.count <= 0 or first.count > x.tokens or (first.keys == "rest" and first.count >= x.tokens):
                raise ShapeError(f"query=first({first.count}) needs more tokens than queries, got {x.tokens} tokens")
            if p is not None or self.kv is not None or self.projection is not None or self.position is not None \
                    or self.agents is not None:
                raise ShapeError("query=first(...) cannot be combined with partition, kv, projection, position or agents")
        if self._messengers():
            if not x.ndim:
                raise ShapeError("window attention needs tokens on a spatial grid")
            p.check(x.spatial)
            if p.effective(x.spatial)[1] or p.pad:
                raise ShapeError("window(messengers = true) cannot be shifted or padded")
            if x.extra != self._windows(x):
                raise ShapeError(f"window(messengers = true) needs one prefix token per window: "
                                 f"{self._windows(x)} windows, got {x.extra} prefix tokens",
                                 "add them with window_tokens(size) before the first such attention")
            if self.position is not None and not isinstance(self.position, RelativeBias) or \
                    self.extra_kv is not None or self.agents is not None or self._given() or \
                    isinstance(self.score, Performer):
                raise ShapeError("messengers work with position = relative_bias or none, without extra_kv, agents, "
                                 "given queries or performer")
        if p is not None:
            if x.extra and not self._messengers():
                raise ShapeError(f"{p.name} attention cannot take class tokens")
            if not x.ndim:
                raise ShapeError(f"{p.name} attention needs tokens on a spatial grid")
            if self.kv is not None or self.projection is not None:
                raise ShapeError(f"{p.name} attention cannot be combined with kv or projection parts")
            p.check(x.spatial)
            if not _is_local(p) and self._given():
                raise ShapeError(f"query=given needs a window or grid partition or none, not {p.name}")
        if self.kv is not None and self.projection is not None:
            raise ShapeError("attention takes either a kv part or projection=conv_proj(...), not both")
        if isinstance(self.position, (RelativeBias, RelativeBiasMap)) and not _is_local(p):
            raise ShapeError(f"{self.position.name} needs a window or grid partition")
        if isinstance(self.position, LearnedBias) and isinstance(p, Routed):
            raise ShapeError("learned_bias cannot be combined with routed keys (the key set changes per input)")
        if isinstance(self.position, RelativeXL):
            if p is not None or self.kv is not None or self.agents is not None or self.extra_kv is not None or \
                    (self.projection is not None and self.projection.stride_kv != 1):
                raise ShapeError("relative_xl is for self-attention over all tokens: no partition, kv, agents, "
                                 "extra_kv or strided projection")
        if self.kv is not None and x.extra:
            raise ShapeError(f"keys/values from `{self.kv.name}` cannot take class tokens")
        if self.kv is not None and self.kv.score_bias():
            if self.extra_kv is not None or self.agents is not None or isinstance(self.score, Performer):
                raise ShapeError(f"`{self.kv.name}` with a score bias takes no extra_kv, agents or performer")
            self.kv.bias_params(x, self.geometry(x)[0])  # the source's check of the head count
        if (self.kv is not None or self.projection is not None or isinstance(self.position, LePE) or
                self.agents is not None or isinstance(self.position, LearnedBias)) and not x.ndim:
            raise ShapeError("this attention needs tokens on a spatial grid")
        kv_grid = self._kv_grid(x)
        if isinstance(self.position, LePE):
            if x.extra:
                raise ShapeError("lepe cannot take class tokens")
            if kv_grid != self._group(x):
                raise ShapeError("lepe needs keys/values on the query grid (no reduction, stride_kv = 1)")
            if self.position.kernel <= 0:
                raise ShapeError("lepe kernel must be positive")
            if self.position.source == "input" and p is not None:
                raise ShapeError("lepe(source=\"input\") is for attention without partition")
        if isinstance(self.extra_kv, KvTokens) and self.extra_kv.count <= 0:
            raise ShapeError(f"kv_tokens count must be positive, got {self.extra_kv.count}")
        src = self._source()
        if src is not None:
            if (p is not None and not isinstance(p, Neighbourhood)) or self.kv is not None or \
                    self.projection is not None or self.query is not None or self.agents is not None or x.extra:
                raise ShapeError("extra keys from a key source work over all tokens or with a neighbourhood partition, "
                                 "without kv, projection, query, agents or class tokens")
            if not x.ndim:
                raise ShapeError("extra keys from a key source need tokens on a spatial grid")
            if src.needs_query:
                raise ShapeError(f"{src.name} cannot be an extra key source (it needs the queries)")
            src.grid(x)
        if isinstance(self.score, Performer):
            if self.score.features <= 0:
                raise ShapeError(f"performer features must be positive, got {self.score.features}")
            if p is not None or self.position is not None or self.extra_kv is not None or self.agents is not None:
                raise ShapeError("performer attention takes no partition, position, extra_kv or agents")
        if isinstance(self.position, ContinuousBias):
            if self.position.hidden <= 0:
                raise ShapeError(f"continuous_bias hidden must be positive, got {self.position.hidden}")
            if not 0 <= self.position.drop < 1:
                raise ShapeError(f"continuous_bias drop must be in [0, 1), got {self.position.drop}")
            if x.extra or not x.ndim or isinstance(p, Routed) or self.projection is not None or \
                    self.query is not None or self.agents is not None or \
                    (_is_local(p) and (self.kv is not None or src is not None or self._messengers())):
                raise ShapeError("continuous_bias needs tokens on a grid without class tokens, and no routed "
                                 "partition, projection, query or agents (with a window or grid partition: no kv, "
                                 "extra_kv or messengers)")
            if src is not None and p is None:
                raise ShapeError("continuous_bias with extra_kv = reduce(...) needs a neighbourhood partition")
            if isinstance(p, Neighbourhood) and src is None:
                raise ShapeError("continuous_bias with a neighbourhood partition is for the keys of an extra_kv source",
                                 "add extra_kv = reduce(...), or use neighbourhood(..., bias = true)")
            if x.ndim > 2:
                raise ShapeError("continuous_bias works on 1-D and 2-D grids")
        if self.value_skip:
            if p is not None or self.kv is not None or self.projection is not None or self.query is not None or \
                    self.agents is not None or self.extra_kv is not None:
                raise ShapeError("value_skip needs the values of the tokens themselves: no partition, kv, projection, "
                                 "query, agents or extra_kv")
            if self.proj and (self.out or x.channels) != self.inner(x):
                raise ShapeError(f"value_skip adds V ({self.inner(x)} channels) to the output "
                                 f"({self.out or x.channels} channels): they must be equally wide",
                                 "set `out` to the attention's `dim`")
        if self.agents is not None:
            a = self.agents
            if x.extra or x.ndim > 2:
                raise ShapeError("agents need a 1-D or 2-D grid without class tokens")
            if (p is not None and not isinstance(p, Window)) or (isinstance(p, Window) and p.effective(x.spatial)[1]) \
                    or self.position is not None or self.extra_kv is not None or isinstance(self.score, Cosine) \
                    or self._given():
                raise ShapeError("agents work without partition or with unshifted windows, and without position, "
                                 "extra_kv, cosine or given queries")
            a.side(x.ndim)
            if a.count <= 0 or a.kernel <= 0 or a.kernel % 2 == 0 or a.table <= 0:
                raise ShapeError("agents count, table and (odd) kernel must be positive")
        if isinstance(self.score, Performer) and x.extra and self.kv is not None:
            raise ShapeError("performer with a kv source cannot take class tokens")
        if isinstance(self.score, Cosine) and isinstance(self.position, RelativeXL):
            raise ShapeError("cosine scores cannot be combined with relative_xl")
        if isinstance(self.score, Cosine) and self.score.init <= 0:
            raise ShapeError("cosine init (softplus of the temperature) must be positive")
        if self.dim is not None and self._given():
            raise ShapeError("query=given takes no `dim` (the queries set the width)")
        if isinstance(self.position, LePE) and self.position.source == "input" and self.inner(x) != x.channels:
            raise ShapeError("lepe(source=\"input\") needs `dim` equal to the input channels")
        if not self.proj and self.out is not None:
            raise ShapeError("`out` sets the output projection's width: it cannot be given with proj=false")
        channels = (self.out or x.channels) if self.proj else self.inner(x)
        if first is not None:
            return Shape(channels, (first.count,), "tokens")
        return x.with_(channels=channels)

    # -------------------------------------------------------------- parameters and MACs
    tied: ClassVar[bool] = True

    def ties(self) -> bool:
        return isinstance(self.position, LearnedBias) and self.position.tie is not None

    def tie_key(self, x) -> tuple | None:
        """(key, parameters) of a table shared with other attentions (`learned_bias(tie = ...)`)."""
        pos = self.position
        if not self.ties():
            return None
        h, x = self.geometry(x)[0], self._x(x)
        shape = (h, self._queries(x), self._keys(x))
        return ("learned_bias", pos.tie, shape), prod(shape)

    def params(self, x, y):
        h, cd, x = self.geometry(x)[0], self.inner(x), self._x(x)
        c, d = x.channels, x.ndim
        b = 1 if self.qkv_bias else 0
        n = 3 * (c * cd + b * cd)
        if self._given():
            n -= c * cd + b * cd  # no q projection
        if self.kv is not None:
            n += self.kv.params(x) + self.kv.bias_params(x, h)
        if self.projection is not None:
            n += 3 * (c * self.projection.kernel ** d + 2 * c)  # depthwise conv + batch norm each
        if isinstance(self.position, (RelativeBias, RelativeBiasMap)):
            n += (2 * self.partition.effective(x.spatial)[0] - 1) ** d * h
        if isinstance(self.position, LearnedBias):
            n += h * self._queries(x) * self._keys(x)
        if isinstance(self.position, RelativeXL):
            n += cd * cd + 2 * cd
        if isinstance(self.position, LePE):
            n += cd * self.position.kernel ** d + cd
        if isinstance(self.score, Cosine):
            n += h + (cd if self.score.query_embedding else 0)
        if isinstance(self.score, Performer):
            n += self.score.features * (cd // h)  # the frozen random matrix `w`
        if isinstance(self.position, ContinuousBias):
            hid = self.position.hidden
            n += (d + 1) * hid + (hid + 1) * h
        if isinstance(self.partition, Neighbourhood):
            k = self.partition.size ** d
            n += h * k * self.partition.bias + (h * (cd // h) * k + h * k) * self.partition.tokens
        if self._messengers() and isinstance(self.position, RelativeBias):
            n += 2 * h  # rel_pos_msg
        n += 2 * self._tokens_kv() * cd
        if self._source() is not None:
            n += self._source().params(x)
        if self.agents is not None:
            a, grid = self.agents, self._group(x)
            kv = self.kv.grid(x) if self.kv is not None else grid
            n += 2 * h * a.count * a.table ** d + h * a.count * (sum(kv) + sum(grid))
            n += cd * a.kernel ** d + cd
        if self.proj:
            n += cd * y.channels + (y.channels if self.proj_bias else 0)
        return n

    def macs(self, x, y):
        """Linear and conv multiply-accumulates plus q k^T and attn v (and the routing product, the
        relative_xl position product, the agents' two products); norms, softmax, pooling and bias
        gathers are not counted."""
        cd, x = self.inner(x), self._x(x)
        c, d, n = x.channels, x.ndim, x.tokens
        first = self._first()
        extra = self._tokens_kv()
        if first is not None:
            nq, m = first.count, self._keys(x) - extra
            total = nq * c * cd + 2 * m * c * cd + 2 * nq * (m + extra) * cd
            return total + (nq * cd * y.channels if self.proj else 0)
        out = n * cd * y.channels if self.proj else 0  # proj (after cropping padded windows)
        if _is_local(self.partition):
            n = prod(self.partition.padded(x.spatial)) + (self._windows(x) if self._messengers() else 0)
        total = n * c * cd if not self._given() else 0  # q
        if self.kv is not None:
            m = self.kv.tokens(x)
            total += 2 * m * c * cd + self.kv.macs(x)  # k, v from the key source, and the source
        elif self.projection is not None:
            m = x.extra + prod(self.projection.grid(x))
            k = self.projection.kernel ** d
            total += 2 * m * c * cd + (prod(x.spatial) + 2 * prod(self.projection.grid(x))) * c * k
        else:
            m = n
            total += 2 * n * c * cd  # k, v from the same tokens
        if self.agents is not None:
            a = self.agents.count
            groups = n // prod(self._group(x)) if self.partition is not None else 1
            keys = m // groups
            total += groups * 2 * a * keys * cd + 2 * n * a * cd  # agents x keys, queries x agents
            total += n * cd * self.agents.kernel ** d
            return total + out
        src = self._source()
        if src is not None:
            total += 2 * src.tokens(x) * c * cd + src.macs(x)  # the extra keys, values and their source
        if isinstance(self.score, Performer):
            f, h = self.score.features, self.geometry(x)[0]
            # phi(q), phi(k), phi(K)^T V, phi(q) (phi(K)^T V) and the normaliser phi(q) . sum phi(k)
            return total + (2 * n + 2 * m) * f * cd + n * f * h + out
        total += 2 * n * self._keys(x) * cd  # q @ k^T and attn @ v
        if isinstance(self.partition, Neighbourhood) and self.partition.tokens:
            total += n * cd * self.partition.size ** d  # l2norm(q) @ learnable_tokens
        if isinstance(self.position, ContinuousBias):
            hid, h = self.position.hidden, self.geometry(x)[0]
            total += prod(cpb_counts(self._group(x), self._bias_grid(x))) * (d * hid + hid * h)  # the bias MLP
        if isinstance(self.partition, Routed):
            total += self.partition.regions ** (2 * d) * cd  # region affinity
        if isinstance(self.position, RelativeXL):
            total += (2 * n - 1) * cd * cd + n * (2 * n - 1) * cd  # linear_pos and (q + v) P^T
        if isinstance(self.position, LePE):
            total += n * cd * self.position.kernel ** d  # over the (padded) groups or the map
        return total + out

    # -------------------------------------------------------------- module
    def build(self, x, y):
        from ..layers.attention import Attention as Module

        heads, _ = self.geometry(x)
        xs = self._x(x)
        p = self.partition
        cfg = dict(
            dim=self.inner(x), cin=xs.channels, out=y.channels if self.proj else 0, heads=heads, grid=x.spatial, extra=x.extra, qkv_bias=self.qkv_bias,
            proj_bias=self.proj_bias, scale=self.scale, input_query=self._given(),
        )
        if _is_local(p):
            size, shift = p.effective(x.spatial)
            cfg.update(partition=p.mode, size=size, shift=shift, padded=p.padded(x.spatial))
        elif isinstance(p, Neighbourhood):
            cfg.update(partition="neighbourhood", size=p.size, dilation=p.dilation, pad_mask=p.mask)
        elif isinstance(p, Routed):
            cfg.update(partition="routed", regions=p.regions, topk=p.topk)
        pos = self.position
        if isinstance(pos, RelativeBias):
            cfg.update(relative_bias=True)
        elif isinstance(pos, RelativeBiasMap):
            cfg.update(relative_bias="map")
        elif isinstance(pos, LearnedBias):
            cfg.update(learned_bias=(self._queries(xs), self._keys(xs), pos.std),
                       tie=None if pos.tie is None else self.tie_key(x)[0])
        elif isinstance(pos, RelativeXL):
            cfg.update(relative_xl=True)
        elif isinstance(pos, LePE):
            cfg.update(lepe=pos.kernel, lepe_source=pos.source)
        if self.kv is not None:
            cfg.update(key_source=self.kv.build(xs, heads=heads) if self.kv.score_bias() else self.kv.build(xs),
                       key_source_name=self.kv.module_name,
                       key_source_query=self.kv.needs_query, kv_grid=self.kv.grid(xs))
        if self.projection is not None:
            cfg.update(conv_proj=(self.projection.kernel, self.projection.stride_kv))
        first = self._first()
        if first is not None:
            cfg.update(queries=first.count, keys_rest=first.keys == "rest")
        if isinstance(self.score, Cosine):
            cfg.update(cosine=(self.score.init, self.score.query_embedding, self.score.length_scale))
        if isinstance(self.extra_kv, KvTokens):
            cfg.update(kv_tokens=(self.extra_kv.count, self.extra_kv.std))
        src = self._source()
        if src is not None:
            cfg.update(extra_source=src.build(xs), extra_source_name=src.module_name, extra_grid=src.grid(xs))
        if isinstance(self.score, Performer):
            cfg.update(performer=(self.score.features, self.score.eps))
        if isinstance(pos, ContinuousBias):
            cfg.update(continuous_bias=(pos.hidden, self._bias_grid(xs), pos.coords, pos.drop))
        if isinstance(p, Neighbourhood):
            cfg.update(local_bias=p.bias, local_tokens=p.tokens)
        cfg.update(value_skip=self.value_skip, messengers=self._messengers())
        if self.agents is not None:
            cfg.update(agents=(self.agents.count, self.agents.kernel, self.agents.table))
        module = Module(**cfg)
        # a window the blueprint pads (`pad = true`) pads, then rolls, as the official Swin; a grid
        # padded only because the model runs at another size rolls, then pads, as timm's
        module.pad_first = isinstance(self.partition, Window) and self.partition.pad
        return module


# ------------------------------------------------------------------------------ cascaded group attention
@op("offset_bias", kind="part", category="attention part")
class OffsetBias(Op):
    """A learned bias per head for every absolute offset (|d1|, |d2|, ...) between two positions of
    an attention group (LeViT, EfficientViT-M): a `heads` x prod(group) table (parameter
    `attention_biases`), zero-initialised, gathered by a fixed index (offset |d1| * g2 + |d2| in 2-D,
    mixed radix in general). Used by `cascaded_attention`."""


@op("cascaded_attention", category="attention", layout="map")
class CascadedAttention(Op):
    """Cascaded group attention over a map (EfficientViT-M's heads as cascaded channel groups).

    The channels are split into `heads` equal groups. Head i takes its group plus the previous
    head's output (head 0 its group alone), projects it with a 1x1 conv without bias and batch norm
    (submodule `qkvs.<i>`, with `.conv` and `.bn`) to a query and a key of `key_dim` channels and a
    value of channels/heads channels, runs a depthwise conv without bias plus batch norm over the
    query (`dws.<i>`, kernel `q_kernel`, one int or one per head; 0 leaves the query alone), and
    attends with scores scaled by key_dim^-0.5 (or `scale`) plus the head's `position` bias. The
    output is the heads' outputs concatenated (the input's channels); the output projection is left
    to the blueprint. `partition=window(size, pad=...)` runs it in windows (no shift; the query's
    depthwise conv sees one window). `position=offset_bias`.

    At another grid (another input size) windowed attention keeps the window of the build grid and
    its bias table (timm's LocalWindowAttention keeps its resolution too), and the map is padded up
    to a multiple of it (`pad=true`, or any window under dynamic_img_size); without a partition
    the table is sized by the grid and the op is tied to it."""

    heads: int
    key_dim: int
    q_kernel: Union[int, list[int]] = 5
    partition: Optional[Window] = None
    position: Optional[OffsetBias] = None
    scale: Optional[float] = None

    def runtime_grid(self, x: Shape) -> bool:
        return self.partition is not None

    def admits_grid(self, built: Shape, got: Shape, dynamic: bool) -> str | None:
        if not self.runtime_grid(built):
            return super().admits_grid(built, got, dynamic)
        size, _ = self.partition.effective(built.spatial)
        if not (self.partition.pad or dynamic) and any(g % size for g in got.spatial):
            return (f"keeps its window of {size} from the build grid {built}, which does not divide the grid "
                    f"{got} (build it with dynamic_img_size=True to pad it)")
        return None

    def kernels(self) -> list[int]:
        k = self.q_kernel
        return list(k) if isinstance(k, list) else [k] * self.heads

    def _group(self, x: Shape) -> tuple[int, ...]:
        if self.partition is not None:
            return (self.partition.effective(x.spatial)[0],) * x.ndim
        return x.spatial

    def infer(self, x: Shape) -> Shape:
        if not x.ndim:
            raise ShapeError("cascaded_attention needs a map with a spatial grid")
        if self.heads <= 0 or x.channels % self.heads:
            raise ShapeError(f"{self.heads} heads do not divide the {x.channels} channels",
                             "the channel count must be a multiple of the number of heads")
        if self.key_dim <= 0:
            raise ShapeError(f"key_dim must be positive, got {self.key_dim}")
        ks = self.kernels()
        if len(ks) < self.heads:
            raise ShapeError(f"q_kernel gives {len(ks)} kernels for {self.heads} heads",
                             "give one kernel per head, or one int for all")
        if any(k < 0 or (k and k % 2 == 0) for k in ks[:self.heads]):
            raise ShapeError(f"q_kernel sizes must be odd (or 0 for none), got {ks[:self.heads]}")
        if self.partition is not None:
            if self.partition.effective(x.spatial)[1]:
                raise ShapeError("cascaded_attention windows cannot be shifted")
            self.partition.check(x.spatial)
        return x

    def _sizes(self, x: Shape) -> tuple[int, int, int]:
        """(group channels, qkv channels per head, value channels)."""
        v = x.channels // self.heads
        return v, 2 * self.key_dim + v, v

    def params(self, x, y):
        g, qkv, _ = self._sizes(x)
        n = self.heads * (g * qkv + 2 * qkv)
        n += sum(self.key_dim * k ** x.ndim + 2 * self.key_dim for k in self.kernels()[:self.heads] if k)
        if self.position is not None:
            n += self.heads * prod(self._group(x))
        return n

    def macs(self, x, y):
        """The projections, the query's depthwise conv, q k^T and attn v, over the (padded) grid."""
        g, qkv, v = self._sizes(x)
        grid = self.partition.padded(x.spatial) if self.partition is not None else x.spatial
        n, m = prod(grid), prod(self._group(x))
        total = self.heads * n * (g * qkv + m * (self.key_dim + v))
        total += sum(n * self.key_dim * k ** x.ndim for k in self.kernels()[:self.heads] if k)
        return total

    def build(self, x, y):
        from ..layers.attention import CascadedAttention as Module

        size = self.partition.effective(x.spatial)[0] if self.partition is not None else 0
        return Module(
            dim=x.channels, heads=self.heads, key_dim=self.key_dim, kernels=self.kernels()[:self.heads],
            grid=x.spatial, size=size,
            padded=self.partition.padded(x.spatial) if self.partition is not None else None,
            offset_bias=self.position is not None, scale=self.scale,
        )
