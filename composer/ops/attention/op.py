"""The `attention` op: multi-head attention whose parts (protocol.py) each own their rules.

The op holds one part per role and evaluates generically: the requirement table (every part's
rows, then the op's own), the geometry (every part's `sizes`), the parts' own checks, and the sum
of their parameters and MACs. No rule here names a part class."""


from typing import ClassVar, Optional, Union

from ...shapes import Shape, ShapeError
from ..registry import Op, Pos, PosFloat, Tensor, op, prod
from .partitions import Partition
from .positions import Position
from .protocol import ROLES, Geometry, evaluate, rule
from .scores import Agents, Score
from .sources import ExtraKeys, Given, KeySource, NamedQueries, Projection, Query

OWN_ROWS = (
    rule("value_skip needs the values of the tokens themselves: no partition, kv, projection, query, agents or "
         "extra_kv", when={"value_skip"}, excludes={"partition", "kv", "projection", "query", "agents", "extra_kv"}),
)


# (id(op), input shape) -> (op, its Geometry): ops are frozen, the Geometry too; the entry holds the op
# so its id cannot be reused while the entry lives. GEOMETRY_KEPT = False computes it every time
# (tests/test_speed_invariants.py: the same plans).
GEOMETRY_KEPT = True
_GEOMETRY: dict = {}
_GEOMETRY_MAX = 4096


@op("attention", category="attention", layout="tokens")
class Attention(Op):
    """Multi-head attention over tokens, with pluggable parts.

    Heads: `heads`, or `head_dim` (heads = channels / head_dim). Projections: one `qkv` linear; `q`
    and `kv` linears with a key source `kv=reduce(...)` (or any KeySource part); `q`, `k`, `v` with
    `projection=conv_proj(...)` (CvT) or `query=first(...)`; output projection `proj` to `out`
    channels. Which keys a query sees: `partition=window(...)|grid(...)|neighbourhood(k)|
    dilated(k, r)|routed(regions, topk)`. Position: `position=relative_bias|relative_bias_map|
    learned_bias|relative_xl|lepe(...)`. Extra keys: `extra_kv=kv_tokens(n)`. Queries:
    `q = NAME` (a named tensor on the tokens' grid: the queries, not projected; the old `query=given`,
    the queries packed after the tokens in the channels, is deprecated) or `first(n, keys="all"|"rest")`. Scores:
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

    heads: Optional[Pos] = None
    head_dim: Optional[Pos] = None
    qkv_bias: bool = True
    proj_bias: bool = True
    out: Optional[Pos] = None
    partition: Optional[Partition] = None
    kv: Optional[KeySource] = None
    projection: Optional[Projection] = None
    position: Optional[Position] = None
    scale: Optional[PosFloat] = None
    query: Optional[Query] = None
    score: Optional[Score] = None
    extra_kv: Optional[Union[ExtraKeys, KeySource]] = None
    agents: Optional[Agents] = None
    dim: Optional[Pos] = None
    proj: bool = True
    value_skip: bool = False
    q: Optional[Tensor] = None

    # -------------------------------------------------------------- the parts
    def role(self, role: str):
        """The part in `role`: the field's, or for the queries given by name (`q = NAME`) theirs."""
        if role == "query" and self.q is not None:
            return NamedQueries()
        return getattr(self, role)

    def parts(self) -> list:
        """(role, part) of every role that is set, in the table's order (`role` for each: the fields
        read directly, as this runs for every count and shape of every attention)."""
        fields = self.__dict__
        out = [(role, fields[role]) for role in ROLES if fields[role] is not None]
        if fields["q"] is not None:  # the queries given by name: their part in the query role
            out = [(role, part) for role, part in out if role != "query"]
            out.insert(0, ("query", NamedQueries()))
        return out

    def _given(self) -> bool:
        query = self.role("query")
        return query is not None and not query.projects_query

    def _x(self, x: Shape) -> Shape:
        """The shape the attention works in (the query part's say: the token half with query=given)."""
        query = self.role("query")
        return query.working_shape(x) if query is not None else x

    def deprecation(self):
        if isinstance(self.query, Given):
            return ("`query = given` (the queries packed after the tokens in the input's channels) is deprecated",
                    "name the queries instead: `attention(..., q = NAME)` with NAME a tensor on the tokens' grid "
                    "(for example `q = { from query; tile(n) }`)")
        return None

    def features(self, x: Shape) -> set:
        """The configuration's features (protocol.py): the input's, the parts', the op's own."""
        f = set()
        if x.ndim:
            f.add("grid")
        if x.ndim > 2:
            f.add("grid_3d")
        for role, part in self.parts():
            f |= part.provides(x, role)
        if x.extra:
            f.add("prefix")
            if "messengers" not in f:
                f.add("class_tokens")
        if self.dim is not None:
            f.add("dim")
        if self.value_skip:
            f.add("value_skip")
        return f

    def sizes(self, x: Shape) -> Geometry:
        """The geometry for input `x` (`_sizes`), kept per op and input while GEOMETRY_KEPT: the shape
        rule, the parameter count and the MACs each ask for it, for every attention step."""
        if not GEOMETRY_KEPT:
            return self._sizes(x)
        key = (id(self), x)
        known = _GEOMETRY.get(key)
        if known is not None and known[0] is self:
            return known[1]
        g = self._sizes(x)
        if len(_GEOMETRY) >= _GEOMETRY_MAX:
            _GEOMETRY.clear()
        _GEOMETRY[key] = (self, g)
        return g

    def _sizes(self, x: Shape) -> Geometry:
        """The attention's `Geometry` for input `x` (before the query part's working shape)."""
        xs = self._x(x)
        heads, head_dim = self.geometry(x)
        s = dict(group=xs.spatial, queries=xs.tokens, keys=xs.tokens, kv_grid=None, tokens=xs.tokens, kv_tokens=None)
        for role, part in self.parts():
            if role != "extra_kv":
                s.update(part.sizes(xs))
        s["kv_grid"] = s["kv_grid"] or s["group"]
        s["kv_tokens"] = s["tokens"] if s["kv_tokens"] is None else s["kv_tokens"]
        s["keys"] += self.extra_kv.extra_keys(xs) if self.extra_kv is not None else 0
        return Geometry(xs, heads, head_dim, self.inner(x), features=frozenset(self.features(xs)), **s)

    def dynamic_form(self) -> "Attention":
        """Under dynamic_img_size window attention pads the grid up to a multiple of its window (timm's
        Swin with strict_img_size=False); the built module pads whenever the grid needs it."""
        part = getattr(self.partition, "dynamic_part", None)
        if part is not None and part() is not self.partition:
            return self.model_copy(update={"partition": part()})
        return self

    def admits_grid(self, built: Shape, got: Shape, dynamic: bool, outputs: tuple | None = None) -> str | None:
        """A partition that keeps its groups from the build grid says which grids it admits."""
        if self.partition is None or not self.runtime_grid(built) or not hasattr(self.partition, "admits"):
            return super().admits_grid(built, got, dynamic, outputs)
        return self.partition.admits(built, got, dynamic)

    def runtime_grid(self, x: Shape) -> bool:
        """Whether the module runs at another grid than `x`'s (it is given the grid at run time): every
        part says whether it does (`part_runtime_grid`); global attention with no parts does."""
        f = self.features(self._x(x))
        return all(part.part_runtime_grid(self, x, f) for _, part in self.parts())

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

    # -------------------------------------------------------------- shape rule
    def infer(self, x: Shape) -> Shape:
        if self.q is not None and self.query is not None:
            raise ShapeError("`q` gives the queries: the attention takes no `query` part with it")
        xs = self._x(x)
        self.geometry(x)
        names = {role: part.name for role, part in self.parts()}
        names.update({r: "" for r in ROLES if r not in names})
        rows = [row for role, part in self.parts() for row in part.requirements(role)]
        evaluate(rows + list(OWN_ROWS), self.features(xs), names)
        g = self.sizes(x)
        for _, part in self.parts():
            part.check_part(self, g)
        if self.value_skip and self.proj and (self.out or xs.channels) != self.inner(x):
            raise ShapeError(f"value_skip adds V ({self.inner(x)} channels) to the output "
                             f"({self.out or xs.channels} channels): they must be equally wide",
                             "set `out` to the attention's `dim`")
        if not self.proj and self.out is not None:
            raise ShapeError("`out` sets the output projection's width: it cannot be given with proj=false")
        channels = (self.out or xs.channels) if self.proj else self.inner(x)
        query = self.role("query")
        count = query.out_tokens(xs) if query is not None else None
        if count is not None:
            return Shape(channels, (count,), "tokens")
        return xs.with_(channels=channels)

    # -------------------------------------------------------------- parameters and MACs
    tied: ClassVar[bool] = True

    def _tied_part(self):
        """The part whose table is shared with other attentions (a part with `tie` set and a
        `tie_key(g)`: `learned_bias(tie = ...)`), else None."""
        # a field's value is in the instance's __dict__ (pydantic): a part without `tie` is not
        # asked through pydantic's slow path for a missing attribute
        return next((p for _, p in self.parts() if p.__dict__.get("tie") is not None and hasattr(p, "tie_key")), None)

    def ties(self) -> bool:
        return self._tied_part() is not None

    def tie_key(self, x) -> tuple | None:
        """(key, parameters) of a table shared with other attentions (`learned_bias(tie = ...)`)."""
        part = self._tied_part()
        if part is None:
            return None
        key = part.tie_key(self.sizes(x))
        return key, prod(key[2])

    def params(self, x, y):
        g = self.sizes(x)
        c, cd = g.channels, g.inner
        linears = 2 if self._given() else 3  # q, k, v (given queries: k, v)
        n = linears * (c * cd + (cd if self.qkv_bias else 0))
        n += sum(part.add_params(self, g) for _, part in self.parts())
        if self.proj:
            n += cd * y.channels + (y.channels if self.proj_bias else 0)
        return n

    def buffer_elements(self, x, y):
        g = self.sizes(x)
        return sum(part.add_buffers(self, g) for _, part in self.parts())

    def macs(self, x, y):
        """Linear and conv multiply-accumulates plus q k^T and attn v (and what the parts add: the
        routing product, the relative_xl position product, the agents' two products, ...); norms,
        softmax, pooling and bias gathers are not counted."""
        g = self.sizes(x)
        c, cd = g.channels, g.inner
        total = g.tokens * c * cd if not self._given() else 0  # q
        total += 2 * g.kv_tokens * c * cd  # k, v
        total += sum(part.add_macs(self, g) for _, part in self.parts())
        core = next((m for m in (part.core_macs(self, g) for _, part in self.parts()) if m is not None), None)
        total += 2 * g.tokens * g.keys * cd if core is None else core  # q @ k^T and attn @ v
        return total + (y.tokens * cd * y.channels if self.proj else 0)

    # -------------------------------------------------------------- module
    def build(self, x, y):
        """The module from the parts' pieces (composer/layers/attention/): each part's `layer`, in
        the order of the roles, then the default projection (one `qkv` linear) when no part projects,
        and the output projection."""
        from ...layers.attention import Attention as Module
        from ...layers.attention.projections import FusedQKV, Output

        g = self.sizes(x)
        pieces = [piece for _, part in self.parts() if (piece := part.layer(self, g)) is not None]
        if not any(hasattr(p, "project") for p in pieces):
            pieces.insert(0, FusedQKV(g.channels, g.inner, self.qkv_bias))
        pieces.append(Output(g.inner, y.channels if self.proj else 0, self.proj_bias, self.value_skip))
        return Module(g.inner, g.heads, x.spatial, x.extra, self.scale, pieces)
