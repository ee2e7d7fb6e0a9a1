"""What makes `composer check` fast, kept out of the semantic modules: each piece here can be
switched off, and tests/test_speed_invariants.py proves the results equal with and without it.

- `gc_paused`: no cyclic garbage collection while a model is parsed, resolved or planned.
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector while a model is parsed, resolved or planned.

    These steps allocate many small objects that reference counting frees (or that live on in the
    caches); collections in between find next to nothing to free but walk every live object: they
    took about a third of the time of checking the whole zoo. Nested uses and a collector the
    caller disabled are left alone; reference cycles made meanwhile are collected after, by a later
    full collection (see `_promote_young`)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if PROMOTE_YOUNG:
            _promote_young()
        gc.enable()


PROMOTE_YOUNG = True  # False: the first allocation after a pause collects everything it left (slower, same results)


def _promote_young() -> None:
    """Move every object the collector tracks into its oldest generation, without walking them.

    Re-enabled as is, the collector would run a young collection at the next allocation that walks
    everything the pause left alive (the parsed files, resolved instances and plans the caches keep):
    0.1 to 0.2 s over the zoo, with nothing to free. `freeze` then `unfreeze` moves all of it to
    the oldest generation instead (and resets the young count); a later full collection still frees
    any cycle among it. Skipped when the program froze objects itself: unfreezing would undo that."""
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()
