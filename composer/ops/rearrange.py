"""`rearrange`: an einops-style reshape/transpose of a feature map, the batch axis left implicit.

The pattern is parsed and checked in pure Python (`parse_pattern`, `solve`); the module is a
reshape, a permute and a reshape (views where the memory order allows)."""


import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Union

from ..shapes import Shape, ShapeError
from .registry import NonNeg, Op, Pos, Tensor, op

MAX_SPATIAL = 3  # the conv/pool/norm ops of the library work on 1-, 2- and 3-D grids

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<num>\d+)|(?P<paren>[()]))")
_EXAMPLE = 'e.g. "c t f -> (c f) t" or "c l -> 1 l c"'


@dataclass(frozen=True)
class Pattern:
    left: tuple[tuple[str, ...], ...]   # per input axis (channels first), its elementary axes ("1": a unit axis)
    right: tuple[tuple[str, ...], ...]  # per output axis, the same
    text: str

    @property
    def names(self) -> tuple[str, ...]:
        """The named elementary axes of the left side, in order."""
        return tuple(a for group in self.left for a in group if a != "1")


def _side(text: str, where: str) -> tuple[tuple[str, ...], ...]:
    items: list[tuple[str, ...]] = []
    group: list[str] | None = None
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            bad = text[pos:].strip()[:1] or text[pos:pos + 1]
            raise ShapeError(f"rearrange: unexpected {bad!r} on the {where} side of the pattern",
                             f"axes are names, 1, or a group of them in parentheses: {_EXAMPLE}")
        pos = m.end()
        if m.group("name") or m.group("num"):
            axis = m.group("name") or m.group("num")
            if m.group("num") and axis != "1":
                raise ShapeError(f"rearrange: the number {axis} on the {where} side is not an axis",
                                 "only 1 (a unit axis) may be written as a number; give other sizes a name "
                                 "and its size in `sizes`, e.g. sizes = [[\"p\", 16]]")
            if group is None:
                items.append((axis,))
            else:
                group.append(axis)
        elif m.group("paren") == "(":
            if group is not None:
                raise ShapeError(f"rearrange: nested parentheses on the {where} side of the pattern",
                                 "a group is a flat list of axes: (a b c)")
            group = []
        else:
            if group is None:
                raise ShapeError(f"rearrange: ')' without '(' on the {where} side of the pattern")
            items.append(tuple(group) if group else ("1",))
            group = None
    if group is not None:
        raise ShapeError(f"rearrange: '(' without ')' on the {where} side of the pattern")
    if not items:
        raise ShapeError(f"rearrange: the {where} side of the pattern names no axis", _EXAMPLE)
    seen: set[str] = set()
    for axis in (a for g in items for a in g if a != "1"):
        if axis in seen:
            raise ShapeError(f"rearrange: axis '{axis}' appears twice on the {where} side",
                             "every axis is named once per side; to copy data use another op (tile, upsample)")
        seen.add(axis)
    return tuple(items)


@lru_cache(maxsize=256)
def parse_pattern(text: str) -> Pattern:
    """Parse `"LEFT -> RIGHT"` and check that both sides name the same axes."""
    if text.count("->") != 1:
        raise ShapeError(f"rearrange: the pattern {text!r} needs exactly one '->'", _EXAMPLE)
    lhs, rhs = text.split("->")
    left, right = _side(lhs, "left"), _side(rhs, "right")
    names_l = [a for g in left for a in g if a != "1"]
    names_r = [a for g in right for a in g if a != "1"]
    for axis in names_r:
        if axis not in names_l:
            raise ShapeError(f"rearrange: unknown axis '{axis}' on the right side (the left side names "
                             f"{', '.join(names_l) or 'no axis'})",
                             "rearrange moves axes, it cannot make new ones: name it on the left too")
    for axis in names_l:
        if axis not in names_r:
            raise ShapeError(f"rearrange: axis '{axis}' of the left side is missing on the right side",
                             "rearrange keeps every element: every axis of the left side must appear on the right "
                             "(a unit axis is written 1)")
    return Pattern(left, right, text)


def _show(group: tuple[str, ...]) -> str:
    return group[0] if len(group) == 1 else "(" + " ".join(group) + ")"


def _solved_from(pattern: Pattern, onto: dict[int, int] | None) -> set[str]:
    """The axes of the output groups that `onto` fixes."""
    return {a for index in (onto or {}) for a in pattern.right[index]}


def solve(pattern: Pattern, dims: tuple[int, ...], sizes: dict[str, int],
          onto: dict[int, int] | None = None) -> tuple[dict[str, int], tuple[int, ...]]:
    """The size of every elementary axis and the output dims (channels first), for input dims `dims`;
    `onto` fixes output axes (index on the right side -> size), which solves a split the sizes
    leave open (`like = t`: back onto t's grid)."""
    if len(pattern.left) != len(dims):
        names = " ".join(_show(g) for g in pattern.left)
        raise ShapeError(f"rearrange: the left side '{names}' has {len(pattern.left)} axes but the input map has "
                         f"{len(dims)} (channels + {len(dims) - 1} spatial: {dims[0]}, "
                         f"{'x'.join(map(str, dims[1:]))})",
                         "the first axis of each side is the channel axis of the map, the others its spatial axes; "
                         "the batch axis is never written")
    for name in sizes:
        if name not in pattern.names:
            raise ShapeError(f"rearrange: sizes names axis '{name}', which the pattern does not have",
                             f"the pattern's axes: {', '.join(pattern.names)}")
    known = dict(sizes)
    given = set(known)  # the rest are solved from `onto` (like's grid) or from the input
    if onto:  # an output group with one axis left open takes what its fixed size leaves
        for _ in range(len(pattern.names)):
            for index, dim in onto.items():
                group = pattern.right[index]
                unknown = [a for a in group if a != "1" and a not in known]
                fixed = math.prod(known[a] for a in group if a != "1" and a in known)
                if len(unknown) == 1 and fixed and dim % fixed == 0:
                    known[unknown[0]] = dim // fixed
    for group, dim in zip(pattern.left, dims):
        unknown = [a for a in group if a != "1" and a not in known]
        fixed = math.prod(known[a] for a in group if a != "1" and a in known)
        if len(unknown) > 1:
            raise ShapeError(f"rearrange: cannot tell the sizes of {', '.join(unknown)} in {_show(group)} = {dim}",
                             f"give all but one of them in sizes, e.g. sizes = [[\"{unknown[-1]}\", N]]")
        if unknown:
            if fixed == 0 or dim % fixed:
                raise ShapeError(f"rearrange: {_show(group)} = {dim} is not divisible by the given sizes ({fixed})",
                                 f"the input's axis here must be a multiple of {fixed}: choose an input size "
                                 "that gives one")
            known[unknown[0]] = dim // fixed
        elif fixed != dim:
            what = " * ".join(f"{a}={known[a] if a != '1' else 1}" for a in group)
            grid = [a for a in group if a in known and a not in given and a in _solved_from(pattern, onto)]
            raise ShapeError(f"rearrange: the input axis {_show(group)} has size {dim}, but {what} = {fixed}"
                             + (f" ({', '.join(grid)} from the grid of `like`, {'x'.join(map(str, onto.values()))})"
                                if grid else ""),
                             "`like` names the map this one was laid out from: its grid must give back this "
                             "input" if grid else "the sizes of a group must multiply to the size of its input axis")
    out = tuple(math.prod(known[a] for a in group if a != "1") for group in pattern.right)
    for index, dim in (onto or {}).items():
        if out[index] != dim:
            raise ShapeError(f"rearrange: the output axis {_show(pattern.right[index])} would have size "
                             f"{out[index]}, but the grid it goes back onto has {dim}",
                             "`like` names a map whose grid the output must have")
    return known, out


@op("rearrange", category="layout", layout="map")
class Rearrange(Op):
    """Reshape and transpose a map with an einops-style `pattern`, the batch axis left implicit:
    `"c t f -> (c f) t"` turns a (B, C, T, F) map into a (B, C*F, T) 1-D map, `"c l -> 1 l c"`
    moves a (B, N, L) signal's N channels onto a spatial axis: a (B, 1, L, N) map.

    Each side lists axes: a name, `1` (a unit axis) or a group of them in parentheses (`(c f)`, the
    merge of c and f with f varying fastest, as `reshape` flattens; `()` is a unit axis). How the
    axes map to the layout: the first axis of each side is the map's channel axis, the others are
    its spatial axes in order, so the left side has 1 + (spatial dims) axes and the right side
    gives the output map 1 to 3 spatial axes. Every named axis appears exactly once on each side.
    A group on the left is split: all but one of its axes need a size, given as `sizes` (name/size
    pairs: `rearrange("c (n p) v -> (c p) n v", sizes = [["p", 16]])`). Maps only: a token sequence
    (B, N, C) is folded into its map first like for every map op (tokens with class tokens cannot
    be), and a vector is refused. Built as reshape -> permute -> reshape (views where the memory
    order allows, otherwise one copy). No parameters, no MACs. Errors (unknown or repeated axis, a
    group whose sizes do not multiply to its input axis, the wrong number of axes) point at the op.
    The module solves the sizes for the input it gets at run time, as the shape rule does (the
    axes of `sizes` keep theirs), so a model runs at other input sizes where the ops after it do.
    `like = t` puts the output on the grid of map `t` (its spatial sizes): the way back of an
    earlier rearrange, `rearrange("c (ph pw) (h w) -> c (h ph) (w pw)", sizes = [["ph", 2],
    ["pw", 2]], like = t)` with `t = identity` saved before it, whose h and w only the grid tells;
    at run time they come from t's shape."""

    pattern: str
    sizes: list[list[Union[str, int]]] = []
    like: Optional[Tensor] = None

    def _sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pair in self.sizes:
            if (len(pair) != 2 or not isinstance(pair[0], str) or isinstance(pair[1], bool)
                    or not isinstance(pair[1], int) or pair[1] < 1):
                raise ShapeError(f"rearrange: sizes entry {pair!r} is not a [\"name\", size] pair with a positive size",
                                 'e.g. sizes = [["p", 16]]')
            if pair[0] in out:
                raise ShapeError(f"rearrange: sizes gives axis '{pair[0]}' twice")
            out[pair[0]] = pair[1]
        return out

    def plan(self, x: Shape) -> tuple[Pattern, dict[str, int], tuple[int, ...]]:
        """The parsed pattern, every elementary axis's size and the output dims (channels first)."""
        if x.layout != "map":
            raise ShapeError(f"rearrange needs a map (B, C, *grid), got {x.layout} {x}",
                             "a pooled vector has no axes to move" if x.layout == "vector" else
                             "fold the tokens into a map first (to_map): the first axis of a pattern is the channels")
        pattern = parse_pattern(self.pattern)
        known, out = solve(pattern, (x.channels, *x.spatial), self._sizes(), self._onto(pattern))
        return pattern, known, out

    def _onto(self, pattern: Pattern) -> dict[int, int] | None:
        """The output axes `like` fixes: its spatial sizes, right-side index 1 on."""
        if self.like is None:
            return None
        t = self.like.shape
        if t.layout != "map" or not t.spatial:  # tokens (B, N, C) do not tell their grid at run time
            raise ShapeError(f"rearrange: like = {self.like.name} must be a map, got {t.layout} {t}",
                             "bind the map before it becomes tokens (or fold them back: to_map)"
                             if t.layout == "tokens" else None)
        if len(t.spatial) != len(pattern.right) - 1:
            raise ShapeError(f"rearrange: the right side has {len(pattern.right) - 1} spatial axes, but like = "
                             f"{self.like.name} has a {len(t.spatial)}-D grid ({t})",
                             "the output goes onto like's grid: one right-side axis per grid axis")
        return {i + 1: n for i, n in enumerate(t.spatial)}

    def infer(self, x: Shape) -> Shape:
        pattern, _, out = self.plan(x)
        if not 2 <= len(out) <= 1 + MAX_SPATIAL:
            raise ShapeError(f"rearrange: the right side has {len(out)} axes; a map needs channels and 1 to "
                             f"{MAX_SPATIAL} spatial axes",
                             "the first axis is the channels, the rest the grid: write e.g. \"c l -> c l 1\"")
        return Shape(out[0], tuple(out[1:]), "map")

    def build(self, x, y):
        from ..layers.rearrange import Rearrange as Module

        pattern, known, out = self.plan(x)
        names = pattern.names
        split = tuple(known[a] for a in names)
        order = tuple(names.index(a) for group in pattern.right for a in group if a != "1")
        left = [[names.index(a) for a in group if a != "1"] for group in pattern.left]
        right = [[names.index(a) for a in group if a != "1"] for group in pattern.right]
        given = {names.index(a): n for a, n in self._sizes().items()}
        onto = self.like is not None
        return Module(split, order, out, (x.channels, *x.spatial), left, right, given, onto)


@op("split_channels", category="layout")
class SplitChannels(Op):
    """Split the channels of a map or of tokens into parts of `widths` channels, in order, and keep
    part `part`: `query, key, value = split_channels(widths = [1, 64, 64])` binds all three (the
    names give `parts` and `part`), each a map (or tokens) on the input's grid. Views of the
    input: no copy, no parameters, no MACs. Without `widths`, the channels split into `parts`
    equal parts. The split of a fused projection when the parts stay maps or tokens
    (`split_heads` splits into heads)."""

    widths: Optional[list[Pos]] = None
    part: NonNeg = 0
    parts: Optional[Pos] = None

    def split(self, channels: int) -> list[int]:
        if self.widths is not None and not self.widths:
            raise ShapeError("split_channels: widths is empty", "give one width per part, e.g. widths = [1, 64, 64]")
        n = self.parts or (len(self.widths) if self.widths else 1)
        if self.widths is not None:
            if len(self.widths) != n:
                raise ShapeError(f"split_channels: widths {self.widths} give {len(self.widths)} parts, "
                                 f"but {n} are taken")
            if sum(self.widths) != channels:
                raise ShapeError(f"split_channels: widths {self.widths} add up to {sum(self.widths)} channels, "
                                 f"but the input has {channels}")
            return list(self.widths)
        if channels % n:
            raise ShapeError(f"split_channels: {n} equal parts do not divide {channels} channels",
                             "give each part's width: widths = [...]")
        return [channels // n] * n

    def infer(self, x: Shape) -> Shape:
        if x.layout not in ("map", "tokens"):
            raise ShapeError(f"split_channels needs a map or tokens, got {x.layout} {x}",
                             "heads are split with split_heads")
        widths = self.split(x.channels)
        if not 0 <= self.part < len(widths):
            raise ShapeError(f"split_channels: part {self.part} of {len(widths)} parts does not exist")
        return x.with_(channels=widths[self.part])

    def build(self, x, y):
        from ..layers.rearrange import SplitChannels as Module

        widths = self.split(x.channels)
        return Module(sum(widths[:self.part]), widths[self.part], x.layout == "tokens")
