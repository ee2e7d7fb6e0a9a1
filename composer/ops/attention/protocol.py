"""The protocol of an attention part, and the requirement table the `attention` op evaluates.

A part is an `Op` registered with `kind="part"` (pydantic fields = its settings) that fills one
role of the attention: `partition` (which keys a query sees), `kv` (where keys and values come
from), `projection` (how q, k, v are projected), `position` (position information), `query`
(which tokens are queries), `score` (the score function), `extra_kv` (more keys under the same
softmax) or `agents`. It owns, besides its settings (pure Python, no torch at module level):

* `provides(x, role) -> set[str]`: what it brings to the configuration, as words of the
  vocabulary below (a window partition brings {"partition", "local", "window"} and "shifted"
  when it shifts). The input adds "grid" (tokens on a spatial grid), "grid_3d" (more than two
  dims), "prefix" (prefix tokens) and "class_tokens" (prefix tokens that are not a partition's
  own: every prefix token unless messengers); the op's own settings add "dim", "value_skip".
* `requirements(role) -> tuple[Requirement, ...]`: its rows of the requirement table. A row
  applies when all of its `when` features are present; it then needs all of its `needs` and none
  of its `excludes`, or raises ShapeError(message, hint). Messages are formatted with the parts'
  names (`{partition}`, `{kv}`, `{position}`, `{score}`, `{query}`). No part tests another part's
  class: a new part declares its features and rows, and the attention class is not edited.
* `check_part(att, g)`: the checks of its own values (sizes that must divide the grid, counts > 0),
  after the whole table passed; `g` is the attention's `Geometry` for the input.
* `add_params(att, g) -> int`, `add_macs(att, g) -> int`: the parameters and the
  multiply-accumulates it adds to the attention's (its tables, MLPs, convs, products).
  A part that replaces the product of the queries with the keys and values (linear attention,
  agents) gives `core_macs(att, g)` (None: the default 2 n keys d).
* Geometry, for the parts that shape the attention groups (partitions, query and key parts):
  `group(x)`, `queries(x)`, `keys(x)`, `tokens(x)` (see `Geometry`).
* `layer(att, g)`: its piece of the torch module (None: none), a `composer.layers.attention.Piece`
  that installs its parameters, buffers and submodules on the attention module under their
  state_dict names and takes some steps of its forward (composer/layers/attention/module.py lists
  them: regroup the tokens, project, add keys or score terms, replace the dense product, add to
  the output). The op's `build` only collects the pieces: a new part adds a piece class and its
  `layer`, and neither the op nor the module is edited.
"""


from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional

from ..registry import Op, prod
from ...shapes import Shape, ShapeError

ROLES = ("query", "partition", "kv", "projection", "position", "extra_kv", "score", "agents")


class Requirement(NamedTuple):
    """A row of the requirement table: when every `when` feature is present, every `needs`
    feature must be present and no `excludes` feature may be."""

    when: frozenset = frozenset()
    needs: frozenset = frozenset()
    excludes: frozenset = frozenset()
    message: str = ""
    hint: Optional[str] = None


def rule(message: str, when=(), needs=(), excludes=(), hint: Optional[str] = None) -> Requirement:
    return Requirement(frozenset(when), frozenset(needs), frozenset(excludes), message, hint)


def evaluate(rows, features: set, names: dict) -> None:
    """Raise the first row's error that the configuration's `features` break."""
    for row in rows:
        if row.when <= features and (row.needs - features or row.excludes & features):
            raise ShapeError(row.message.format(**names), row.hint)


class Part(Op):
    """Base class of the attention parts (see the module docstring for the protocol)."""

    def provides(self, x: Shape, role: str) -> set:
        return set()

    def requirements(self, role: str) -> tuple:
        return ()

    def check_part(self, att, g: "Geometry") -> None:
        pass

    def add_params(self, att, g: "Geometry") -> int:
        return 0

    def add_macs(self, att, g: "Geometry") -> int:
        return 0

    def add_buffers(self, att, g: "Geometry") -> int:
        """Elements of the buffers this part makes the module register (`Op.buffer_elements`)."""
        return 0

    def core_macs(self, att, g: "Geometry") -> Optional[int]:
        return None

    def layer(self, att, g: "Geometry"):
        return None

    def working_shape(self, x: Shape) -> Shape:
        """The shape the attention works in (given queries: the token half of the channels)."""
        return x

    def sizes(self, x: Shape) -> dict:
        """The `Geometry` fields this part sets for input `x` (group, queries, keys, kv_grid,
        tokens, kv_tokens); the attention starts from global self-attention over the tokens."""
        return {}

    def extra_keys(self, x: Shape) -> int:
        """In the `extra_kv` role: the keys it adds to every query's."""
        return 0

    def out_tokens(self, x: Shape) -> Optional[int]:
        """The output's token count when not the input's (a 1-D sequence of queries)."""
        return None

    def part_runtime_grid(self, att, x: Shape, features: set) -> bool:
        """Whether the module, with this part, runs at another grid than the build's."""
        return False

    projects_query: ClassVar[bool] = True  # False: the queries are not projected (given queries)


@dataclass(frozen=True)
class Geometry:
    """The sizes of one attention for an input: `x` the shape it works in (the token half with
    given queries), `heads`, `head_dim`, `inner` (the width of q, k and v), `group` (the grid of
    one attention group: a window, else the whole grid), `queries` and `keys` (per group and per
    query: learned and extra keys included), `kv_grid` (the grid of the keys and values), `tokens`
    (the tokens q is projected from: padded windows and messengers included), `kv_tokens` (the
    tokens k and v are projected from)."""

    x: Shape
    heads: int
    head_dim: int
    inner: int
    group: tuple
    queries: int
    keys: int
    kv_grid: tuple
    tokens: int
    kv_tokens: int
    features: frozenset = frozenset()

    @property
    def channels(self) -> int:
        return self.x.channels

    @property
    def ndim(self) -> int:
        return self.x.ndim


def check_groups(kind: str, size: int, grid: tuple[int, ...]) -> None:
    if size <= 0:
        raise ShapeError(f"{kind} size must be positive, got {size}")
    for g in grid:
        if g % size:
            raise ShapeError(
                f"{kind} {size} does not divide feature size {g}",
                f"choose an input size so that the grid ({'x'.join(map(str, grid))}) is a multiple of {size}",
            )


__all__ = ["ROLES", "Requirement", "rule", "evaluate", "Part", "Geometry", "check_groups", "prod"]
