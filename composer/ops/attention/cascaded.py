"""Cascaded group attention (EfficientViT-M) and its offset bias part."""


from typing import Optional, Union

from ...shapes import Shape, ShapeError
from ..registry import NonNeg, Op, Pos, PosFloat, op, prod
from .partitions import Window


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

    heads: Pos
    key_dim: Pos
    q_kernel: Union[NonNeg, list[NonNeg]] = 5
    partition: Optional[Window] = None
    position: Optional[OffsetBias] = None
    scale: Optional[PosFloat] = None

    def runtime_grid(self, x: Shape) -> bool:
        return self.partition is not None

    def admits_grid(self, built: Shape, got: Shape, dynamic: bool, outputs: tuple | None = None) -> str | None:
        if not self.runtime_grid(built):
            return super().admits_grid(built, got, dynamic, outputs)
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
        from ...layers.attention import CascadedAttention as Module

        size = self.partition.effective(x.spatial)[0] if self.partition is not None else 0
        return Module(
            dim=x.channels, heads=self.heads, key_dim=self.key_dim, kernels=self.kernels()[:self.heads],
            grid=x.spatial, size=size,
            padded=self.partition.padded(x.spatial) if self.partition is not None else None,
            offset_bias=self.position is not None, scale=self.scale,
        )
