"""The parts of `attention` that say where queries, keys and values come from: key sources
(`kv`, `extra_kv`), the convolutional projection, learned key/value tokens, given queries and
the first tokens as queries. See protocol.py for what a part owns."""


from typing import ClassVar, Literal, Optional

from ...shapes import Shape, ShapeError
from ..registry import NonNegFloat, Op, Pos, op, prod, spatial_out
from .protocol import Part, rule

GRID = rule("this attention needs tokens on a spatial grid", needs={"grid"})
KV_ROWS = (
    rule("attention takes either a kv part or projection=conv_proj(...), not both", excludes={"projection"}),
    rule("keys/values from `{kv}` cannot take class tokens", excludes={"prefix"}),
    rule("`{kv}` with a score bias takes no extra_kv, agents or performer", when={"kv_score_bias"},
         excludes={"extra_kv", "agents", "performer"}),
    GRID,
)
EXTRA_ROWS = (
    rule("extra keys from a key source work over all tokens or with a neighbourhood partition, "
         "without kv, projection, query, agents or class tokens",
         excludes={"local", "routed", "kv", "projection", "query", "agents", "prefix"}),
    rule("extra keys from a key source need tokens on a spatial grid", needs={"grid"}),
    rule("{extra_kv} cannot be an extra key source (it needs the queries)", excludes={"extra_needs_query"}),
)


class KeySource(Part):
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

    # -------------------------------------------------------------- as a part (role kv or extra_kv)
    def provides(self, x, role):
        if role == "kv":
            return {"kv", "kv_score_bias"} if self.score_bias() else {"kv"}
        return {"extra_kv", "extra_source"} | ({"extra_needs_query"} if self.needs_query else set())

    def requirements(self, role):
        return KV_ROWS if role == "kv" else EXTRA_ROWS

    def sizes(self, x):  # in the kv role (an extra key source adds `extra_keys` instead)
        return dict(kv_grid=self.grid(x), keys=self.tokens(x), kv_tokens=self.tokens(x))

    def extra_keys(self, x):
        return self.tokens(x)

    def check_part(self, att, g):
        self.grid(g.x)
        if self is att.kv and self.score_bias():
            self.bias_params(g.x, g.heads)  # the source's check of the head count

    def add_params(self, att, g):
        if self is att.kv:
            return self.params(g.x) + self.bias_params(g.x, g.heads)
        return self.params(g.x)

    def add_macs(self, att, g):
        if self is att.kv:  # the k, v linear over its tokens is the attention's
            return self.macs(g.x)
        return 2 * self.tokens(g.x) * g.channels * g.inner + self.macs(g.x)  # the extra keys, values, source

    def layer(self, att, g):
        from ...layers.attention.projections import SourcedQKV

        module = self.build(g.x, heads=g.heads) if self is att.kv and self.score_bias() else self.build(g.x)
        return SourcedQKV(g.channels, g.inner, att.qkv_bias, module, self.module_name, query=self.needs_query,
                          extra=self is not att.kv)

    def build(self, x: Shape, y: Optional[Shape] = None):
        from ...layers.attention import TokensOf

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

    ratio: Pos
    mode: Literal["conv", "depthwise", "pool"] = "conv"
    norm: Optional[Op] = None
    pointwise: bool = False
    act: Optional[Op] = None
    module_name: ClassVar[Optional[str]] = None

    def part_runtime_grid(self, att, x, features):
        return True

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
        from ...layers.attention import ReduceKeys

        g = Shape(x.channels, self.grid(x), "tokens")
        norm = self.norm.build(g, g) if self.norm is not None else None
        act = self.act.build(x, x) if self.act is not None else None
        return ReduceKeys(x.channels, len(x.spatial), self.ratio if self.ratio > 1 else 0, self.mode, norm,
                          pointwise=self.pointwise, act=act)


class Projection(Part):
    """Base of the `projection` parts (how q, k and v are projected)."""


@op("conv_proj", kind="part", category="attention part")
class ConvProj(Projection):
    """CvT's convolutional projection: q, k and v each come from a depthwise `kernel` conv (no
    bias, padding kernel//2; stride 1 for q and `stride_kv` for k and v) followed by batch norm
    (submodules `conv_q`, `conv_k`, `conv_v`, each `.conv` and `.bn`), then a linear each (`q`,
    `k`, `v`). Prefix (class) tokens bypass the convolutions. CvT scales scores by channels^-0.5:
    pass `scale` to reproduce that."""

    kernel: Pos = 3
    stride_kv: Pos = 1

    def grid(self, x: Shape) -> tuple[int, ...]:
        if self.kernel <= 0 or self.stride_kv <= 0:
            raise ShapeError("conv_proj kernel and stride must be positive")
        return tuple(spatial_out(g, self.kernel, self.stride_kv, self.kernel // 2) for g in x.spatial)

    def provides(self, x, role):
        return {"projection", "strided_projection"} if self.stride_kv != 1 else {"projection"}

    def requirements(self, role):
        return (GRID,)

    def sizes(self, x):
        grid = self.grid(x)
        return dict(kv_grid=grid, keys=x.extra + prod(grid), kv_tokens=x.extra + prod(grid))

    def check_part(self, att, g):
        self.grid(g.x)

    def add_params(self, att, g):
        return 3 * (g.channels * self.kernel ** g.ndim + 2 * g.channels)  # depthwise conv + batch norm each

    def add_macs(self, att, g):
        x, k = g.x, self.kernel ** g.ndim
        return (prod(x.spatial) + 2 * prod(self.grid(x))) * x.channels * k

    def layer(self, att, g):
        from ...layers.attention.projections import ConvQKV

        return ConvQKV(g.channels, g.inner, att.qkv_bias, self.kernel, self.stride_kv, g.ndim)

    def part_runtime_grid(self, att, x, features):
        return True


class ExtraKeys(Part):
    """Base of the `extra_kv` parts other than key sources (more keys under the same softmax)."""


@op("kv_tokens", kind="part", category="attention part")
class KvTokens(ExtraKeys):
    """`count` learned key/value pairs prepended to the keys and values of every query (persistent
    memory / learnable kv): parameter `kv_tokens` (2, count, channels) in the projected space,
    trunc-normal(`std`). They are not projected, get zero relative/shift bias and are normalised with
    the keys under `cosine`. (TransNeXt's 'learnable tokens' are query-conditioned weights on the
    local values rather than keys; this part is the generic learnable-kv form.)"""

    count: Pos
    std: NonNegFloat = 0.02

    def provides(self, x, role):
        return {"extra_kv", "kv_tokens"}

    def extra_keys(self, x):
        return self.count

    def check_part(self, att, g):
        if self.count <= 0:
            raise ShapeError(f"kv_tokens count must be positive, got {self.count}")

    def add_params(self, att, g):
        return 2 * self.count * g.inner

    def layer(self, att, g):
        from ...layers.attention.scores import KvTokens as Piece

        return Piece(self.count, self.std, g.inner)


class Query(Part):
    """Base of the `query` parts (which tokens are the queries)."""


@op("given", kind="part", category="attention part")
class Given(Query):
    """Deprecated: give the queries by name, `attention(..., q = NAME)`. The queries come with the
    input: its channels are [tokens (C), queries (C)]. Keys and values
    are projected from the tokens by `qkv` (a C -> 2C linear); the queries are used as given, not
    projected (GC-ViT's global query: a map of query tokens from elsewhere, `tile`d to the grid and
    concatenated in a `parallel concat`, so that every window sees the same queries). The
    attention's channels, heads and output are those of C."""

    projects_query: ClassVar[bool] = False

    def provides(self, x, role):
        return {"query", "given"}

    def requirements(self, role):
        return (
            rule("query=given cannot be combined with kv, projection or lepe parts", excludes={"kv", "projection", "lepe"}),
            rule("query=given needs a window or grid partition or none, not {partition}", when={"partition"},
                 needs={"local"}),
            rule("query=given takes no `dim` (the queries set the width)", excludes={"dim"}),
        )

    def working_shape(self, x):
        if x.channels % 2:
            raise ShapeError(f"query=given needs [tokens, queries] channels of equal size, got {x.channels}")
        return x.with_(channels=x.channels // 2)

    def layer(self, att, g):
        from ...layers.attention.projections import FusedQKV

        return FusedQKV(g.channels, g.inner, att.qkv_bias, given=True)


class NamedQueries(Given):
    """The queries given by name (`attention(..., q = NAME)`): a tensor (tokens or a map) with the
    tokens' grid, or the grid of one window (the same queries for every window: GC-ViT's global
    queries; unshifted windows), and the attention's channels, not projected; keys and values come from the tokens (`qkv`, C -> 2C). Not a part
    users write: the op's `q` argument puts it in the query role."""

    def working_shape(self, x):
        return x

    def check_part(self, att, g):
        q = att.q.shape
        if q is None:
            return
        shared = self.shared(att, g)
        if q.layout not in ("tokens", "map") or q.extra != g.x.extra or q.channels != g.inner or not (
                shared or q.spatial == g.x.spatial):
            raise ShapeError(f"the queries `{att.q.name}` must lie like the tokens ({g.x}) or like one window, "
                             f"got {q}", "tile or pool the queries to the tokens' grid, with as many channels")
        if shared and "shifted" in g.features:
            raise ShapeError(f"the queries `{att.q.name}` of one window are shared by every window: the windows "
                             "cannot be shifted")

    def shared(self, att, g) -> bool:
        """Whether the queries lie on one window's grid (shared by every window) rather than the tokens'."""
        q = att.q.shape
        return q is not None and "local" in g.features and q.spatial != g.x.spatial and q.spatial == g.group

    def layer(self, att, g):
        from ...layers.attention.projections import NamedQKV

        return NamedQKV(g.channels, g.inner, att.qkv_bias, is_map=att.q.shape.layout == "map",
                        shared=self.shared(att, g))


@op("first", kind="part", category="attention part")
class First(Query):
    """Only the first `count` tokens are queries; keys and values come from all tokens
    (`keys="all"`) or only from the remaining ones (`keys="rest"`). The output is the `count` query
    tokens (a 1-D sequence). Separate linears `q`, `k`, `v`. With two streams joined by
    `parallel tokens { ... }` this is cross-attention: CrossViT's class token attending to the
    other branch (`first(1)`), or one stream's tokens attending to the other's (`keys="rest"`)."""

    count: Pos = 1
    keys: Literal["all", "rest"] = "all"

    def provides(self, x, role):
        return {"query", "first"}

    def requirements(self, role):
        return (rule("query=first(...) cannot be combined with partition, kv, projection, position or agents",
                     excludes={"partition", "kv", "projection", "position", "agents"}),)

    def sizes(self, x):
        keys = x.tokens - (self.count if self.keys == "rest" else 0)
        return dict(queries=self.count, keys=keys, tokens=self.count, kv_tokens=keys)

    def out_tokens(self, x):
        return self.count

    def layer(self, att, g):
        from ...layers.attention.projections import FirstQKV

        return FirstQKV(g.channels, g.inner, att.qkv_bias, self.count, self.keys == "rest")

    def check_part(self, att, g):
        x = g.x
        if self.count <= 0 or self.count > x.tokens or (self.keys == "rest" and self.count >= x.tokens):
            raise ShapeError(f"query=first({self.count}) needs more tokens than queries, got {x.tokens} tokens")
