"""The instructions of a built `Sequence`'s program (composer/builder.py runs them, composer/fuse.py
rewrites them). Each kind is its own class, so the forward loop dispatches on the class itself.
Pure Python: no torch."""

from __future__ import annotations

from typing import NamedTuple

# The grid the flowing tokens lie on is kept in the forward pass's named tensors under this key
# (never a tensor name: those are identifiers), and a saved tensor's grid under GRID + name, so a
# model built at one size folds tokens back into maps at the size it actually gets.
GRID = " grid"


class Call(NamedTuple):
    """Run the submodule registered under `name` (an op, or a composite's own Sequence)."""

    name: str


class TrainCall(NamedTuple):
    """Run the module `name` in training mode only: a module that returns its input unchanged in
    eval mode (dropout), skipped at inference without a call."""

    name: str


class GridCall(NamedTuple):
    """Run the module `name` on the flowing tokens and the grid they lie on (B, N, C), grid
    (a module with `takes_grid`); `regrid`: the tokens it returns lie on `module.out_grid(grid)`."""

    name: str
    regrid: bool = False


class TensorCall(NamedTuple):
    """Run the module `name` on the flowing tensor and the named tensors `keys`:
    `module(x, *tensors)`; with `grids`, also `grids=(grid of x, grid of each tensor)`, and
    `regrid`: the output lies on `module.out_grid(grids)`."""

    name: str
    keys: tuple
    grids: bool = False
    regrid: bool = False


class Attend(NamedTuple):
    """`scores` (on the flowing queries and the keys `k`), the additive score terms `biases`
    ((name, takes the grid, the keys of the named tensors it takes) each), softmax, `dropout` (a
    name or None) and `weights` (on the values `v`), run as one scaled-dot-product attention call
    (composer/chains.py)."""

    scores: str
    biases: tuple
    dropout: str | None
    weights: str
    k: str
    v: str


class Forget(NamedTuple):
    """At the end of a composite: drop the named tensors it kept for itself (its bindings)."""

    keys: tuple


class MapGrid(NamedTuple):
    """Before an op that turns a map into tokens on the same grid: the grid of the flowing map is
    the grid of the tokens to come."""


class StaticGrid(NamedTuple):
    """After an op that puts tokens on a grid of its own without telling it at run time: the grid
    inferred for the size the model was built at (composer.sizes refuses input sizes for which
    this op's grid would differ)."""

    grid: tuple


class Save(NamedTuple):
    """`save name`: keep the flowing tensor in the forward pass's named tensors."""

    name: str


class Load(NamedTuple):
    """`from name`: continue from a named tensor."""

    name: str


class Shared(NamedTuple):
    """`reuse name`: run the module registered at that model path (linked by ComposedModel)."""

    name: str


class ToTokens(NamedTuple):
    """A map (B, C, *grid) to tokens (B, N, C)."""


class ToMap(NamedTuple):
    """Tokens (B, N, C) back to a map (B, C, *grid), on the grid they lie on at run time."""


class Residual(NamedTuple):
    """`shortcut(x) + body(x)` (an empty shortcut: x), the body under drop-path `drop_path`;
    `add_into`: the sum may be written into the body's fresh output (see `Sequence._mark`)."""

    body: list
    shortcut: list
    drop_path: float
    add_into: bool = False


class Parallel(NamedTuple):
    """Branches on the input (or on its `split` channel groups), merged by `merge`; `axes`: the
    channel axis of the input and of the output."""

    merge: str
    branches: list
    split: tuple | list | None
    axes: tuple


def program_of(module) -> list | None:
    """The program of a built `Sequence` (composer/builder.py), None for any other module: how the
    passes that rewrite programs (fuse.py, optimize.py, optimize_layout.py) find them without
    importing the builder."""
    prog = module.__dict__.get("program")
    return prog if isinstance(prog, list) else None
