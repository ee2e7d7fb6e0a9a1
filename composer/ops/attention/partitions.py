"""The partition parts of `attention`: which keys a query sees (windows, grid groups, a
neighbourhood around every query, routed regions). See protocol.py for what a part owns."""


from typing import ClassVar

from ...shapes import Shape, ShapeError
from ..registry import NonNeg, Pos, op, prod
from .protocol import Part, check_groups, rule

PARTITION_ROWS = (
    rule("{partition} attention cannot take class tokens", excludes={"class_tokens"}),
    rule("{partition} attention needs tokens on a spatial grid", needs={"grid"}),
    rule("{partition} attention cannot be combined with kv or projection parts", excludes={"kv", "projection"}),
)
MESSENGER_ROWS = (
    rule("window attention needs tokens on a spatial grid", when={"messengers"}, needs={"grid"}),
    rule("window(messengers = true) cannot be shifted or padded", when={"messengers"}, excludes={"shifted", "padded"}),
    rule("messengers work with position = relative_bias or none, without extra_kv, agents, given queries or performer",
         when={"messengers", "position"}, needs={"messenger_position"}),
    rule("messengers work with position = relative_bias or none, without extra_kv, agents, given queries or performer",
         when={"messengers"}, excludes={"extra_kv", "agents", "given", "performer"}),
)


class Partition(Part):
    """Base of the `partition` parts: the common rows (no class tokens, a grid, no kv or
    projection) and the group sizes of global attention."""

    def requirements(self, role):
        return PARTITION_ROWS


class LocalPartition(Partition):
    """Window and grid groups: equal groups of size^d tokens, each attended on its own."""

    def sizes(self, x):
        size, _ = self.effective(x.spatial)
        group = (size,) * x.ndim
        n = prod(group)
        return dict(group=group, queries=n, keys=n, kv_grid=group, tokens=prod(self.padded(x.spatial)),
                    kv_tokens=prod(self.padded(x.spatial)))

    def check_part(self, att, g):
        self.check(g.x.spatial)

    def part_runtime_grid(self, att, x, features):
        return True

    def layer(self, att, g):
        from ...layers.attention.partitions import Windows

        grid = g.x.spatial
        size, shift = self.effective(grid)
        return Windows(grid, self.mode, size, shift, self.padded(grid), pad_first=getattr(self, "pad", False),
                       messengers=getattr(self, "messengers", False))

    def admits(self, built: Shape, got: Shape, dynamic: bool):
        """Window and grid attention keep the window, shift and tables of the build grid (timm's
        Swin does the same): another grid must be a multiple of the window, or is padded up to one
        (`window(pad = true)`, or any window under dynamic_img_size)."""
        size, _ = self.effective(built.spatial)
        pads = self.mode == "window" and (getattr(self, "pad", False) or dynamic)
        if not pads and any(g % size for g in got.spatial):
            return (f"keeps its {self.mode} of {size} from the build grid {built}, which does not "
                    f"divide the grid {got}" + (" (build it with dynamic_img_size=True to pad it)"
                                                   if self.mode == "window" else ""))
        return None


@op("window", kind="part", category="attention part")
class Window(LocalPartition):
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

    size: Pos
    shift: NonNeg = 0
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
        check_groups("window", size, self.padded(grid))
        if not 0 <= shift < size:
            raise ShapeError(f"window shift {shift} must be in [0, {size})")


    def provides(self, x, role):
        f = {"partition", "local", "window"}
        if x.ndim and self.effective(x.spatial)[1]:
            f.add("shifted")
        if self.pad:
            f.add("padded")
        if self.messengers:
            f.add("messengers")
        return f

    def requirements(self, role):
        return (MESSENGER_ROWS if self.messengers else ()) + PARTITION_ROWS

    def add_buffers(self, att, g):
        """A shifted window's mask: (windows, 1, N, N) scores, N the tokens of a window."""
        return self.windows(g.x) * prod(g.group) ** 2 if self.effective(g.x.spatial)[1] else 0

    def windows(self, x: Shape) -> int:
        """The number of windows (messengers)."""
        size, _ = self.effective(x.spatial)
        return prod(g // size for g in self.padded(x.spatial))

    def sizes(self, x):
        out = super().sizes(x)
        if self.messengers:  # one messenger per window joins it as a query and a key
            out.update(queries=out["queries"] + 1, keys=out["keys"] + 1, tokens=out["tokens"] + self.windows(x),
                       kv_tokens=out["kv_tokens"] + self.windows(x))
        return out

    def check_part(self, att, g):
        x = g.x
        self.check(x.spatial)
        if self.messengers and x.extra != self.windows(x):
            raise ShapeError(f"window(messengers = true) needs one prefix token per window: "
                             f"{self.windows(x)} windows, got {x.extra} prefix tokens",
                             "add them with window_tokens(size) before the first such attention")

    def part_runtime_grid(self, att, x, features):
        return not self.messengers

    def dynamic_part(self):
        """Under dynamic_img_size window attention pads the grid up to a multiple of its window."""
        if not self.pad and not self.messengers:
            return self.model_copy(update={"pad": True})
        return self


@op("grid", kind="part", category="attention part")
class Grid(LocalPartition):
    """Partition the token grid into groups of `size`^d tokens taken at stride grid/size, so every
    group spans the whole map (MaxViT's grid attention; `size` must divide the grid)."""

    size: Pos
    mode: ClassVar[str] = "grid"

    def effective(self, grid: tuple[int, ...]) -> tuple[int, int]:
        return self.size, 0

    def padded(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        return grid

    def check(self, grid: tuple[int, ...]) -> None:
        check_groups("grid", self.size, grid)

    def provides(self, x, role):
        return {"partition", "local", "grid_groups"}


@op("neighbourhood", kind="part", category="attention part")
class Neighbourhood(Partition):
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

    size: Pos
    dilation: Pos = 1
    mask: bool = False
    bias: bool = False
    tokens: bool = False
    mode: ClassVar[str] = "neighbourhood"

    def check(self, grid: tuple[int, ...]) -> None:
        if self.size <= 0 or self.size % 2 == 0:
            raise ShapeError(f"{self.name} size must be a positive odd number, got {self.size}")
        if self.dilation <= 0:
            raise ShapeError(f"{self.name} dilation must be positive, got {self.dilation}")

    def provides(self, x, role):
        return {"partition", "neighbourhood"}

    def sizes(self, x):
        return dict(keys=self.size ** x.ndim)

    def check_part(self, att, g):
        self.check(g.x.spatial)

    def add_buffers(self, att, g):
        # neighbour_index (N, K), and neighbour_mask (N, 1, K) with mask=true
        return prod(g.x.spatial) * self.size ** g.ndim * (2 if self.mask else 1)

    def add_params(self, att, g):
        h, k = g.heads, self.size ** g.ndim
        return h * k * self.bias + (h * (g.inner // h) * k + h * k) * self.tokens

    def add_macs(self, att, g):
        return g.tokens * g.inner * self.size ** g.ndim if self.tokens else 0  # l2norm(q) @ learnable_tokens

    def layer(self, att, g):
        from ...layers.attention.partitions import Neighbourhood as Piece

        return Piece(g.x.spatial, self.size, self.dilation, self.mask, self.bias, self.tokens, g.heads, g.head_dim)


@op("dilated", kind="part", category="attention part")
class Dilated(Neighbourhood):
    """`neighbourhood` with a required `dilation`: every query sees `size`^d keys around it at
    spacing `dilation`, zero-padded (DilateFormer's dilated attention; its multi-scale form is a
    `parallel concat` of dilated attentions over head groups)."""

    size: Pos
    dilation: Pos
    mask: bool = False
    bias: bool = False
    tokens: bool = False


@op("routed", kind="part", category="attention part")
class Routed(Partition):
    """Bi-level routing (BiFormer): the grid is cut into `regions` regions per dim; region-level
    queries and keys are the means of the region's q and k (no gradient); every region keeps the
    `topk` regions of highest affinity (q_region . k_region) and its queries attend to the tokens
    of those regions (topk * region tokens keys each). `regions` must divide the grid."""

    regions: Pos
    topk: Pos
    mode: ClassVar[str] = "routed"

    def region(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(g // self.regions for g in grid)

    def check(self, grid: tuple[int, ...]) -> None:
        check_groups("routed regions", self.regions, grid)
        count = self.regions ** len(grid)
        if not 0 < self.topk <= count:
            raise ShapeError(f"routed topk {self.topk} must be in [1, {count}] (the number of regions)")

    def provides(self, x, role):
        return {"partition", "routed"}

    def sizes(self, x):
        region = prod(self.region(x.spatial))
        return dict(queries=region, keys=self.topk * region)

    def check_part(self, att, g):
        self.check(g.x.spatial)

    def add_macs(self, att, g):
        return self.regions ** (2 * g.ndim) * g.inner  # region affinity

    def layer(self, att, g):
        from ...layers.attention.partitions import Routed as Piece

        return Piece(g.x.spatial, self.regions, self.topk)
