"""One work budget per check: every blueprint checks in bounded time and memory.

The language has no loops, but a few constructs multiply work: list comprehensions over ranges,
list repetition and concatenation, strings doubled by `+`, blocks repeated or expanded into
themselves, `parallel for` inside `parallel for`. Each such piece of work draws units from one
budget, opened per model resolved (`opened`): an expression evaluated (one unit a node), an item
of a list or a character of a string made, a statement of a body expanded, a resolved layer
copied. When the budget runs out the check stops with a located "too large" error (exit 2).

Numbers are bounded too: an int or a float beyond `MAX_NUMBER` (about 1.8e308, the float range)
is an error where it is made, before a huge multiplication or power is computed.
"""

from __future__ import annotations

import contextlib
import math

from .diagnostics import error
from .source import Span

LIMIT = 2_500_000  # units a model's check may use: about half a second; the zoo's largest model uses a tenth
MAX_SEED = 2**63 - 1  # a build's seed: torch.manual_seed takes a signed 64-bit int
MAX_BITS = 1024  # ints up to 2**1024 (about 1.8e308, like floats)
MAX_NUMBER = 2.0 ** 1023 * (2 - 2 ** -52)  # the largest float
MAX_DIGITS = 400  # an integer literal longer is refused before Python converts it (2**1024 has 309 digits)


class _Budget:
    __slots__ = ("left", "limit")

    def __init__(self, limit: int):
        self.left = self.limit = limit


# The budget of the check in progress (a check runs in one thread). One object, its fields reset
# by `opened`: the evaluator keeps a reference to it (its hot path reads no module attribute).
STATE = _Budget(LIMIT)


@contextlib.contextmanager
def opened(limit: int = LIMIT):
    """A fresh budget for the work inside (one model's check); the enclosing one is restored after."""
    outer = STATE.left, STATE.limit
    STATE.left = STATE.limit = limit
    try:
        yield STATE
    finally:
        STATE.left, STATE.limit = outer


def charge(units: int, span: Span | None, what: str) -> None:
    """Draw `units` from the budget of the check in progress; a located error when it runs out."""
    state = STATE
    state.left -= units
    if state.left < 0:
        state.left = 0
        raise exhausted(span, what)


def exhausted(span: Span | None, what: str):
    return error("too-large", f"too large: {what} exceeds the work budget of a check", span,
                 f"a check may do {STATE.limit:,} units of work (expressions evaluated, list items and "
                 "characters made, statements expanded); this grows too fast: make it smaller")


def too_big(value, span: Span | None):
    """`value` itself when it is a number within range; a located error for one beyond it."""
    cls = value.__class__
    if cls is int:
        if value.bit_length() > MAX_BITS:
            raise error("too-large", f"too large: a number with {value.bit_length() * 30103 // 100000 + 1:,} "
                        "digits", span, f"numbers must stay below {MAX_NUMBER:.3g} in magnitude")
    elif cls is float and not math.isfinite(value):
        raise error("too-large", f"too large: the result is {value}", span,
                    f"numbers must stay below {MAX_NUMBER:.3g} in magnitude")
    return value


def product_bits(left: int, right: int) -> int:
    """An upper bound on the bits of `left * right`."""
    return left.bit_length() + right.bit_length()
