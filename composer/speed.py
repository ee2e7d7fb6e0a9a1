"""What makes `composer check` fast, kept out of the semantic modules: each piece here can be
switched off, and tests/test_speed_invariants.py proves the results equal with and without it.

- `gc_paused`: no cyclic garbage collection while a model is parsed, resolved or planned.
- composite instances: a composite used with equal arguments (its body seeing the same names) is
  expanded once and copied, across files too (`instance_key`, `reused_instance`,
  `keep_instance`); `freeze_args` switches it off.
- block replay: an equal block with the same input is lowered once per input shape and replayed
  under its own path (`lowered_block`); `_signature` switches it off.
- sections kept while sizes are probed: a model planned again at another input size takes the
  sections of an earlier size that get the same input (`kept_section`, inside `sections_kept`);
  `SECTIONS_KEPT` switches it off.
"""

from __future__ import annotations

import contextlib
import gc
import threading

from .diagnostics import ComposerError, warnings_issued
from .expr import Ref
from .plan import ParallelStep, ResidualStep, Section, SeqStep
from .resolved import NamedTensor, OpNode, ParallelNode, ResidualNode, ReuseNode, SubSeq


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


# ---- composite instances ---------------------------------------------------------------------
# An instance depends on the block it is in only through its residuals' drop-path rate, unless a
# per-block value (alternate, linspace) was concretized while expanding it. Other instances are
# kept (`INSTANCES`) by (definition, the names its body sees, typed arguments, depth) and copied on
# reuse: a library composite expanded for one file is copied for the next that uses it alike.


class _Count(threading.local):
    n = 0


PER_BLOCK = _Count()  # per-block values concretized so far in this thread (instances using one are not kept)
INSTANCES: dict = {}  # instance key -> (definition, names, items, item count); cleared when full
_INSTANCES_MAX = 4096


def instance_key(comp, names, args: tuple, depth: int) -> tuple | None:
    """The key of an instance of `comp`, whose body sees `names`, with these arguments, or None
    when one cannot be keyed."""
    try:
        return (id(comp), id(names), freeze_args(args), depth)
    except Unfrozen:
        return None


def reused_instance(key, comp, names, drop_path: float) -> tuple[list, int] | None:
    """A copy of the items kept under `key`, its residuals at `drop_path`, and how many items it
    holds (`item_count` of the copy, counted once when kept); None when none is kept."""
    if key is None:
        return None
    known = INSTANCES.get(key)
    if known is not None and known[0] is comp and known[1] is names:  # ids may be reused
        return _copy_items(known[2], drop_path), known[3]
    return None


def instance_mark() -> tuple[int, int]:
    """What `keep_instance` compares: per-block values concretized, deprecation warnings issued."""
    return PER_BLOCK.n, warnings_issued()


def keep_instance(key, comp, names, items: list, mark: tuple[int, int]) -> None:
    """Keep a copy of freshly expanded `items`, unless a per-block value was used since `mark`, or
    a deprecation warned (a copy would not warn again: each check must, where it is written)."""
    if key is not None and instance_mark() == mark:
        kept = _copy_items(items, 0.0)
        if len(INSTANCES) >= _INSTANCES_MAX:
            INSTANCES.clear()
        INSTANCES[key] = (comp, names, kept, item_count(kept))


_PLAIN = frozenset({int, float, str, bool, type(None)})


class Unfrozen(Exception):
    """A value that cannot be part of an instance key."""


def _freeze(value):
    """A hashable key for an argument value that tells apart what `==` confuses (1, 1.0, true; 0.0, -0.0)."""
    cls = value.__class__
    if cls is float:
        return (float, repr(value))
    if cls in _PLAIN:
        return (cls, value)
    if cls is list:
        return (list, tuple(_freeze(v) for v in value))
    if cls is Ref:
        return (Ref, value.name, value.kind, id(value.target), freeze_args(value.args), value.spans, value.span)
    raise Unfrozen


def freeze_args(args: tuple) -> tuple:
    return tuple((k, _freeze(v)) for k, v in args)


def item_count(items: list) -> int:
    """How many resolved items `items` holds, nested ones included."""
    n = 0
    for it in items:
        n += 1
        cls = it.__class__
        if cls is SubSeq:
            n += item_count(it.items)
        elif cls is ResidualNode:
            n += item_count(it.body) + item_count(it.shortcut)
        elif cls is ParallelNode:
            n += sum(item_count(b) for b in it.branches)
    return n


def _copy_items(items: list, drop_path: float) -> list:
    """A fresh copy of resolved items (ops are frozen and shared), every residual at `drop_path`."""
    out = []
    for it in items:
        cls = it.__class__
        if cls is OpNode:
            out.append(OpNode(it.name, it.op, it.span))
        elif cls is SubSeq:
            out.append(SubSeq(it.name, it.kind, _copy_items(it.items, drop_path), it.span, it.call))
        elif cls is ResidualNode:
            out.append(ResidualNode(_copy_items(it.body, drop_path), _copy_items(it.shortcut, drop_path), drop_path,
                                    it.span))
        elif cls is ParallelNode:
            out.append(ParallelNode(it.merge, [_copy_items(b, drop_path) for b in it.branches],
                                    list(it.split) if it.split is not None else None, it.span))
        elif cls is NamedTensor:
            out.append(NamedTensor(it.action, it.tensor, it.span))
        elif cls is ReuseNode:
            out.append(ReuseNode(it.path, it.span))
        else:
            raise AssertionError(f"unknown item {it!r}")
    return out


# ---- block replay: equal blocks are lowered once per input shape ------------------------------
#
# Repeated blocks of a stage are mostly equal (the same resolved instance, copied): an equal block
# with the same input is lowered once and replayed under its own path, every step renamed, its
# residuals at its own drop-path rate. `_signature` returning None (tests switch it off so) lowers
# every block afresh.


# (block signature, input shape) -> (the path it was lowered at, its Section). Kept across plans:
# the variants of a family and repeated loads of a model share resolved instances, so their blocks
# are equal too. The entries hold the ops and spans whose ids the signatures name, so an id cannot
# be reused while its entry lives.
_LOWERED: dict = {}
_LOWERED_MAX = 4096


@contextlib.contextmanager
def blocks_forgotten():
    """Blocks lowered inside are not kept: probing hundreds of input sizes (composer.sizes) would
    fill the cache with sections no later check asks for."""
    before = set(_LOWERED)
    try:
        yield
    finally:
        for key in [k for k in _LOWERED if k not in before]:
            del _LOWERED[key]


def lowered_block(lower, path: str, block, x, counted: bool = True, tensors=None):
    """The Section of stage block `block` at `path` with input shape `x`: `lower()` lowers it, or
    an equal block lowered before is replayed (`counted`: its op steps' counts kept first, for
    the replays to copy). `tensors`: the lowering's named tensors (`saved` and `fold_of`, by key,
    `folds` open, `tape`): a block that reads named tensors saved before it is replayed only
    where they have the shapes they had when it was lowered, and its own saves are made again."""
    # made once per block while sizes are probed (the same blocks, planned at hundreds of sizes)
    sig = once_per(_SECTIONS.signatures if getattr(tensors, "kept", False) else None, block.items, _signature)
    if sig is None or tensors is None or tensors.folds:
        return lower()
    key = (sig[0], x)
    done = _LOWERED.get(key)
    if done is not None:
        old, sec, reads, writes = done
        if _reads_hold(tensors, reads):
            _replayed(tensors, reads, writes)
            replay = Section(path, _renamed(sec.steps, path, len(old), sig[1]), x, sec.y, block.drop_path,
                             block.call, block.span)
            if counted:
                replay.keep_cost(sec.cost())
            return replay
    tape = tensors.tape = TensorTape(tensors.tape)
    try:
        sec = lower()
    finally:
        tensors.tape = tape.outer
    if counted:
        sec.cost()  # its counts kept (plan.COUNTS_KEPT), with its op steps': the replays copy them
    if len(_LOWERED) >= _LOWERED_MAX:
        _LOWERED.clear()
    _LOWERED[key] = (path, sec, tape.reads(), tape.writes())
    return sec


def _reads_hold(tensors, reads) -> bool:
    """Whether the named tensors a block or section read when it was lowered have the same shapes
    and folds in `tensors` (the lowering's `saved` and `fold_of`) now."""
    saved, fold_of = tensors.saved, tensors.fold_of
    return all(saved.get(k) == shape and fold_of.get(k) == fold for k, shape, fold in reads)


def _replayed(tensors, reads, writes) -> None:
    """A replayed block or section's named tensors: its saves made again, and both told to the
    tape of the section around it, if one records."""
    saved, fold_of, tape = tensors.saved, tensors.fold_of, tensors.tape
    if tape is not None:
        for k, shape, fold in reads:
            tape.read(k, shape, fold)
    for k, shape, fold in writes:
        saved[k], fold_of[k] = shape, fold
        if tape is not None:
            tape.write(k, shape, fold)


class TensorTape:
    """The named tensors a block's lowering reads that were saved before it, and those it saves:
    (key, shape, (fold depth, opener)) each, the first read and the last save of a key. `outer`:
    the tape of the section around the block, told the same."""

    def __init__(self, outer: "TensorTape | None" = None):
        self.outer = outer
        self._reads: dict = {}
        self._writes: dict = {}

    def read(self, key: str, shape, fold) -> None:
        if key not in self._writes and key not in self._reads:
            self._reads[key] = (shape, fold)
        if self.outer is not None:
            self.outer.read(key, shape, fold)

    def write(self, key: str, shape, fold) -> None:
        self._writes[key] = (shape, fold)
        if self.outer is not None:
            self.outer.write(key, shape, fold)

    def reads(self) -> tuple:
        return tuple((k, s, f) for k, (s, f) in self._reads.items())

    def writes(self) -> tuple:
        return tuple((k, s, f) for k, (s, f) in self._writes.items())


# ---- sections kept while sizes are probed -----------------------------------------------------
#
# composer.sizes plans one model again at hundreds of input sizes. Sizes that give a section the
# same input (a stride-4 stem maps four sizes to one grid) lower it alike: its Section, or the error
# it raised, is taken from the first such size, at the same path, with no renaming. A section that
# owns or shares a tied parameter, or applies a `reuse`, depends on more than its input and is
# lowered afresh.

SECTIONS_KEPT = True
# Where no size gives a section the input of another (a strict patch embedding: every size its own
# grid), keeping sections only costs (about 6% of probing Swin): after this many sections lowered
# with none taken again, the rest of the probing lowers every section.
SECTIONS_TRIED = 128


class _Sections(threading.local):
    memo: dict | None = None  # (id(items), path, input shape) -> [(items, reads, writes, Section or error)]
    signatures: dict | None = None  # id(block items) -> (them, `_signature`): each block is lowered at every size
    lowered = 0  # sections lowered inside `sections_kept`
    taken = 0  # sections taken again


_SECTIONS = _Sections()


@contextlib.contextmanager
def sections_kept():
    """Inside, the top-level sections lowered are kept for later plans of the same models at other
    input sizes (`kept_section`); nested uses share the outermost's."""
    if _SECTIONS.memo is not None or not SECTIONS_KEPT:
        yield
        return
    _SECTIONS.memo, _SECTIONS.signatures, _SECTIONS.lowered, _SECTIONS.taken = {}, {}, 0, 0
    try:
        yield
    finally:
        _SECTIONS.memo = _SECTIONS.signatures = None


def once_per(known: dict | None, obj, make):
    """`make(obj)`, kept in `known` by the identity of `obj` (which the entry keeps alive, so that
    its id is not reused meanwhile); `known` None: made every time."""
    if known is None:
        return make(obj)
    entry = known.get(id(obj))
    if entry is None or entry[0] is not obj:
        entry = known[id(obj)] = (obj, make(obj))
    return entry[1]


def sections_kept_here() -> bool:
    """Whether this thread is inside `sections_kept` (a lowering then goes through `kept_section`)."""
    return _SECTIONS.memo is not None


def sections_taken() -> bool:
    """Whether a section was taken again in this thread's `sections_kept` so far."""
    return _SECTIONS.taken > 0


def kept_section(lowering, items, path: str, x, lower):
    """The stage section `path` of `items` (a block, or a downsample's, norm's or head's items) with
    input shape `x`: `lower()` lowers it, unless inside `sections_kept` the same items were lowered
    at this path and input before, reading the same named tensors (then that Section is returned
    again, or that error raised again, and its saves made again). `lowering` holds the named
    tensors (`saved`, `fold_of`, `tape`) and counts what makes a section depend on more than these
    (`tie_calls`, `reuses`)."""
    state = _SECTIONS
    memo = state.memo
    if memo is None or (not state.taken and state.lowered >= SECTIONS_TRIED):
        return lower()
    key = (id(items), path, x)
    for its, reads, writes, outcome in memo.get(key, ()):
        if its is items and _reads_hold(lowering, reads):
            state.taken += 1
            _replayed(lowering, reads, writes)
            if isinstance(outcome, ComposerError):
                raise outcome.with_traceback(None)
            return outcome
    state.lowered += 1
    if not state.taken and state.lowered == SECTIONS_TRIED:
        memo.clear()  # none taken again: the rest is lowered as outside probing
        return lower()
    tape = lowering.tape = TensorTape(lowering.tape)
    ties, reuses = lowering.tie_calls, len(lowering.reuses)
    outcome = None
    try:
        outcome = lower()
        return outcome
    except ComposerError as exc:
        outcome = exc
        raise
    finally:
        lowering.tape = tape.outer
        if outcome is not None and ties == lowering.tie_calls and reuses == len(lowering.reuses):
            memo.setdefault(key, []).append((items, tape.reads(), tape.writes(), outcome))


def _signature(items):
    """What lowering reads from a block's items, ops and spans by identity (equal blocks share
    them; an op's name comes with it), and the residuals' one drop-path rate; None where a block
    is lowered afresh (tied ops, a reuse, residuals at different rates)."""
    out, rates = [], set()
    try:
        _sig(items, out, rates)
    except _Fresh:
        return None
    if len(rates) > 1:
        return None
    return tuple(out), (rates.pop() if rates else None)


class _Fresh(Exception):
    pass


def _sig(items, out: list, rates: set) -> None:
    """Flat: an op's id, or a marker (0 to 5, never an id) and the node's fields, its children, 0."""
    for it in items:
        cls = it.__class__
        if cls is OpNode:
            if it.op.tied and it.op.ties():  # who owns a tied parameter depends on the blocks before
                raise _Fresh
            out.append(id(it.op))
            out.append(id(it.span))
        elif cls is SubSeq:
            out += (1, it.name, it.call, id(it.span))
            _sig(it.items, out, rates)
            out.append(0)
        elif cls is ResidualNode:
            rates.add(it.drop_path)
            out += (2, id(it.span))
            _sig(it.shortcut, out, rates)
            out.append(3)
            _sig(it.body, out, rates)
            out.append(0)
        elif cls is ParallelNode:
            out += (4, it.merge, None if it.split is None else tuple(it.split), id(it.span))
            for b in it.branches:
                _sig(b, out, rates)
                out.append(3)
            out.append(0)
        elif cls is NamedTensor:  # what it reads from outside the block is checked at a replay
            out += (5, it.action, it.tensor, id(it.span))
        else:  # a reuse lowers another module of the model again
            raise _Fresh




def _renamed(steps: list, path: str, cut: int, drop_path) -> list:
    """Copies of a replayed block's steps under the new block path (`cut`: the old path's length)."""
    out = []
    for s in steps:
        cls = s.__class__
        fields = s.__dict__.copy()  # a field-for-field copy, without the dataclass constructor's cost
        fields["path"] = path + s.path[cut:]
        if cls is ResidualStep:
            fields["body"] = _renamed(s.body, path, cut, drop_path)
            fields["shortcut"] = _renamed(s.shortcut, path, cut, drop_path)
            fields["drop_path"] = drop_path
        elif cls is SeqStep:
            fields["body"] = _renamed(s.body, path, cut, drop_path)
        elif cls is ParallelStep:
            fields["branches"] = [_renamed(b, path, cut, drop_path) for b in s.branches]
        new = cls.__new__(cls)
        new.__dict__ = fields
        out.append(new)
    return out


_FOLD_KINDS: dict = {}  # op class -> its `batch_fold` class attribute (None if it has none)


def fold_kind(op):
    """`getattr(op, "batch_fold", None)` without pydantic's slow path for a missing attribute."""
    cls = op.__class__
    kind = _FOLD_KINDS.get(cls, _ASK)
    if kind is _ASK:
        kind = getattr(cls, "batch_fold", None)
        if "batch_fold" in cls.model_fields or not (kind is None or isinstance(kind, str)):
            return getattr(op, "batch_fold", None)  # a parameter or a property: the instance decides
        _FOLD_KINDS[cls] = kind
    return kind


_ASK = object()


