"""What differs between two resolved architectures, and what it costs (`composer diff A B`, and
`composer.diff(a, b)`).

Both models are resolved and shape-checked (no torch), then each is turned into a plain tree by
`describe(plan)`: nested dicts and lists whose leaves are op calls as text (`linear(out=384)`).
Module names are the keys (`stages[2].blocks[0].token_mixer`, as in the state dict: a residual or
a parallel adds no level), and every sequence also records its `flow`, the wiring of its entries
(`residual(norm1 token_mixer) residual(norm2 mlp)`). `compare` diffs the two trees: dicts by key,
lists by position; a change found in every element of a list is reported once with `[*]`, one
found in some with their indices (`blocks[1,3,5]`, `blocks[6..17]`).

JSON output (`--format json`), a stable structure:

    {"a": SIDE, "b": SIDE, "identical": bool,
     "changes": [{"path": "stages[2].depth", "change": "changed", "a": 6, "b": 18},
                 {"path": "...", "change": "added", "b": "..."},
                 {"path": "...", "change": "removed", "a": "..."}],
     "cost": [{"section": "stem" | "stages[i]" | "head" | "total",
               "params": {"a": int | null, "b": int | null, "delta": int},
               "macs": {"a": int | null, "b": int | null, "delta": int}}]}
    SIDE = {"target": str, "model": str, "file": str, "chain": [model, base, ...],
            "overrides": ["depths = [2, 2, 18, 2]", ...]}

Paths are zero-based: `stages[2]` is the third stage. Parameters and MACs come from the ops' rules.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .analyse import fmt_count, rows
from .expr import Cycle, Ref, Schedule
from .locate import BLUEPRINTS_DIR
from .ops.registry import Op, show_value
from .plan import LoadStep, OpStep, ParallelStep, Plan, ResidualStep, ReuseStep, SaveStep, SeqStep
from .source import SOURCES

# ---- describe: the resolved model as a plain tree ----------------------------------------------


def describe(plan: Plan) -> dict:
    """The resolved architecture as nested dicts and lists of op calls as text."""
    size = plan.input.spatial
    tree = {
        "input": f"{plan.input_kind}({plan.input.channels}, {size[0] if len(set(size)) == 1 else list(size)})",
        "params": {k: _text(v) for k, v in plan.arguments.items()},
        "drop_path": _rates(plan.drop_path),
        "reference": plan.reference,
        "preprocess": {k: _text(list(v) if isinstance(v, tuple) else v) for k, v in plan.preprocess.items()} or None,
        "outputs": _text(plan.outputs) if plan.outputs is not None else None,
        "feature_points": plan.features if plan.features != "stages" else None,
        "stem": _seq(plan.stem.steps),
        "stages": [_stage(st) for st in plan.stages],
        "head": _seq(plan.head.steps),
    }
    return {k: v for k, v in tree.items() if v is not None}


def _stage(st) -> dict:
    out = {"depth": len(st.blocks), "output": str(st.y)}
    if st.downsample is not None:
        out["downsample"] = _seq(st.downsample.steps)
        if st.downsample_last:
            out["downsample_last"] = True
    out["blocks"] = [{"call": b.call, **_seq(b.steps)} for b in st.blocks]
    if st.norm is not None:
        out["norm"] = _seq(st.norm.steps)
    return out


def _seq(steps) -> dict:
    """Named entries of a sequence (residual and parallel bodies flattened in), plus its flow."""
    entries: dict = {}
    entries["flow"] = _flow(steps, entries)
    return entries


def _flow(steps, entries: dict) -> list:
    """The wiring of `steps` as tokens: a name, or [kind, ...] for residual, parallel, save, from, convert."""
    out = []
    for s in steps:
        cls = s.__class__
        if cls is OpStep or cls is SeqStep:
            name = s.name
            while name in entries:  # cannot happen with resolver names; never overwrite silently
                name += "'"
            entries[name] = s.op.describe() if cls is OpStep else {"call": s.call, **_seq(s.body)}
            out.append(name)
        elif cls is ResidualStep:
            out.append(["residual", _flow(s.shortcut, entries), _flow(s.body, entries)])
        elif cls is ParallelStep:
            out.append(["parallel", s.merge] + [_flow(b, entries) for b in s.branches])
        else:  # convert (to_tokens, to_map), save, load, reuse: the kind and what it names
            out.append([{"load": "from"}.get(s.kind, s.kind), _named(s)])
    return out


def flow_text(flow: list, keep: set | None = None) -> str:
    """`residual(norm1 token_mixer) residual(norm2 mlp)`; with `keep`, names outside it are left out."""
    words = []
    for t in flow:
        if isinstance(t, str):
            if keep is None or t in keep:
                words.append(t)
        elif t[0] == "residual":
            short = f"[{flow_text(t[1], keep)}]" if t[1] else ""
            words.append(f"residual{short}({flow_text(t[2], keep)})")
        elif t[0] == "parallel":
            words.append(f"{t[1]}(" + " | ".join(flow_text(b, keep) for b in t[2:]) + ")")
        elif t[0] == "convert":
            words.append(t[1])
        else:
            words.append(f"{t[0]} {t[1]}")
    return " ".join(words)


def _text(v) -> str:
    """A resolved value as the language writes it."""
    if isinstance(v, Op):
        return v.describe()
    if isinstance(v, Ref):  # an op or composite not applied yet, e.g. a model parameter `unit = basic`
        return f"{v.name}(" + ", ".join(f"{k}={_text(x)}" for k, x in v.args) + ")"
    if isinstance(v, Schedule):
        return f"linspace({_num(v.start)}, {_num(v.end)})"
    if isinstance(v, Cycle):
        return "alternate(" + ", ".join(_text(x) for x in v.values) + ")"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_text(x) for x in v) + "]"
    if isinstance(v, float):
        return _num(v)
    return show_value(v)


def _num(x: float) -> str:
    return f"{round(float(x), 6):g}"


def _rates(rates: list) -> str:
    """Per-block drop-path rates as the schedule that gives them (`linspace(0, 0.2)`) where one does."""
    if not rates or all(r == rates[0] for r in rates):
        return _num(rates[0]) if rates else "0"
    n = len(rates)
    if all(abs(r - (rates[0] + (rates[-1] - rates[0]) * k / (n - 1))) < 1e-9 for k, r in enumerate(rates)):
        return f"linspace({_num(rates[0])}, {_num(rates[-1])})"
    return f"{_num(rates[0])} .. {_num(rates[-1])} over {n} blocks"


# ---- compare: a tree diff ---------------------------------------------------------------------


@dataclass
class Change:
    path: tuple  # str keys, and for list levels an int, a tuple of ints, or "*"
    change: str  # changed, added, removed
    a: object = None
    b: object = None

    @property
    def where(self) -> str:
        out = ""
        for p in self.path:
            if isinstance(p, str) and p != "*":
                out += f".{p}" if out else p
            else:
                out += f"[{_indices(p)}]"
        return out

    def as_json(self) -> dict:
        out = {"path": self.where, "change": self.change}
        if self.change != "added":
            out["a"] = self.a
        if self.change != "removed":
            out["b"] = self.b
        return out


def _indices(p) -> str:
    if p == "*" or isinstance(p, int):
        return str(p)
    runs, out = [], []
    for i in p:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    for lo, hi in runs:
        out += [f"{lo}..{hi}"] if hi - lo >= 2 else [str(i) for i in range(lo, hi + 1)]
    return ",".join(out)


def diff_trees(a, b) -> list[Change]:
    """Changes from tree `a` to tree `b`, with paths relative to their roots."""
    if a == b:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in [*a, *(k for k in b if k not in a)]:
            if k == "flow" and k in a and k in b:
                common = set(a) & set(b)
                if flow_text(a[k], common) != flow_text(b[k], common):
                    out.append(Change((k,), "changed", flow_text(a[k]), flow_text(b[k])))
            elif k not in b:
                out.append(Change((k,), "removed", a=summary(a[k])))
            elif k not in a:
                out.append(Change((k,), "added", b=summary(b[k])))
            else:
                out += [Change((k, *c.path), c.change, c.a, c.b) for c in diff_trees(a[k], b[k])]
        return _numbered(out)
    if isinstance(a, list) and isinstance(b, list):
        n = min(len(a), len(b))
        groups: dict = {}  # one entry per distinct relative change, with the indices it occurs at
        for i in range(n):
            for c in diff_trees(a[i], b[i]):
                groups.setdefault(json.dumps([list(map(str, c.path)), c.change, c.a, c.b]), (c, []))[1].append(i)
        out = [Change((_collapse(idx, n), *c.path), c.change, c.a, c.b) for c, idx in groups.values()]
        return out + _extra(a[n:], n, "removed") + _extra(b[n:], n, "added")
    return [Change((), "changed", summary(a), summary(b))]


def _numbered(changes: list[Change]) -> list[Change]:
    """Identical changes of numbered siblings (`norm1`, `norm2`) reported once as `norm{1,2}`."""
    groups: dict = {}
    for c in changes:
        m = re.fullmatch(r"(.*\D)(\d+)", c.path[0])
        key = json.dumps([m.group(1), list(map(str, c.path[1:])), c.change, c.a, c.b]) if m else id(c)
        groups.setdefault(key, (m.group(1) if m else "", c, []))[2].append(int(m.group(2)) if m else None)
    return [c if len(nums) == 1 else Change((f"{stem}{{{_indices(sorted(nums))}}}", *c.path[1:]), c.change, c.a, c.b)
            for stem, c, nums in groups.values()]


def _collapse(indices: list, n: int):
    if len(indices) == n:
        return "*"
    return indices[0] if len(indices) == 1 else tuple(indices)


def _extra(items: list, start: int, change: str) -> list[Change]:
    """Elements only one side has; runs of the same kind are reported together (`blocks[6..17]`)."""
    runs: list = []  # [kind, first index, count]
    for i, item in enumerate(items, start):
        if runs and runs[-1][0] == _short(item):
            runs[-1][2] += 1
        else:
            runs.append([_short(item), i, 1])
    out = []
    for kind, first, count in runs:
        value = summary(items[first - start]) if count == 1 else f"{count} x {kind}"
        where = first if count == 1 else tuple(range(first, first + count))
        out.append(Change((where,), change, *((None, value) if change == "added" else (value, None))))
    return out


def _short(item) -> str:
    """The kind of a list element: a block's call, a stage's summary."""
    if isinstance(item, dict) and "call" in item:
        return item["call"]
    return summary(item)


def summary(v, limit: int = 200) -> object:
    """A subtree as one line: op text as is, a composite as `call{name: op; ...}` (names only when long)."""
    if not isinstance(v, (dict, list)):
        return v
    if isinstance(v, list):
        calls = [_short(x) for x in v]
        runs: list = []
        for c in calls:
            if runs and runs[-1][0] == c:
                runs[-1][1] += 1
            else:
                runs.append([c, 1])
        return "[" + ", ".join(f"{k} x {c}" if k > 1 else str(c) for c, k in runs) + "]"
    if "depth" in v and "blocks" in v:  # a stage
        return f"stage of {v['depth']} blocks {summary(v['blocks'])} -> {v['output']}"
    names = [k for k in v if k not in ("call", "flow")]
    head = v.get("call", "")
    full = head + "{" + "; ".join(f"{k}: {summary(v[k], limit)}" for k in names) + "}"
    return full if len(full) <= limit else head + "{" + ", ".join(names) + "}"


# ---- the comparison of two plans -------------------------------------------------------------


@dataclass
class Side:
    target: str
    model: str
    file: str
    chain: list
    overrides: list

    def as_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Diff:
    a: Side
    b: Side
    changes: list
    cost: list = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.changes

    def as_json(self) -> dict:
        return {"a": self.a.as_json(), "b": self.b.as_json(), "identical": self.identical,
                "changes": [c.as_json() for c in self.changes], "cost": self.cost}


def compare(a: Plan, b: Plan, target_a: str | None = None, target_b: str | None = None) -> Diff:
    """The differences between two planned models (`composer.diff(composer.load(A), composer.load(B))`)."""
    return Diff(_side(a, target_a), _side(b, target_b), diff_trees(describe(a), describe(b)), cost(a, b))


def cost(a: Plan, b: Plan) -> list[dict]:
    """Params and MACs per section (stem, stages[i], head) and in total, of each side, with the delta."""
    ra = {_section(r.name): r for r in rows(a)}
    rb = {_section(r.name): r for r in rows(b)}
    names = [k for k in dict.fromkeys([*ra, *rb]) if k != "head"] + ["head"]  # stages only b has, then the head
    out = [_row(name, ra.get(name), rb.get(name)) for name in names]
    totals = {k: (sum(getattr(r, k) for r in ra.values()), sum(getattr(r, k) for r in rb.values()))
              for k in ("params", "macs")}
    out.append({"section": "total", **{k: {"a": x, "b": y, "delta": y - x} for k, (x, y) in totals.items()}})
    return out


def _section(name: str) -> str:
    return f"stages[{name.split('.')[1]}]" if name.startswith("stages.") else name


def _row(name, x, y) -> dict:
    def entry(k):
        va, vb = getattr(x, k, None), getattr(y, k, None)
        return {"a": va, "b": vb, "delta": (vb or 0) - (va or 0)}

    return {"section": name, "params": entry("params"), "macs": entry("macs")}


def _side(plan: Plan, target: str | None) -> Side:
    overrides = []
    for _, span in plan.overrides:
        src = SOURCES.get(span.file)
        lines = src.text.splitlines()[span.line - 1:span.end_line] if src else []
        if lines:
            lines[-1] = lines[-1][:span.end_column - 1]
            lines[0] = lines[0][span.column - 1:]
        overrides.append(" ".join(" ".join(lines).split()))
    return Side(target or plan.name, plan.name, _display_path(plan.file), list(plan.chain) or [plan.name], overrides)


def _display_path(path: str) -> str:
    p = Path(path)
    for base in (BLUEPRINTS_DIR.parent, Path.cwd()):
        try:
            return p.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return str(path)


# ---- output -------------------------------------------------------------------------------------

COLOURS = {"added": "32", "removed": "31", "changed": "33", "head": "1", "dim": "2"}


def render_text(d: Diff, colour: bool = False) -> str:
    def paint(kind, text):
        return f"\x1b[{COLOURS[kind]}m{text}\x1b[0m" if colour else text

    lines = [paint("head", f"--- a: {_title(d.a)}"), paint("head", f"+++ b: {_title(d.b)}")]
    for label, side in (("a", d.a), ("b", d.b)):
        if side.overrides:
            lines.append(f"{label}: {side.model} overrides {side.chain[-1]}: " + "; ".join(side.overrides))
    if d.identical:
        lines.append("no differences: the resolved architectures are identical")
        return "\n".join(lines)
    lines += ["", paint("head", f"{len(d.changes)} change{'s' * (len(d.changes) != 1)} "
                                "(paths are zero-based: stages[2] is the third stage; [*]: every element)")]
    for c in d.changes:
        if c.change == "changed":
            lines.append(paint("changed", f"~ {c.where}: {c.a} -> {c.b}"))
        elif c.change == "added":
            lines.append(paint("added", f"+ {c.where}: {c.b}"))
        else:
            lines.append(paint("removed", f"- {c.where}: {c.a}"))
    lines += ["", _cost_table(d.cost, paint)]
    return "\n".join(lines)


def _title(side: Side) -> str:
    chain = " : ".join(side.chain)
    return f"{chain}  ({side.file})"


def _cost_table(cost: list, paint=lambda kind, text: text) -> str:
    header = (f"{'section':<10} {'params a':>13} {'params b':>13} {'delta':>13}   "
              f"{'MACs a':>8} {'MACs b':>8} {'delta':>9}")
    out = [paint("head", header), "-" * len(header)]
    for r in cost:
        p, m = r["params"], r["macs"]
        if r["section"] == "total":
            out.append("-" * len(header))
        line = (f"{r['section']:<10} {_num_cell(p['a'], '-'):>13} {_num_cell(p['b'], '-'):>13} "
                f"{_delta(p['delta'], '{:,}'.format):>13}   "
                f"{_macs(m['a']):>8} {_macs(m['b']):>8} {_delta(m['delta'], fmt_count):>9}")
        out.append(paint("changed", line) if p["delta"] or m["delta"] else line)
    return "\n".join(out)


def _num_cell(v, missing: str = "") -> str:
    return missing if v is None else f"{v:,}"


def _delta(v: int, fmt) -> str:
    return "0" if v == 0 else ("+" if v > 0 else "-") + fmt(abs(v))


def _macs(v) -> str:
    return "-" if v is None else fmt_count(v)


def render_markdown(d: Diff) -> str:
    def cell(v):
        return "" if v is None else f"`{v}`".replace("|", "\\|")

    out = [f"**a**: `{' : '.join(d.a.chain)}` ({d.a.file})  ", f"**b**: `{' : '.join(d.b.chain)}` ({d.b.file})", ""]
    for label, side in (("a", d.a), ("b", d.b)):
        if side.overrides:
            out.append(f"{label} overrides {side.chain[-1]}: " + "; ".join(f"`{o}`" for o in side.overrides) + "  ")
    if d.identical:
        out.append("No differences: the resolved architectures are identical.")
        return "\n".join(out) + "\n"
    out += ["", "| path | change | a | b |", "| --- | --- | --- | --- |"]
    out += [f"| `{c.where}` | {c.change} | {cell(c.a)} | {cell(c.b)} |" for c in d.changes]
    out += ["", "| section | params a | params b | delta | MACs a | MACs b | delta |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in d.cost:
        p, m = r["params"], r["macs"]
        out.append(f"| {r['section']} | {_num_cell(p['a'])} | {_num_cell(p['b'])} | {_delta(p['delta'], '{:,}'.format)}"
                   f" | {_macs(m['a'])} | {_macs(m['b'])} | {_delta(m['delta'], fmt_count)} |")
    return "\n".join(out) + "\n"


def _named(step) -> str:
    """What a convert, save, load or reuse step names: the conversion, the tensor, the module."""
    cls = step.__class__
    if cls is SaveStep or cls is LoadStep:
        return step.tensor
    return step.target if cls is ReuseStep else step.name
