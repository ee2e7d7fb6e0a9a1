"""The position parts of `attention` (additive score biases and tables, Transformer-XL relative
positions, LePE, the continuous bias MLP). See protocol.py for what a part owns."""


import functools
from typing import Literal, Optional, Union

from ...shapes import ShapeError
from ..registry import NonNegFloat, Pos, Probability, op, prod
from .protocol import Part, rule

GRID = rule("this attention needs tokens on a spatial grid", needs={"grid"})


class Position(Part):
    """Base of the `position` parts."""

    def provides(self, x, role):
        return {"position", self.name}


@op("relative_bias", kind="part", category="attention part")
class RelativeBias(Position):
    """A learned bias per head for every relative offset inside a window or grid group (Swin,
    MaxViT): a table of (2w-1)^d x heads entries, trunc-normal(`std`) initialised, gathered by a
    fixed index. Needs a partition."""

    std: NonNegFloat = 0.02

    def provides(self, x, role):
        return {"position", self.name} | ({"messenger_position"} if self.name == "relative_bias" else set())

    def requirements(self, role):
        return (rule("{position} needs a window or grid partition", needs={"local"}),)

    def add_params(self, att, g):
        n = (2 * g.group[0] - 1) ** g.ndim * g.heads
        if self.name == "relative_bias" and "messengers" in g.features:
            n += 2 * g.heads  # rel_pos_msg
        return n

    def layer(self, att, g):
        from ...layers.attention.positions import RelativeTable

        return RelativeTable(g.heads, g.group[0], g.ndim, std=self.std, as_map=self.name == "relative_bias_map",
                             messengers=self.name == "relative_bias" and "messengers" in g.features)

    def add_buffers(self, att, g):
        return prod(g.group) ** 2  # relative_position_index: (N, N) for the N tokens of a group

    def part_runtime_grid(self, att, x, features):
        return True


@op("relative_bias_map", kind="part", category="attention part")
class RelativeBiasMap(RelativeBias):
    """A learned relative-position bias stored as one (2w-1)^d map per head, read at the
    key-minus-query offset (TensorFlow MaxViT's layout, timm's `RelPosBiasTf`): the table is
    `relative_position_bias_table` of shape (heads, 2w-1, ..., 2w-1), normal(`std`)
    initialised. The same number of parameters as `relative_bias`. Needs a partition."""


@op("learned_bias", kind="part", category="attention part")
class LearnedBias(Position):
    """A dense learned bias per head for every (query, key) pair of an attention group: a
    parameter `relative_pos` of shape (heads, queries, keys) for the current resolution (CMT; the
    model must be built at its input size), normal(0, `std`) initialised (CMT uses randn: std 1).
    `tie`: attentions whose learned_bias has the same `tie` value and the same table shape share
    one table (CMT: one per stage, `tie = i`); the first in forward order owns the parameter, so
    the state_dict holds it once and the parameter count counts it once."""

    std: NonNegFloat = 0.02
    tie: Optional[Union[int, str]] = None

    def requirements(self, role):
        return (rule("learned_bias cannot be combined with routed keys (the key set changes per input)",
                     excludes={"routed"}), GRID)

    def add_params(self, att, g):
        return g.heads * g.queries * g.keys

    def tie_key(self, g) -> tuple | None:
        return None if self.tie is None else ("learned_bias", self.tie, (g.heads, g.queries, g.keys))

    def layer(self, att, g):
        from ...layers.attention.positions import LearnedTable

        return LearnedTable(g.heads, g.queries, g.keys, self.std, self.tie_key(g))


@op("relative_xl", kind="part", category="attention part")
class RelativeXL(Position):
    """Transformer-XL relative position (Conformer's relative-position MHSA, ESPnet layout): fixed
    sinusoidal embeddings of the offsets T-1 .. -(T-1) over the token index (a buffer), projected by
    `linear_pos` (no bias); learned per-head biases `pos_bias_u`, `pos_bias_v` (heads, head_dim,
    xavier-uniform). score = ((q + u) k^T + rel_shift((q + v) P^T)) * scale, where rel_shift (the
    pad-reshape-slice trick) reads the embedding of offset i - j for query i, key j; here it is a
    gather with an index built once. Self-attention over the tokens only (no kv, partition). At
    another length T' (another input size) the table and the index are made for T' (as ESPnet's
    `extend_pe` and the reference's positional encoding do for the length they see)."""

    def requirements(self, role):
        return (rule("relative_xl is for self-attention over all tokens: no partition, kv, agents, "
                     "extra_kv or strided projection",
                     excludes={"partition", "kv", "agents", "extra_kv", "strided_projection"}),
                rule("cosine scores cannot be combined with relative_xl", excludes={"cosine"}))

    def add_params(self, att, g):
        return g.inner * g.inner + 2 * g.inner

    def add_buffers(self, att, g):
        return (2 * g.tokens - 1) * g.inner + g.tokens ** 2  # pos_table (2T-1, dim), pos_index (T, T)

    def add_macs(self, att, g):
        n, cd = g.tokens, g.inner
        return (2 * n - 1) * cd * cd + n * (2 * n - 1) * cd  # linear_pos and (q + v) P^T

    def layer(self, att, g):
        from ...layers.attention.positions import RelativeXL as Piece

        return Piece(g.inner, g.heads, g.tokens)

    def part_runtime_grid(self, att, x, features):
        return "partition" not in features


@op("continuous_bias", kind="part", category="attention part")
class ContinuousBias(Position):
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

    hidden: Pos = 512
    coords: Literal["normalized", "raw"] = "normalized"
    drop: Probability = 0.0

    def requirements(self, role):
        msg = ("continuous_bias needs tokens on a grid without class tokens, and no routed "
                 "partition, projection, query or agents (with a window or grid partition: no kv, "
                 "extra_kv or messengers)")
        return (
            rule(msg, needs={"grid"}, excludes={"prefix", "routed", "projection", "query", "agents"}),
            rule(msg, when={"local"}, excludes={"kv", "extra_source", "messengers"}),
            rule("continuous_bias with extra_kv = reduce(...) needs a neighbourhood partition", when={"extra_source"},
                 needs={"neighbourhood"}),
            rule("continuous_bias with a neighbourhood partition is for the keys of an extra_kv source",
                 when={"neighbourhood"}, needs={"extra_source"},
                 hint="add extra_kv = reduce(...), or use neighbourhood(..., bias = true)"),
            rule("continuous_bias works on 1-D and 2-D grids", excludes={"grid_3d"}),
        )

    def check_part(self, att, g):
        if self.hidden <= 0:
            raise ShapeError(f"continuous_bias hidden must be positive, got {self.hidden}")
        if not 0 <= self.drop < 1:
            raise ShapeError(f"continuous_bias drop must be in [0, 1), got {self.drop}")

    def key_grid(self, att, g) -> tuple:
        """The key grid: the kv source's, the extra source's (with a neighbourhood), or the tokens'."""
        if "extra_source" in g.features and "neighbourhood" in g.features:
            return att.extra_kv.grid(g.x)
        return g.kv_grid

    def add_params(self, att, g):
        hid, d = self.hidden, g.ndim
        return (d + 1) * hid + (hid + 1) * g.heads

    def add_buffers(self, att, g):
        # cpb_index: one per (query, key) pair of a group; cpb_table: at most the distinct
        # per-axis offsets, ndim coordinates each
        keys = self.key_grid(att, g)
        pairs = prod(g.group) * prod(keys)
        return pairs + min(pairs, prod(q * k for q, k in zip(g.group, keys))) * g.ndim

    def add_macs(self, att, g):
        hid, d = self.hidden, g.ndim
        return prod(cpb_counts(g.group, self.key_grid(att, g))) * (d * hid + hid * g.heads)  # the bias MLP

    def layer(self, att, g):
        from ...layers.attention.positions import ContinuousBias as Piece

        return Piece(g.heads, self.hidden, g.group, self.key_grid(att, g), self.coords, self.drop)

    def part_runtime_grid(self, att, x, features):
        return "local" in features


@op("lepe", kind="part", category="attention part")
class LePE(Position):
    """Locally-enhanced position encoding (CSWin, BiFormer): a depthwise `kernel` conv with bias,
    added to the attention output before `proj` (submodule `lepe`). `source="v"`: over V as a map (per
    group for window/grid partitions, over the whole map otherwise: BiFormer's routed attention);
    `source="input"`: over the attention's input tokens as a map (BiFormer's global stage). Needs
    keys on the query grid (no reduction) and no prefix tokens."""

    kernel: Pos = 3
    source: Literal["v", "input"] = "v"

    def provides(self, x, role):
        return {"position", "lepe"} | ({"lepe_input"} if self.source == "input" else set())

    def requirements(self, role):
        return (GRID, rule("lepe cannot take class tokens", excludes={"prefix"}),
                rule("lepe(source=\"input\") is for attention without partition", when={"lepe_input"},
                     excludes={"partition"}))

    def check_part(self, att, g):
        if g.kv_grid != g.group:
            raise ShapeError("lepe needs keys/values on the query grid (no reduction, stride_kv = 1)")
        if self.kernel <= 0:
            raise ShapeError("lepe kernel must be positive")
        if self.source == "input" and g.inner != g.channels:
            raise ShapeError("lepe(source=\"input\") needs `dim` equal to the input channels")

    def add_params(self, att, g):
        return g.inner * self.kernel ** g.ndim + g.inner

    def add_macs(self, att, g):
        return g.tokens * g.inner * self.kernel ** g.ndim  # over the (padded) groups or the map

    def layer(self, att, g):
        from ...layers.attention.positions import LePE as Piece

        return Piece(g.inner, g.ndim, self.kernel, self.source, g.group if "partition" in g.features else None)

    def part_runtime_grid(self, att, x, features):
        return True


def cpb_centres(size: int, keys: int) -> list[float]:
    """The positions of `keys` keys pooled from an axis of `size` positions: the mean of each
    adaptive-average-pooling cell [floor(j size / keys), ceil((j + 1) size / keys))."""
    return [(j * size // keys + -(-(j + 1) * size // keys) - 1) / 2 for j in range(keys)]


def cpb_counts(grid: tuple[int, ...], keys: tuple[int, ...]) -> list[int]:
    """Per axis, the number of distinct query-minus-key offsets of `continuous_bias` (the table has
    their product of rows)."""
    return list(_counts(tuple(grid), tuple(keys)))


@functools.lru_cache(maxsize=256)
def _counts(grid: tuple[int, ...], keys: tuple[int, ...]) -> tuple[int, ...]:
    # every attention of a stage asks for the same grid's counts, each time its MACs are summed
    return tuple(_distinct_offsets(g, cpb_centres(g, m)) for g, m in zip(grid, keys))


def _distinct_offsets(size: int, centres: list[float]) -> int:
    """len({q - c for q in range(size) for c in centres}) without enumerating the pairs (a grid of
    thousands would take minutes): each centre gives the run of offsets -c .. size - 1 - c, and
    runs of centres with the same fractional part overlap where the centres are closer than `size`."""
    total = 0
    for part in {c % 1 for c in centres}:
        same = sorted({c for c in centres if c % 1 == part})
        total += size + sum(min(size, int(b - a)) for a, b in zip(same, same[1:]))
    return total
