"""Input sizes: which sizes a model built at one size runs at, derived from its plan (no torch).

A model is planned (shape-checked) at the size it is built for. At another input size the same
resolved model is planned again (`replan`); the size is admitted when that plan is valid and no op
whose module is tied to the grid it was built for (`Op.runtime_grid`, a table or buffer sized by
the grid, a parameter count that depends on it) would see another grid. `rule_text` probes sizes along
each spatial axis and states the admitted ones in words ("multiples of 32 from 32", "fixed at
224"), so the admissible sizes are never written by hand per model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass

from .diagnostics import ComposerError
from .lower import plan as lower_plan
from .plan import OpStep, Plan, Section
from .resolved import OpNode, ParallelNode, ResidualNode, SubSeq
from .speed import blocks_forgotten, once_per, sections_kept, sections_taken


class InputSizeError(ValueError):
    """A built model refuses an input size its architecture does not allow (raised at its entry)."""


def replan(plan: Plan, spatial: tuple, channels: int | None = None, dynamic: bool = False) -> Plan:
    """`plan`'s resolved model planned again for an input grid `spatial` (raises ComposerError).
    `dynamic`: every op in the form it runs in under dynamic_img_size (`Op.dynamic_form`: window
    attention pads, as timm's Swin with `strict_img_size=False` does)."""
    model = plan.source
    inp = model.input
    if dynamic:
        model = _dynamic_of(model)
    model = dataclasses.replace(model, input=type(inp)(inp.kind, channels or inp.channels, tuple(spatial), inp.span))
    return lower_plan(model, counted=False)


class _Probing(threading.local):
    """What `probing` keeps while sizes are probed (hundreds of replans of one model)."""

    dynamic: dict | None = None  # id(resolved model) -> (it, its dynamic form)
    answers: dict | None = None  # (id(plan), spatial, dynamic) -> (plan, `admits`'s answer)
    # (id(built section), id(section at another size), dynamic) -> (both, `_section_admits`'s answer)
    verdicts: dict | None = None
    steps: dict | None = None  # id(built plan or section) -> (it, its op steps): compared at every size


_PROBING = _Probing()


@contextlib.contextmanager
def probing():
    """Inside, each resolved model's dynamic form is made once, each `admits` question answered
    once (a refused size asks the dynamic question too, which the dynamic rules ask again), and
    a section that gets the input it got at an earlier size is not lowered again. Nested
    uses share the outermost's; the plans probed must not change meanwhile."""
    if _PROBING.answers is not None:
        yield
        return
    _PROBING.dynamic, _PROBING.answers, _PROBING.verdicts, _PROBING.steps = {}, {}, {}, {}
    try:
        with blocks_forgotten(), sections_kept():
            yield
    finally:
        _PROBING.dynamic = _PROBING.answers = _PROBING.verdicts = _PROBING.steps = None


def _dynamic_of(model):
    """`_dynamic(model)`, made once per model while `axis_rules` probes sizes (hundreds of replans)."""
    return once_per(_PROBING.dynamic, model, _dynamic)


def _dynamic(model):
    """The resolved model with every op in the form it runs in under dynamic_img_size
    (`Op.dynamic_form`). An op shared by several blocks stays shared (its form is made once), so
    that equal blocks are still lowered once (speed.lowered_block)."""
    forms: dict = {}  # id(op) -> (op, its dynamic form)

    def form(op):
        known = forms.get(id(op))
        if known is None:
            known = forms[id(op)] = (op, op.dynamic_form())
        return known[1]

    def items(xs):
        return [item(x) for x in xs] if xs is not None else None

    def item(x):
        cls = x.__class__
        if cls is OpNode:
            return OpNode(x.name, form(x.op), x.span)
        if cls is SubSeq:
            return dataclasses.replace(x, items=items(x.items))
        if cls is ResidualNode:
            return dataclasses.replace(x, body=items(x.body), shortcut=items(x.shortcut))
        if cls is ParallelNode:
            return dataclasses.replace(x, branches=[items(b) for b in x.branches])
        return x  # named tensors, reuse

    stages = [dataclasses.replace(st, downsample=items(st.downsample), norm=items(st.norm),
                                  blocks=[dataclasses.replace(b, items=items(b.items)) for b in st.blocks])
              for st in model.stages]
    return dataclasses.replace(model, stem=items(model.stem), stages=stages, head=items(model.head))


def admits(plan: Plan, spatial: tuple, dynamic: bool = False) -> str | None:
    """None when a model built from `plan` runs at input grid `spatial`; else the reason, in words.
    `dynamic`: absolute position embeddings are resampled to the grid they get (timm's
    `dynamic_img_size`)."""
    spatial = tuple(spatial)
    answers = _PROBING.answers
    if answers is None:
        return _admits(plan, spatial, dynamic)
    key = (id(plan), spatial, dynamic)
    known = answers.get(key)
    if known is None or known[0] is not plan:
        known = answers[key] = (plan, _admits(plan, spatial, dynamic))
    return known[1]


def _admits(plan: Plan, spatial: tuple, dynamic: bool) -> str | None:
    if spatial == tuple(plan.input.spatial):
        return None
    if len(spatial) != len(plan.input.spatial) or any(g <= 0 for g in spatial):
        return f"the input must have {len(plan.input.spatial)} positive spatial sizes"
    try:
        other = replan(plan, spatial, dynamic=dynamic)
    except ComposerError as exc:
        d = exc.diagnostics[0]
        where = next((n for n in d.notes if n.startswith("at ")), "")
        why = d.message + (f" ({where})" if where else "")
        if not dynamic and admits(plan, spatial, dynamic=True) is None:
            why += " (build it with dynamic_img_size=True to pad its windows and resample its position embeddings)"
        return why
    if _PROBING.verdicts is None or not sections_taken():
        return _compare(_built_steps(plan), _walk_ops(other), dynamic)
    for built, got in zip(plan.sections, other.sections):  # sections taken again are answered once
        why = _section_admits(built, got, dynamic)
        if why is not None:
            return why
    return None


def _section_admits(built: Section, got: Section, dynamic: bool) -> str | None:
    """`_compare` for one section of the built plan and the same section planned at another
    input size, answered once per pair while probing: a section taken again from an earlier size
    (`speed.kept_section`) is the same object."""
    known = _PROBING.verdicts
    key = (id(built), id(got), dynamic)
    entry = known.get(key)
    if entry is None or entry[0] is not built or entry[1] is not got:
        entry = known[key] = (built, got, _compare(_built_steps(built), _walk_ops(got), dynamic))
    return entry[2]


def _built_steps(built) -> list:
    """The op steps of the built plan or of one of its sections, listed once while probing."""
    return once_per(_PROBING.steps, built, lambda b: list(_walk_ops(b)))


def _compare(built_steps, got_steps, dynamic: bool) -> str | None:
    """None when each op step of `built_steps` (a plan or section as built) runs on what its
    counterpart of `got_steps` (the same, planned at another input size) gives it; else why not."""
    for a, b in zip(built_steps, got_steps):
        if a.x == b.x:
            continue
        if a.op.takes_tensors():  # bound to the named tensors of each size: compare the two steps
            same = a.op.runtime_grid(a.x) and a.op.params(a.x, a.y) == b.op.params(b.x, b.y)
            why = None if same else f"is built for input {a.x} and would get {b.x}"
        else:
            why = a.op.admits_grid(a.x, b.x, dynamic, (a.y, b.y))
        if why is not None:
            return f"{a.path} ({a.op.name}) {why}"
        new_grid = a.y.layout == "tokens" and a.y.spatial and a.y.spatial != a.x.spatial
        if new_grid and a.y.spatial != b.y.spatial and not a.op.regrids:  # the builder's StaticGrid
            return f"{a.path} ({a.op.name}) puts tokens on a grid of its own that cannot follow the input size"
    return None


def _walk_ops(what):
    """The op steps of a plan or a section, in order."""
    for sec in (what.sections if isinstance(what, Plan) else (what,)):
        for step in sec.steps:
            for s in step.walk():
                if s.__class__ is OpStep:
                    yield s


@dataclass(frozen=True)
class AxisRule:
    """The sizes admitted along one spatial axis (the others at the build size), up to `limit`:
    `fixed` (only the build size); every size from `low` that is `low` plus a multiple of `step`
    (to `high`, when the sizes stop before the probed limit); else `irregular`: every admitted
    size up to the limit, or with `period` those of its first period."""

    build: int
    fixed: bool
    low: int = 0
    step: int = 1
    limit: int = 0
    irregular: tuple = ()
    high: int = 0
    period: int = 0  # with `irregular`: the admitted sizes repeat every `period` (0: no pattern found)

    def text(self) -> str:
        if self.fixed:
            return f"fixed at {self.build}"
        if self.irregular and self.period:
            return f"{_runs_text(self.irregular)} plus multiples of {self.period}"
        if self.irregular:
            return f"only {_runs_text(self.irregular)} (up to {self.limit})"
        if self.high:
            return f"{self.low} to {self.high}" if self.step == 1 else \
                f"{self.low} to {self.high} in steps of {self.step}"
        if self.step == 1:
            return f"any size from {self.low}"
        if self.low % self.step == 0:
            return f"multiples of {self.step} from {self.low}"
        return f"{self.low} plus multiples of {self.step}"


def _probe(plan: Plan, axis: int, dynamic: bool, sizes, known: frozenset = frozenset()) -> list[int]:
    """The sizes of `sizes` admitted along `axis` (the other axes at the build size); `known`:
    sizes already known to be admitted (dynamic_img_size only admits more)."""
    base = list(plan.input.spatial)
    return [n for n in sizes if n in known or admits(plan, tuple(base[:axis] + [n] + base[axis + 1:]), dynamic) is None]


def _admitted(plan: Plan, axis: int, dynamic: bool, limit: int, known: frozenset, like: list | None) -> list[int]:
    """Every admitted size 1..limit along `axis`. `like`: the sizes admitted along another axis of
    the same build size, checked on a sample around each change instead of probed one by one
    (probed in full when the sample disagrees)."""
    every = range(1, limit + 1)
    if like is not None:
        marks = {n for k in like for n in (k - 1, k, k + 1)} | set(range(1, 9)) | {limit}
        sample = sorted(n for n in marks if 1 <= n <= limit)
        if _probe(plan, axis, dynamic, sample, known) == [n for n in sample if n in set(like)]:
            return list(like)
    return _probe(plan, axis, dynamic, every, known)


PROBE_LIMIT = 1024  # the sizes probed per axis: 1 .. min(2 x the build size, this), the pattern extrapolated


def _limit(build: int) -> int:
    return min(max(2 * build, 64), PROBE_LIMIT)


def _rule(build: int, ok: list[int], limit: int) -> AxisRule:
    if ok == [build] or not ok:  # (a build size beyond the probed range is admitted by construction)
        return AxisRule(build, True, build, 1, limit)
    low = ok[0]
    steps = {b - a for a, b in zip(ok, ok[1:])}
    if len(steps) <= 1:
        step = steps.pop() if steps else 1
        if ok[-1] + step > limit:  # the pattern reaches the probed limit
            return AxisRule(build, False, low, step, limit)
        return AxisRule(build, False, low, step, limit, high=ok[-1])  # sizes that give the same grids
    period = _period(ok, limit)
    if period:  # sizes in a window that repeats (patch sizes that must divide every stage's grid)
        return AxisRule(build, False, low, 1, limit, tuple(s for s in ok if s < low + period), period=period)
    return AxisRule(build, False, low, 1, limit, tuple(ok))


def runs(sizes) -> list[tuple[int, int]]:
    """The sorted `sizes` as runs of consecutive sizes: [(first, last), ...]."""
    out: list[list[int]] = []
    for k in sizes:
        if out and out[-1][1] == k - 1:
            out[-1][1] = k
        else:
            out.append([k, k])
    return [(a, b) for a, b in out]


def _runs_text(sizes, most: int = 8) -> str:
    """"57 to 64, 121 to 128": a run of three or more as its ends, the first `most` runs."""
    parts = [f"{a} to {b}" if b - a >= 2 else ", ".join(map(str, range(a, b + 1))) for a, b in runs(sizes)]
    return ", ".join(parts[:most]) + (", ..." if len(parts) > most else "")


def _period(ok: list[int], limit: int) -> int:
    """The smallest period P (seen at least twice within the probed sizes) such that the admitted
    sizes are exactly those from ok[0] to `limit` whose offset from ok[0] modulo P is one of the
    first window's; 0 when there is none."""
    low, admitted = ok[0], set(ok)
    for period in range(2, (limit - low) // 2 + 1):
        window = {s - low for s in ok if s < low + period}
        if len(window) <= 8 and all((s in admitted) == ((s - low) % period in window) for s in range(low, limit + 1)):
            return period
    return 0


def axis_rules(plan: Plan, dynamic: bool = False, known: dict | None = None) -> list[AxisRule]:
    """The admitted sizes of every spatial axis, probing every size 1..limit (twice the build size,
    at least 64, at most PROBE_LIMIT); `known`: axis -> sizes already known to be admitted."""
    known = {} if known is None else known
    out, seen = [], {}
    with probing():
        for axis, build in enumerate(plan.input.spatial):
            limit = _limit(build)
            ok = _admitted(plan, axis, dynamic, limit, frozenset(known.get(axis, ())), seen.get(build))
            known[axis], seen[build] = ok, ok
            out.append(_rule(build, ok, limit))
    return out


def axis_rule(plan: Plan, axis: int, dynamic: bool = False, limit: int | None = None) -> AxisRule:
    """The admitted sizes along one axis (the others at the build size), probed up to `limit`."""
    limit = limit or _limit(plan.input.spatial[axis])
    return _rule(plan.input.spatial[axis], _probe(plan, axis, dynamic, range(1, limit + 1)), limit)


def rule_text(plan: Plan, dynamic: bool = False, rules: list | None = None) -> str:
    """The admitted input sizes in words, e.g. "H and W: multiples of 32 from 32"."""
    nd = len(plan.input.spatial)
    if not nd:
        return "no spatial size"
    rules = rules if rules is not None else axis_rules(plan, dynamic)
    names = {1: ["length"], 2: ["H", "W"], 3: ["D", "H", "W"]}.get(nd, [f"axis {a}" for a in range(nd)])
    texts = [r.text() for r in rules]
    if len(set(texts)) == 1:
        who = names[0] if nd == 1 else " and ".join([", ".join(names[:-1]), names[-1]])
        return f"{who}: {texts[0]}"
    return "; ".join(f"{n}: {t}" for n, t in zip(names, texts))


def rule_texts(plan: Plan) -> tuple[str, str]:
    """(the admitted sizes, those admitted with dynamic_img_size), probing each size once where
    the first answer already settles the second."""
    known: dict = {}
    with probing():
        plain = rule_text(plan, rules=axis_rules(plan, False, known))
        return plain, rule_text(plan, rules=axis_rules(plan, True, known))


def check_input(plan: Plan, spatial: tuple, channels: int, dynamic: bool = False) -> None:
    """Raise InputSizeError naming the model, the size it got and the sizes it admits."""
    if channels != plan.input.channels:
        raise InputSizeError(f"{plan.name} takes {plan.input.channels} input channels, got {channels}")
    why = admits(plan, spatial, dynamic)
    if why is not None:
        got = "x".join(map(str, spatial))
        built = "x".join(map(str, plan.input.spatial))
        raise InputSizeError(f"{plan.name} (built for {built}) cannot run at {got}: {why}. "
                             f"Admitted sizes: {rule_text(plan, dynamic)}")
