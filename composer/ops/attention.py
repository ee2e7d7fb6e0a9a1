"""One attention op with pluggable parts: which tokens a query sees (`partition`), where keys and
values come from (`kv`), how q/k/v are projected (`projection`), position information
(`position`) and the score scale (`scale`). The module is `composer.layers.attention.Attention`."""

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
    Twins and Swin) and crops the output; otherwise the window must divide the grid."""

    size: int
    shift: int = 0
    pad: bool = False
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


@op("reduce", kind="part", category="attention part")
class Reduce(Op):
    """Keys and values from a spatially reduced copy of the tokens, reduced by `ratio` in every
    dim: `mode="conv"` a ratio-strided conv with bias (PVT's spatial reduction, submodule `sr`),
    `mode="pool"` average pooling (LITv2's Lo-Fi keys, submodule `pool`), then `norm` (submodule
    `norm`). `ratio=1` keeps the tokens but still uses separate `q` and `kv` linears."""

    ratio: int
    mode: Literal["conv", "pool"] = "conv"
    norm: Optional[Op] = None

    def grid(self, x: Shape) -> tuple[int, ...]:
        if self.ratio <= 0:
            raise ShapeError(f"reduction ratio must be positive, got {self.ratio}")
        if self.ratio == 1:
            return x.spatial
        for g in x.spatial:
            if g < self.ratio:
                raise ShapeError(f"reduction ratio {self.ratio} is larger than feature size {g}")
        return tuple(g // self.ratio for g in x.spatial)


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


@op("input_query", kind="part", category="attention part")
class InputQuery(Op):
    """The queries come with the input: its channels are [tokens (C), queries (C)]. Keys and values
    are projected from the tokens by `qkv` (a C -> 2C linear); the queries are used as given, not
    projected (GC-ViT's global query: a map of query tokens from elsewhere, `tile`d to the grid and
    concatenated in a `parallel concat`, so that every window sees the same queries). The
    attention's channels, heads and output are those of C."""


@op("lepe", kind="part", category="attention part")
class LePE(Op):
    """Locally-enhanced position encoding (CSWin): a depthwise `kernel` conv with bias over V (as a
    map; per group when partitioned), added to the attention output before `proj`. Submodule
    `lepe`. Needs keys on the query grid (no reduction) and no prefix tokens."""

    kernel: int = 3


@op("attention", category="attention", layout="tokens")
class Attention(Op):
    """Multi-head scaled dot-product attention over tokens.

    Heads: `heads`, or `head_dim` (heads = channels / head_dim). Projections: one `qkv` linear, or
    `q` and `kv` linears when `kv` reduces the keys, or `projection=conv_proj(...)` (CvT); output
    projection `proj` to `out` channels. Parts: `partition=window(...)|grid(...)`,
    `kv=reduce(...)`, `projection=conv_proj(...)`,
    `position=relative_bias|relative_bias_map|lepe(...)`, `query=input_query` (queries given with
    the input). `scale` defaults to head_dim^-0.5. Computed with `F.scaled_dot_product_attention`;
    masks and index tables are built once. Linear weights trunc-normal(0.02), biases zero."""

    heads: Optional[int] = None
    head_dim: Optional[int] = None
    qkv_bias: bool = True
    proj_bias: bool = True
    out: Optional[int] = None
    partition: Optional[Union[Window, Grid]] = None
    kv: Optional[Reduce] = None
    projection: Optional[ConvProj] = None
    position: Optional[Union[RelativeBias, RelativeBiasMap, LePE]] = None
    scale: Optional[float] = None
    query: Optional[InputQuery] = None

    def _x(self, x: Shape) -> Shape:
        """The shape the attention works in: the token half of the channels with `input_query`."""
        return x.with_(channels=x.channels // 2) if self.query is not None else x

    def geometry(self, x: Shape) -> tuple[int, int]:
        """(heads, head_dim) for input `x`."""
        x = self._x(x)
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
        """The grid of one attention group: the window/grid group, else the whole grid."""
        if self.partition is not None:
            return (self.partition.effective(x.spatial)[0],) * x.ndim
        return x.spatial

    def _kv_grid(self, x: Shape) -> tuple[int, ...]:
        if self.kv is not None:
            return self.kv.grid(x)
        if self.projection is not None:
            return self.projection.grid(x)
        return self._group(x)

    def infer(self, x: Shape) -> Shape:
        if self.query is not None:
            if x.channels % 2:
                raise ShapeError(f"input_query needs [tokens, queries] channels of equal size, got {x.channels}")
            if self.kv is not None or self.projection is not None or isinstance(self.position, LePE):
                raise ShapeError("input_query cannot be combined with kv, projection or lepe parts")
            x = self._x(x)
        self.geometry(x)
        if self.partition is not None:
            if x.extra:
                raise ShapeError(f"{self.partition.name} attention cannot take class tokens")
            if self.kv is not None or self.projection is not None:
                raise ShapeError(f"{self.partition.name} attention cannot be combined with kv or projection parts")
            self.partition.check(x.spatial)
        if self.kv is not None and self.projection is not None:
            raise ShapeError("attention takes either kv=reduce(...) or projection=conv_proj(...), not both")
        if isinstance(self.position, (RelativeBias, RelativeBiasMap)) and self.partition is None:
            raise ShapeError("relative_bias needs a window or grid partition")
        if self.kv is not None:
            if x.extra:
                raise ShapeError("reduced keys/values cannot take class tokens")
        if (self.kv is not None or self.projection is not None or self.position is not None) and not x.ndim:
            raise ShapeError("this attention needs tokens on a spatial grid")
        kv_grid = self._kv_grid(x)
        if isinstance(self.position, LePE):
            if x.extra:
                raise ShapeError("lepe cannot take class tokens")
            if kv_grid != self._group(x):
                raise ShapeError("lepe needs keys/values on the query grid (no reduction, stride_kv = 1)")
            if self.position.kernel <= 0:
                raise ShapeError("lepe kernel must be positive")
        return x.with_(channels=self.out or x.channels)

    def _kv_tokens(self, x: Shape) -> int:
        return x.extra + prod(self._kv_grid(x))  # prefix tokens are keys too (never with kv/partition)

    def params(self, x, y):
        h, x = self.geometry(x)[0], self._x(x)
        c, d = x.channels, x.ndim
        n = 3 * c * c + (3 * c if self.qkv_bias else 0)
        if self.query is not None:
            n -= c * c + (c if self.qkv_bias else 0)  # no q projection
        if self.kv is not None:
            if self.kv.ratio > 1 and self.kv.mode == "conv":
                n += c * c * self.kv.ratio ** d + c
            g = Shape(c, self.kv.grid(x), "tokens")
            n += self.kv.norm.params(g, g) if self.kv.norm else 0
        if self.projection is not None:
            n += 3 * (c * self.projection.kernel ** d + 2 * c)  # depthwise conv + batch norm each
        if isinstance(self.position, (RelativeBias, RelativeBiasMap)):
            n += (2 * self.partition.effective(x.spatial)[0] - 1) ** d * h
        if isinstance(self.position, LePE):
            n += c * self.position.kernel ** d + c
        return n + c * y.channels + (y.channels if self.proj_bias else 0)

    def macs(self, x, y):
        """Linear and conv multiply-accumulates plus q k^T and attn v; norms, softmax, pooling and
        the bias gather are not counted."""
        x = self._x(x)
        c, d, n = x.channels, x.ndim, x.tokens
        m = self._kv_tokens(x)  # keys per query
        out = n * c * y.channels  # proj (after cropping padded windows)
        if self.partition is not None:
            n = prod(self.partition.padded(x.spatial))
        total = n * c * c  # q
        if self.partition is not None:
            total += 2 * n * c * c  # k, v from the same tokens
        else:
            total += 2 * m * c * c  # k, v from the (reduced) key tokens
        if self.kv is not None and self.kv.ratio > 1 and self.kv.mode == "conv":
            total += prod(self.kv.grid(x)) * c * c * self.kv.ratio ** d  # the reduction conv
        if self.projection is not None:
            k = self.projection.kernel ** d
            total += (prod(x.spatial) + 2 * prod(self.projection.grid(x))) * c * k  # depthwise convs
        total += 2 * n * m * c  # q @ k^T and attn @ v
        if isinstance(self.position, LePE):
            total += n * c * self.position.kernel ** d
        return total + out

    def build(self, x, y):
        from ..layers.attention import Attention as Module

        heads, _ = self.geometry(x)
        kv_norm = None
        if self.kv is not None and self.kv.norm is not None:
            g = Shape(x.channels, self.kv.grid(x), "tokens")
            kv_norm = self.kv.norm.build(g, g)
        size, shift = self.partition.effective(x.spatial) if self.partition is not None else (0, 0)
        return Module(
            dim=self._x(x).channels, input_query=self.query is not None, out=y.channels, heads=heads, grid=x.spatial, extra=x.extra, qkv_bias=self.qkv_bias,
            proj_bias=self.proj_bias, partition=self.partition.mode if self.partition is not None else None,
            size=size, shift=shift, padded=self.partition.padded(x.spatial) if self.partition is not None else None,
            relative_bias=isinstance(self.position, RelativeBias) or (
                "map" if isinstance(self.position, RelativeBiasMap) else False),
            reduce=self.kv.ratio if self.kv is not None else 0, reduce_mode=self.kv.mode if self.kv else "conv",
            kv_norm=kv_norm,
            conv_proj=(self.projection.kernel, self.projection.stride_kv) if self.projection is not None else None,
            lepe=self.position.kernel if isinstance(self.position, LePE) else 0, scale=self.scale,
        )


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
    depthwise conv sees one window). `position=offset_bias`."""

    heads: int
    key_dim: int
    q_kernel: Union[int, list[int]] = 5
    partition: Optional[Window] = None
    position: Optional[OffsetBias] = None
    scale: Optional[float] = None

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
