"""One attention op with pluggable parts: which tokens a query sees (`partition`), where keys and
values come from (`kv`), and position information (`position`)."""

from __future__ import annotations

from typing import Literal, Optional

from ..shapes import Shape, ShapeError
from .registry import Op, op, prod


@op("window", kind="part", category="attention part")
class Window(Op):
    """Partition the token grid into non-overlapping `size`-wide windows, cyclically shifted by
    `shift` (Swin). As in the reference, a window that covers the whole grid drops the shift."""

    size: int
    shift: int = 0

    def effective(self, grid: tuple[int, ...]) -> tuple[int, int]:
        if min(grid) <= self.size:
            return min(grid), 0
        return self.size, self.shift

    def check(self, grid: tuple[int, ...]) -> None:
        size, _ = self.effective(grid)
        for g in grid:
            if g % size:
                raise ShapeError(
                    f"window {size} does not divide feature size {g}",
                    f"choose an input size so that the grid ({'x'.join(map(str, grid))}) is a multiple of {size}",
                )


@op("reduce", kind="part", category="attention part")
class Reduce(Op):
    """Keys and values from a spatially reduced copy of the tokens: a `ratio`-strided conv (PVT's
    spatial reduction, submodule `sr`) followed by `norm` (submodule `norm`)."""

    ratio: int
    norm: Optional[Op] = None

    def grid(self, x: Shape) -> tuple[int, ...]:
        if self.ratio <= 1:
            return x.spatial
        for g in x.spatial:
            if g < self.ratio:
                raise ShapeError(f"reduction ratio {self.ratio} is larger than feature size {g}")
        return tuple(g // self.ratio for g in x.spatial)


@op("relative_bias", kind="part", category="attention part")
class RelativeBias(Op):
    """A learned bias per head for every relative offset inside a window (Swin): a table of
    (2w-1)^d x heads entries, trunc-normal(std 0.02) initialised, gathered by a fixed index."""

    std: float = 0.02


@op("attention", category="attention", layout="tokens")
class Attention(Op):
    """Multi-head scaled dot-product attention over tokens.

    Heads: `heads`, or `head_dim` (heads = channels / head_dim). Projections: one `qkv` linear, or
    `q` and `kv` linears when `kv` reduces the keys; output projection `proj` to `out` channels.
    Parts: `partition=window(...)`, `kv=reduce(...)`, `position=relative_bias()`.
    Computed with `F.scaled_dot_product_attention`; masks and index tables are built once."""

    heads: Optional[int] = None
    head_dim: Optional[int] = None
    qkv_bias: bool = True
    proj_bias: bool = True
    out: Optional[int] = None
    partition: Optional[Window] = None
    kv: Optional[Reduce] = None
    position: Optional[RelativeBias] = None

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
        if x.channels % self.head_dim:
            raise ShapeError(f"head_dim {self.head_dim} does not divide the {x.channels} channels")
        return x.channels // self.head_dim, self.head_dim

    def infer(self, x: Shape) -> Shape:
        self.geometry(x)
        if self.partition is not None:
            if x.extra:
                raise ShapeError("window attention cannot take class tokens")
            self.partition.check(x.spatial)
        if self.position is not None and self.partition is None:
            raise ShapeError("relative_bias needs a window partition")
        if self.kv is not None:
            if x.extra:
                raise ShapeError("reduced keys/values cannot take class tokens")
            self.kv.grid(x)
        return x.with_(channels=self.out or x.channels)

    def _kv_tokens(self, x: Shape) -> int:
        return prod(self.kv.grid(x)) if self.kv is not None else x.tokens

    def params(self, x, y):
        c, h = x.channels, self.geometry(x)[0]
        n = 3 * c * c + (3 * c if self.qkv_bias else 0)
        if self.kv is not None and self.kv.ratio > 1:
            g = Shape(c, self.kv.grid(x), "tokens")
            n += c * c * self.kv.ratio ** x.ndim + c + (self.kv.norm.params(g, g) if self.kv.norm else 0)
        if self.position is not None:
            n += (2 * self.partition.effective(x.spatial)[0] - 1) ** x.ndim * h
        return n + c * y.channels + (y.channels if self.proj_bias else 0)

    def macs(self, x, y):
        c, n = x.channels, x.tokens
        m = self._kv_tokens(x)
        if self.partition is not None:
            m = self.partition.effective(x.spatial)[0] ** x.ndim
        total = n * c * c + m * (n // (m if self.partition is not None else 1)) * 0  # q
        total = n * c * c + (n if self.partition is not None else m) * 2 * c * c  # q, k, v projections
        if self.kv is not None and self.kv.ratio > 1:
            total += m * c * c * self.kv.ratio ** x.ndim  # the reduction conv
        total += 2 * n * m * c  # q @ k^T and attn @ v
        return total + n * c * y.channels

    def build(self, x, y):
        from ..modules import Attention as Module

        heads, head_dim = self.geometry(x)
        kv_norm = None
        if self.kv is not None and self.kv.norm is not None:
            g = Shape(x.channels, self.kv.grid(x), "tokens")
            kv_norm = self.kv.norm.build(g, g)
        window, shift = self.partition.effective(x.spatial) if self.partition is not None else (0, 0)
        return Module(
            dim=x.channels, out=y.channels, heads=heads, grid=x.spatial, qkv_bias=self.qkv_bias,
            proj_bias=self.proj_bias, window=window, shift=shift,
            relative_bias=self.position is not None, reduce=self.kv.ratio if self.kv is not None else 0,
            kv_norm=kv_norm,
        )
