"""When may a port reshape a reference tensor into ours without a rule? Only when the reshape keeps
the order of the axes: it adds or drops size-1 axes, and merges runs of adjacent axes into one or
splits one axis into a run (a 1x1 conv [O, I, 1, 1] <-> a linear [O, I]; a [1, 2, C] token pair
<-> two [1, C]). Anything else (a [1, C, H, W] map read as [1, H*W, C] tokens) reads the elements
in another order, and needs an explicit `permute`, `transpose` or `view` rule in the port map.
Pure Python: the shapes are tuples of ints.
"""

from __future__ import annotations

import itertools
import math
import re

from .diagnostics import error


def _prefixes(shape) -> list[int]:
    out, n = [], 1
    for s in shape:
        n *= s
        out.append(n)
    return out


def keeps_axis_order(a, b) -> bool:
    """Whether reshaping shape `a` to shape `b` only adds or drops size-1 axes and merges or splits
    adjacent axes. Precisely: with the size-1 axes dropped, cut both shapes where their running
    products agree; every piece must hold one axis on at least one side."""
    a = [s for s in a if s != 1]
    b = [s for s in b if s != 1]
    if math.prod(a) != math.prod(b):
        return False
    cuts = sorted(set(_prefixes(a)) & set(_prefixes(b)))
    pa, pb = _prefixes(a), _prefixes(b)
    start = 1
    for cut in cuts:
        na = sum(1 for p in pa if start < p <= cut)
        nb = sum(1 for p in pb if start < p <= cut)
        if na > 1 and nb > 1:
            return False
        start = cut
    return True


def suggest_permutation(ref, ours) -> list[int] | None:
    """A permutation of the reference tensor's axes after which it reshapes into `ours` keeping the
    axis order (the rule to write); of those, the one that swaps the fewest pairs of axes (a grid
    [C, H, W] becomes [H, W, C], not [W, H, C]), else None."""
    if len(ref) > 6:
        return None
    best = None
    for perm in itertools.permutations(range(len(ref))):
        if list(perm) == sorted(perm):
            continue
        if keeps_axis_order([ref[i] for i in perm], ours):
            moved = sum(1 for i, j in itertools.combinations(range(len(perm)), 2) if perm[i] > perm[j])
            if best is None or moved < best[0]:
                best = (moved, list(perm))
    return best[1] if best else None


def rule_to_write(ref: str, have: tuple, want: tuple) -> str:
    """The port-map rule that reads reference tensor `ref` (shape `have`) as `want`."""
    key = "'^" + re.escape(ref).replace("'", "''") + "$'"
    perm = suggest_permutation(have, want)
    if perm is not None:
        return f"permute: {{{key}: {perm}}}"
    return f"view: [{key}] (if a row-major reshape is meant)"


def refuse_reorders(plan, report, path) -> None:
    """A located error (at the op that owns the tensor) for the first tensor whose element count
    matches but whose plain reshape would reorder the elements; nothing when there is none."""
    if not report.reordered:
        return
    key, ref, ours, theirs, rule = report.reordered[0]
    steps = {s.path: s for sec in plan.sections for st in sec.steps for s in st.walk()}
    owner = max((p for p in steps if key.startswith(p + ".")), key=len, default=None)
    more = len(report.reordered) - 1
    raise error("port-order", f"{key} {list(ours)} would be {ref} {list(theirs)} reshaped, which reorders its "
                f"elements" + (f" ({more} more such tensor(s) in the report)" if more else ""),
                steps[owner].span if owner else plan.span,
                f"say how the axes map in {path}: {rule}")
