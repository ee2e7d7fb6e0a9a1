"""The `attention` op: multi-head attention whose parts (protocol.py) each own their rules.

The op holds one part per role and evaluates generically: the requirement table (every part's
rows, then the op's own), the geometry (every part's `sizes`), the parts' own checks, and the sum
of their parameters and MACs. No rule here names a part class."""

from __future__ import annotations

from typing import ClassVar, Optional, Union

from ...shapes import Shape, ShapeError
from ..registry import Op, op, prod
from .partitions import Dilated, Grid, Neighbourhood, Routed, Window
from .positions import ContinuousBias, LePE, LearnedBias, RelativeBias, RelativeBiasMap, RelativeXL
from .protocol import ROLES, Geometry, evaluate, rule
from .scores import Agents, Cosine, Dot, Performer
from .sources import ConvProj, First, Given, KeySource, KvTokens

OWN_ROWS = (
    rule("value_skip needs the values of the tokens themselves: no partition, kv, projection, query, agents or "
         "extra_kv", when={"value_skip"}, excludes={"partition", "kv", "projection", "query", "agents", "extra_kv"}),
)


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

    # -------------------------------------------------------------- the parts
    def parts(self) -> list:
        """(role, part) of every role that is set, in the table's order."""
        return [(role, getattr(self, role)) for role in ROLES if getattr(self, role) is not None]

    def _given(self) -> bool:
        return self.query is not None and not self.query.projects_query

    def _x(self, x: Shape) -> Shape:
        """The shape the attention works in (the query part's say: the token half with query=given)."""
        return self.query.working_shape(x) if self.query is not None else x

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

    def admits_grid(self, built: Shape, got: Shape, dynamic: bool) -> str | None:
        """A partition that keeps its groups from the build grid says which grids it admits."""
        if self.partition is None or not self.runtime_grid(built) or not hasattr(self.partition, "admits"):
            return super().admits_grid(built, got, dynamic)
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

    # old helpers, kept for the module's build and for callers
    def _tokens_kv(self) -> int:
        return self.extra_kv.count if isinstance(self.extra_kv, KvTokens) else 0

    def _source(self) -> Optional[KeySource]:
        return self.extra_kv if isinstance(self.extra_kv, KeySource) else None

    def _messengers(self) -> bool:
        return isinstance(self.partition, Window) and self.partition.messengers

    def _first(self) -> Optional[First]:
        return self.query if isinstance(self.query, First) else None

    def _group(self, x: Shape) -> tuple[int, ...]:
        return self.sizes(x).group

    def _queries(self, x: Shape) -> int:
        return self.sizes(x).queries

    def _keys(self, x: Shape) -> int:
        return self.sizes(x).keys

    def _bias_grid(self, x: Shape) -> tuple[int, ...]:
        g = self.sizes(x)
        return self.position.key_grid(self, g) if hasattr(self.position, "key_grid") else g.kv_grid

    # -------------------------------------------------------------- shape rule
    def infer(self, x: Shape) -> Shape:
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
        count = self.query.out_tokens(xs) if self.query is not None else None
        if count is not None:
            return Shape(channels, (count,), "tokens")
        return xs.with_(channels=channels)

    # -------------------------------------------------------------- parameters and MACs
    tied: ClassVar[bool] = True

    def ties(self) -> bool:
        return isinstance(self.position, LearnedBias) and self.position.tie is not None

    def tie_key(self, x) -> tuple | None:
        """(key, parameters) of a table shared with other attentions (`learned_bias(tie = ...)`)."""
        if not self.ties():
            return None
        g = self.sizes(x)
        shape = (g.heads, g.queries, g.keys)
        return ("learned_bias", self.position.tie, shape), prod(shape)

    def params(self, x, y):
        g = self.sizes(x)
        c, cd = g.channels, g.inner
        linears = 3 if self.query is None or self.query.projects_query else 2  # q, k, v (given queries: k, v)
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
        from ...layers.attention import Attention as Module

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
        if isinstance(pos, RelativeBiasMap):  # before its base class
            cfg.update(relative_bias="map")
        elif isinstance(pos, RelativeBias):
            cfg.update(relative_bias=True)
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


