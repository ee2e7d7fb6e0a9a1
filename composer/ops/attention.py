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
    `kv=reduce(...)`, `projection=conv_proj(...)`, `position=relative_bias|lepe(...)`. `scale`
    defaults to head_dim^-0.5. Computed with `F.scaled_dot_product_attention`; masks and index
    tables are built once. Linear weights trunc-normal(0.02), biases zero."""

    heads: Optional[int] = None
    head_dim: Optional[int] = None
    qkv_bias: bool = True
    proj_bias: bool = True
    out: Optional[int] = None
    partition: Optional[Union[Window, Grid]] = None
    kv: Optional[Reduce] = None
    projection: Optional[ConvProj] = None
    position: Optional[Union[RelativeBias, LePE]] = None
    scale: Optional[float] = None

    def geometry(self, x: Shape) -> tuple[int, int]:
        """(heads, head_dim) for input `x`."""
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
        self.geometry(x)
        if self.partition is not None:
            if x.extra:
                raise ShapeError(f"{self.partition.name} attention cannot take class tokens")
            if self.kv is not None or self.projection is not None:
                raise ShapeError(f"{self.partition.name} attention cannot be combined with kv or projection parts")
            self.partition.check(x.spatial)
        if self.kv is not None and self.projection is not None:
            raise ShapeError("attention takes either kv=reduce(...) or projection=conv_proj(...), not both")
        if isinstance(self.position, RelativeBias) and self.partition is None:
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
        c, d, h = x.channels, x.ndim, self.geometry(x)[0]
        n = 3 * c * c + (3 * c if self.qkv_bias else 0)
        if self.kv is not None:
            if self.kv.ratio > 1 and self.kv.mode == "conv":
                n += c * c * self.kv.ratio ** d + c
            g = Shape(c, self.kv.grid(x), "tokens")
            n += self.kv.norm.params(g, g) if self.kv.norm else 0
        if self.projection is not None:
            n += 3 * (c * self.projection.kernel ** d + 2 * c)  # depthwise conv + batch norm each
        if isinstance(self.position, RelativeBias):
            n += (2 * self.partition.effective(x.spatial)[0] - 1) ** d * h
        if isinstance(self.position, LePE):
            n += c * self.position.kernel ** d + c
        return n + c * y.channels + (y.channels if self.proj_bias else 0)

    def macs(self, x, y):
        """Linear and conv multiply-accumulates plus q k^T and attn v; norms, softmax, pooling and
        the bias gather are not counted."""
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
            dim=x.channels, out=y.channels, heads=heads, grid=x.spatial, extra=x.extra, qkv_bias=self.qkv_bias,
            proj_bias=self.proj_bias, partition=self.partition.mode if self.partition is not None else None,
            size=size, shift=shift, padded=self.partition.padded(x.spatial) if self.partition is not None else None,
            relative_bias=isinstance(self.position, RelativeBias),
            reduce=self.kv.ratio if self.kv is not None else 0, reduce_mode=self.kv.mode if self.kv else "conv",
            kv_norm=kv_norm,
            conv_proj=(self.projection.kernel, self.projection.stride_kv) if self.projection is not None else None,
            lepe=self.position.kernel if isinstance(self.position, LePE) else 0, scale=self.scale,
        )
