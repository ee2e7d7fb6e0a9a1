"""The instructions of a built `Sequence`'s program (composer/builder.py runs them, composer/fuse.py
rewrites them). Each kind is its own class, so the forward loop dispatches on the class itself.
Pure Python: no torch."""

from __future__ import annotations

from typing import NamedTuple


class Call(NamedTuple):
    """Run the submodule registered under `name` (an op, or a composite's own Sequence)."""

    name: str


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
    """Tokens (B, N, C) back to a map (B, C, *grid)."""

    grid: tuple


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
