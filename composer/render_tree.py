"""The diagram tree of composer graph: nodes, columns, side-by-side lanes, residuals and titled groups,
with the edges (tensor shapes on them) between nodes, built from a plan. Repeated blocks of a stage
collapse into one box unless `expand`; named tensors (`save`/`from`) become edges from where they were
saved, and independent streams after a `from` are drawn side by side. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass, field

from .plan import merge_node
from .render_labels import category, fmt_count, fmt_shape, op_label, runs, summary
from .shapes import Shape

# ---- the diagram tree ------------------------------------------------------------------------


@dataclass
class Node:
    id: str
    label: str
    note: str = ""
    cat: str = "misc"  # colour: an op category, "block", "io" or "merge"
    klass: str = "node"  # node, block (a collapsed run), merge, io
    tip: str = ""  # tooltip: path, params, MACs
    repeat: int = 1
    scope: str = ""  # the innermost group
    steps: str = ""  # the plan steps it stands for: paths (a box covers the steps under its path) or merge names
    x: float = 0
    y: float = 0
    w: float = 0
    h: float = 0


@dataclass
class Column:
    items: list = field(default_factory=list)


@dataclass
class Lanes:
    lanes: list  # Columns side by side
    merge: Node | None = None


@dataclass
class Residual:
    body: Column
    add: Node


@dataclass
class Group:
    id: str
    klass: str  # stem, stage, head, block, mixer, section
    title: str
    subtitle: str
    body: Column


@dataclass
class Edge:
    src: str
    dst: str
    label: str = ""
    kind: str = "flow"  # flow, skip, named


@dataclass
class Diagram:
    title: str
    subtitle: str
    root: Column
    edges: list
    nodes: dict  # id -> Node


# ---- building the diagram from a plan ---------------------------------------------------------

MERGE_SYMBOL = {"add": "+", "mul": "×", "sub": "−", "mean": "mean", "concat": "concat", "tokens": "concat tokens"}


class _Builder:
    def __init__(self, plan, expand: bool, opened=()):
        self.plan, self.expand = plan, expand
        self.open_named = set(opened)  # stages, blocks, parts and composites to draw with their inside
        # ... and every block and composite they are in
        self.opened = {p[:i] for p in self.open_named for i in range(len(p) + 1) if i == len(p) or p[i] == "."}
        self.nodes: dict[str, Node] = {}
        self.edges: list[Edge] = []
        self.cur: str | None = None
        self.shape: Shape | None = None
        self.named: str = ""  # the tensor name of a pending `from`, labels the next edge
        self.saved: dict = {}
        self.in_shape: dict = {}  # node id -> the shape of its first incoming edge
        self.scope: list[str] = []  # ids of the groups being built
        self.count = 0

    def node(self, label, cat="misc", note="", klass="node", tip="", repeat=1, connect=True, steps="") -> Node:
        self.count += 1
        n = Node(f"n{self.count}", label, note, cat, klass, tip, repeat, self.scope[-1] if self.scope else "", steps)
        self.nodes[n.id] = n
        if connect:
            self.link(n.id)
        return n

    def link(self, dst: str) -> None:
        if self.cur is not None:
            label = fmt_shape(self.shape) if self.shape is not None else ""
            src = self.nodes.get(self.cur)
            if not self.named and src is not None and src.klass == "node" and src.scope == self.nodes[dst].scope \
                    and self.in_shape.get(self.cur) == self.shape and self.nodes[dst].klass not in ("io", "block"):
                label = ""  # an op that keeps the shape: the label above it says it already
            self.in_shape.setdefault(dst, self.shape)
            if self.named:
                self.edges.append(Edge(self.cur, dst, f"{self.named}: {label}", "named"))
            else:
                self.edges.append(Edge(self.cur, dst, label))
        self.named = ""

    def go(self, node_id: str, shape: Shape) -> None:
        self.cur, self.shape = node_id, shape

    # a composite drawn as one box: its inputs are what its ops and merges consume of the tensors it
    # receives (the flow, tensors saved outside); what it saves comes from the box, unless it saves
    # a tensor it received unchanged (then from where that came), and so does the flow after it
    def boxed(self, steps, label, cat, note="", klass="node", tip="", repeat=1, y=None, paths="") -> Node:
        inputs, saves = [], []
        final = _trace(steps, "in", {}, inputs, saves)
        before = (self.cur, self.shape)
        n = self.node(label, cat, note, klass, tip, repeat, connect="in" in inputs, steps=paths)
        if "in" not in inputs:
            self.named = ""
        for o in inputs:
            if o != "in" and o[1] in self.saved:
                src, shape = self.saved[o[1]]
                self.edges.append(Edge(src, n.id, f"{o[1]}: {fmt_shape(shape)}", "named"))
        out = y if y is not None else steps[-1].y if steps else self.shape

        def origin(o, shape):
            if o == "box":
                return n.id, shape
            if o == "in":
                return before[0], shape
            return self.saved.get(o[1], (None, shape))

        for name, shape, o in saves:
            self.saved[name] = origin(o, shape)
        self.go(*origin(final, out))
        if final not in ("box", "in"):
            self.named = final[1]  # the flow goes on from a tensor the box loaded: name it
        return n

    def seq(self, steps, depth: int = 0) -> Column:
        """A step list as a column; after a `from`, independent streams are drawn side by side."""
        segments: list[list] = [[]]
        for s in steps:
            if s.kind == "load" and segments[-1]:
                segments.append([])
            segments[-1].append(s)
        if len(segments) == 1:
            return Column(self.items(steps, depth))
        rows: list[list] = [[]]
        row_nodes: set = set()
        for seg in segments:
            n0, e0 = set(self.nodes), len(self.edges)
            items = self.items(seg, depth)
            if not items:
                continue
            made = set(self.nodes) - n0
            deps = {e.src for e in self.edges[e0:] if e.src not in made}
            if deps & row_nodes:
                rows.append([])
                row_nodes = set()
            rows[-1].append(Column(items))
            row_nodes |= made
        out = []
        for row in rows:
            if len(row) == 1:
                out += row[0].items
            elif row:
                out.append(Lanes(row))
        return Column(out)

    def items(self, steps, depth: int) -> list:
        out = []
        for s in steps:
            if s.kind == "convert":
                if not self.named:  # a named tensor's edge says what was saved, not its conversion
                    self.shape = s.y
            elif s.kind == "save":
                self.saved[s.tensor] = (self.cur, s.y)
            elif s.kind == "load":
                self.cur, self.shape = self.saved.get(s.tensor, (None, s.y))
                self.named = s.tensor
            elif s.kind == "op":
                tip = f"{s.path}: {s.op.describe()}\n{fmt_count(s.params)} params, {fmt_count(s.macs)} MACs"
                n = self.node(op_label(s.op, s.x), s.op.category, tip=tip, steps=s.path)
                self.go(n.id, s.y)
                out.append(n)
            elif s.kind == "seq":
                drawable = [b for b in s.body if b.kind not in ("convert", "save", "load")]
                if s.path in self.opened or \
                        self.expand and depth < 2 and (len(drawable) > 1 or drawable and drawable[0].kind != "op"):
                    body = self.grouped(f"g_{s.path}", lambda s=s: self.seq(s.body, depth + 1))
                    name = s.call or s.name
                    title = name if s.name in (name, "") else f"{s.name}: {name}"
                    out.append(Group(f"g_{s.path}", "mixer", title, "", body))
                else:
                    tip = f"{s.path}\n{fmt_count(s.params)} params, {fmt_count(s.macs)} MACs"
                    out.append(self.boxed(s.body, summary(s.call or s.name, s.body), category(s.body), tip=tip,
                                          y=s.y, paths=s.path))
            elif s.kind == "reuse":  # the same module again: its weights are drawn where it is defined
                tip = f"{s.path}: reuse {s.target} (shared weights)\n{fmt_count(s.macs)} MACs"
                n = self.node(f"reuse {s.target}", category(s.reused), tip=tip, steps=merge_node(s, "reuse"))
                self.go(n.id, s.y)
                out.append(n)
            elif s.kind == "residual":
                out.append(self.residual(s, depth))
            elif s.kind == "parallel":
                out.append(self.parallel(s.branches, s.merge, s.y, depth, merge_node(s, s.merge)))
        return out

    def residual(self, s, depth: int):
        start, shape = self.cur, self.shape
        drawable = [t for t in s.shortcut if t.kind != "convert"]
        if drawable:
            return self.parallel([s.shortcut, s.body], "add", s.y, depth, merge_node(s, "add"))
        body = self.seq(s.body, depth)
        add = self.node("+", "merge", klass="merge", tip="residual add", steps=merge_node(s, "add"))
        if start is not None:
            self.edges.append(Edge(start, add.id, "", "skip"))
        self.go(add.id, s.y)
        del shape
        return Residual(body, add)

    def parallel(self, branches, merge: str, y: Shape, depth: int, name: str) -> Lanes:
        start, shape, named = self.cur, self.shape, self.named
        lanes, ends = [], []
        for b in branches:
            self.cur, self.shape, self.named = start, shape, named
            lanes.append(self.seq(b, depth))
            ends.append((self.cur, self.shape, self.named))
        m = self.node(MERGE_SYMBOL.get(merge, merge), "merge", klass="merge", tip=f"merge: {merge}", connect=False,
                      steps=name)
        for cur, sh, nm in ends:
            self.cur, self.shape, self.named = cur, sh, nm
            self.link(m.id)
        self.go(m.id, y)
        return Lanes(lanes, m)

    # sections of the model

    def grouped(self, gid: str, make):
        self.scope.append(gid)
        try:
            return make()
        finally:
            self.scope.pop()

    def section(self, sec, title: str, klass: str, gid: str) -> Group:
        body = self.grouped(gid, lambda: self.seq(sec.steps))
        sub = f"{fmt_count(sec.params)} params · {fmt_count(sec.macs)} MACs" if sec.params or sec.macs else ""
        return Group(gid, klass, title, sub, body)

    def part(self, sec, name: str) -> list:
        """A stage's downsample or norm: drawn as its ops when short, else as one box."""
        drawable = [s for s in sec.steps if s.kind not in ("convert", "save", "load")]
        if self.expand or len(drawable) <= 1 or sec.path in self.opened:
            return self.seq(sec.steps).items
        tip = f"{sec.path}\n{fmt_count(sec.params)} params, {fmt_count(sec.macs)} MACs"
        return [self.boxed(sec.steps, summary(name, sec.steps), category(sec.steps), tip=tip, y=sec.y, paths=sec.path)]

    def stage(self, st) -> Group:
        return self.grouped(f"g_stages.{st.index}", lambda: self._stage(st))

    def _stage(self, st) -> Group:
        items = []
        if st.downsample is not None and not st.downsample_last:
            items += self.part(st.downsample, "downsample")
        whole = self.expand or f"stages.{st.index}" in self.open_named
        todo: list = []  # blocks drawn collapsed, in runs
        for k, b in enumerate(st.blocks):
            if whole or b.path in self.opened:
                items += self.collapsed(todo)
                todo = []
                sub = f"drop path {b.drop_path:.3f}" if b.drop_path else ""
                body = self.grouped(f"g_{b.path}", lambda b=b: self.seq(b.steps))
                items.append(Group(f"g_{b.path}", "block", f"block {k}: {b.call}", sub, body))
            else:
                todo.append(b)
        items += self.collapsed(todo)
        if st.downsample is not None and st.downsample_last:
            items += self.part(st.downsample, "downsample")
        if st.norm is not None:
            items += self.part(st.norm, "norm")
        secs = [s for s in (st.downsample, *st.blocks, st.norm) if s is not None]
        params, macs = sum(s.params for s in secs), sum(s.macs for s in secs)
        n = len(st.blocks)
        sub = (f"{n} block{'s' if n != 1 else ''} · out {fmt_shape(st.y)}\n{fmt_count(params)} params · "
               f"{fmt_count(macs)} MACs")
        return Group(f"g_stages.{st.index}", "stage", f"stages.{st.index}", sub, Column(items))

    def collapsed(self, blocks) -> list:
        """Blocks as boxes, a run of one structure as one box (`6 x metaformer(...)`)."""
        items = []
        for group, note in runs(blocks):
            b = group[0]
            label = summary(b.call, b.steps)
            if len(group) > 1:
                label = f"{len(group)} x {label}"
            params = sum(g.params for g in group)
            macs = sum(g.macs for g in group)
            tip = (f"{b.path}" + (f" .. {group[-1].path}" if len(group) > 1 else "")
                   + f"\n{fmt_count(params)} params, {fmt_count(macs)} MACs")
            rates = [g.drop_path for g in group]
            if max(rates) > 0:
                tip += f"\ndrop path {min(rates):.3f} .. {max(rates):.3f}"
            items.append(self.boxed(b.steps, label, category(b.steps), note, "block", tip, len(group),
                                    y=group[-1].y, paths=" ".join(g.path for g in group)))
        return items

    def build(self) -> Diagram:
        p = self.plan
        inp = self.node("input", "io", fmt_shape(p.input), klass="io", tip=f"{p.input_kind} input", steps="input")
        self.go(inp.id, p.input)
        self.saved["input"] = (inp.id, p.input)
        items = [inp, self.section(p.stem, "stem", "stem", "g_stem")]
        items += [self.stage(st) for st in p.stages]
        items.append(self.section(p.head, "head", "head", "g_head"))
        items = [it for it in items if not isinstance(it, Group) or it.body.items]  # an empty stem or head
        items.append(self.node("output", "io", fmt_shape(p.head.y), klass="io", steps="output"))
        sub = f"{fmt_count(p.params)} params · {fmt_count(p.macs)} MACs · input {fmt_shape(p.input)}"
        if p.reference:
            sub += f" · {p.reference}"
        return Diagram(p.name, sub, Column(items), self.edges, self.nodes)


def _trace(steps, origin, local: dict, inputs: list, saves: list):
    """Where the flowing tensor comes from after a boxed step list: "in" (the tensor the box
    received), "box" (made inside it) or ("load", name) (an outside tensor, unchanged). Collects the
    box's inputs (the origins its ops and merges consume) and every save with the origin of what it
    saves."""
    def use(o):
        if o != "box" and o not in inputs:
            inputs.append(o)

    for s in steps:
        if s.kind == "save":
            local[s.tensor] = origin
            saves.append((s.tensor, s.y, origin))
        elif s.kind == "load":
            origin = local.get(s.tensor, ("load", s.tensor))
        elif s.kind == "seq":
            origin = _trace(s.body, origin, local, inputs, saves)
        elif s.kind in ("residual", "parallel"):
            for sub in s.children():
                use(_trace(sub, origin, local, inputs, saves))
            origin = "box"
        elif s.kind != "convert":  # an op or a reuse (the reused steps' saves count)
            use(origin)
            if s.kind == "reuse":
                _trace(s.reused, origin, local, [], saves)
            origin = "box"
    return origin


def diagram(plan, expand: bool = False, opened=()) -> Diagram:
    """The diagram tree of `plan`: repeated blocks collapsed unless `expand`; `opened` names
    stages, blocks, stage parts and composites (plan paths) drawn with their inside."""
    return _Builder(plan, expand, opened).build()


def openable(plan) -> dict[str, str]:
    """The names `diagram(opened=...)` takes, each with the openable name it is in ("" for none):
    stages, their blocks, downsample and norm, and every composite instance (by its plan path)."""
    out: dict[str, str] = {}

    def seqs(steps, parent: str) -> None:
        for s in steps:
            inner = parent
            if s.kind == "seq" and s.path not in out:
                out[s.path] = parent
                inner = s.path
            for sub in s.children():
                seqs(sub, inner)

    seqs(plan.stem.steps, "")
    for st in plan.stages:
        name = f"stages.{st.index}"
        out[name] = ""
        for sec in (st.downsample, *st.blocks, st.norm):
            if sec is not None:
                out.setdefault(sec.path, name)
                seqs(sec.steps, sec.path)
    seqs(plan.head.steps, "")
    return out
