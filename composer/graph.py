"""Lower a resolved model to a program of steps, infer every shape, and record it as a networkx graph.

Layouts (map, tokens, vector) are tracked per step; where an op needs another layout a conversion
step is inserted, before a residual when its body needs it so the shortcut follows along.
"""

from __future__ import annotations

from dataclasses import dataclass, field


from .diagnostics import ComposerError, Diagnostic
from .ops import OPS
from .diagnostics import did_you_mean, error
from .resolve import Model, NamedTensor, OpNode, ParallelNode, ResidualNode, SubSeq
from .shapes import Shape, ShapeError
from .source import Span


@dataclass
class Step:
    kind: str  # op, seq, convert, residual, parallel
    path: str
    x: Shape
    y: Shape
    span: Span | None = None
    name: str = ""
    op: object = None
    body: list = field(default_factory=list)
    shortcut: list = field(default_factory=list)
    branches: list = field(default_factory=list)
    merge: str = ""
    split: list | None = None
    drop_path: float = 0.0
    call: str = ""
    batch: int = 1  # sequences per image inside patches_to_batch ... batch_to_patches: multiplies the MACs

    def walk(self):
        yield self
        for child in [*self.shortcut, *self.body, *(s for b in self.branches for s in b)]:
            yield from child.walk()

    @property
    def params(self) -> int:
        return sum(s.op.params(s.x, s.y) for s in self.walk() if s.kind == "op")

    @property
    def macs(self) -> int:
        return sum(s.op.macs(s.x, s.y) * s.batch for s in self.walk() if s.kind == "op")


@dataclass
class Section:
    """stem, a stage's downsample or block, or head: the unit the builder makes one module of."""

    path: str
    steps: list
    x: Shape
    y: Shape
    drop_path: float = 0.0
    call: str = ""

    @property
    def params(self) -> int:
        return sum(s.params for s in self.steps)

    @property
    def macs(self) -> int:
        return sum(s.macs for s in self.steps)


@dataclass
class StagePlan:
    index: int
    downsample: Section | None
    downsample_last: bool
    blocks: list
    x: Shape
    y: Shape
    norm: Section | None = None


@dataclass
class Plan:
    model: Model
    input: Shape
    stem: Section
    stages: list
    head: Section
    record: "GraphRecord"
    saved: dict = field(default_factory=dict)  # tensor name -> (Shape, path) of every `save`

    @property
    def graph(self):
        """The networkx DiGraph of op and merge nodes, with shapes on the nodes (made on first use)."""
        return self.record.to_networkx()

    @property
    def sections(self):
        yield self.stem
        for st in self.stages:
            if st.downsample is not None and not st.downsample_last:
                yield st.downsample
            yield from st.blocks
            if st.downsample is not None and st.downsample_last:
                yield st.downsample
            if st.norm is not None:
                yield st.norm
        yield self.head

    @property
    def params(self) -> int:
        return sum(s.params for s in self.sections)

    @property
    def macs(self) -> int:
        return sum(s.macs for s in self.sections)


def plan(model: Model) -> Plan:
    """Infer shapes for `model` and lower it to build steps; raise a located error on a mismatch."""
    return _Lowering(model).run()


class GraphRecord:
    """Nodes and edges as lowering finds them; networkx (slow to import) is loaded only when a
    consumer asks for the graph, so `composer check` stays fast."""

    def __init__(self):
        self.nodes: list = []
        self.edges: list = []

    def add_node(self, name, **attrs):
        self.nodes.append((name, attrs))

    def add_edge(self, a, b):
        self.edges.append((a, b))

    def to_networkx(self):
        import networkx as nx

        g = nx.DiGraph()
        g.add_nodes_from(self.nodes)
        g.add_edges_from(self.edges)
        return g


class _Lowering:
    def __init__(self, model: Model):
        self.model = model
        self.graph = GraphRecord()
        self.last = "input"
        self.saved: dict = {}
        self.folds: list = []  # open patches_to_batch ops: (op, span, batch factor), innermost last

    def run(self) -> Plan:
        inp = self.model.input
        x = Shape(inp.channels, tuple(inp.size), "map")
        self.graph.add_node("input", kind="input", shape=x)
        self.saved["input"] = (x, "input")
        stem = self._section("stem", self.model.stem, x)
        x = stem.y
        stages = []
        for st in self.model.stages:
            x0 = x
            down = None
            blocks = []
            if st.downsample is not None and not st.downsample_last:
                down = self._section(f"stages.{st.index}.downsample", st.downsample, x)
                x = down.y
            for k, b in enumerate(st.blocks):
                sec = self._section(f"stages.{st.index}.blocks.{k}", b.items, x, b.drop_path, b.call)
                blocks.append(sec)
                x = sec.y
            if st.downsample is not None and st.downsample_last:
                down = self._section(f"stages.{st.index}.downsample", st.downsample, x)
                x = down.y
            norm = None
            if st.norm is not None:
                norm = self._section(f"stages.{st.index}.norm", st.norm, x)
                x = norm.y
            stages.append(StagePlan(st.index, down, st.downsample_last, blocks, x0, x, norm))
        head = self._section("head", self.model.head, x)
        for name in self.model.outputs or []:
            if name not in self.saved:
                raise error("unknown-tensor", f"output '{name}' is never saved", None,
                            did_you_mean(name, self.saved) or "name a tensor with `save NAME` in a block")
        return Plan(self.model, Shape(inp.channels, tuple(inp.size), "map"), stem, stages, head, self.graph,
                    dict(self.saved))

    def _section(self, path, items, x, drop_path=0.0, call="") -> Section:
        steps, y = self._seq(path, items, x)
        self._folds_closed(path, 0)
        return Section(path, steps, x, y, drop_path, call)

    def _folds_closed(self, path, depth: int) -> None:
        """A patches_to_batch opened in a section, residual body or parallel branch closes there."""
        if len(self.folds) > depth:
            op, span, _ = self.folds[-1]
            raise _shape_error(path, span, ShapeError(
                f"{op.name}({op.size}) is not closed by batch_to_patches({op.size}) in the same body",
                "unfold and fold back within one block (and within one residual or parallel branch)"))

    def _batch(self) -> int:
        n = 1
        for _, _, factor in self.folds:
            n *= factor
        return n

    def _fold(self, path, item, x: Shape) -> None:
        """Track patches_to_batch (opens: the batch grows by size^d) and batch_to_patches (closes it)."""
        kind = getattr(item.op, "batch_fold", None)
        if kind == "open":
            self.folds.append((item.op, item.span, item.op.size ** x.ndim))
        elif kind == "close":
            if not self.folds or self.folds[-1][0].size != item.op.size:
                raise _shape_error(path, item.span, ShapeError(
                    f"{item.op.name}({item.op.size}) has no matching patches_to_batch({item.op.size}) before it",
                    "fold back what patches_to_batch unfolded earlier in the same block, with the same size"))
            self.folds.pop()

    def _seq(self, path: str, items: list, x: Shape) -> tuple[list, Shape]:
        steps = []
        for item in items:
            new, x = self._item(path, item, x)
            steps += new
        return steps, x

    def _convert(self, path: str, x: Shape, need: str, span) -> tuple[list, Shape]:
        if need in ("any", x.layout):
            return [], x
        if need == "vector" or x.layout == "vector":
            raise _shape_error(path, span, ShapeError(
                f"this op needs a {need} but gets a {x.layout} {x}",
                "pool to a vector with global_pool(...) before the classifier" if need == "vector"
                else "a pooled vector cannot go back to a map or tokens"))
        conv = "to_tokens" if need == "tokens" else "to_map"
        op = OPS[conv]()
        try:
            y = op.infer(x)
        except ShapeError as exc:
            raise _shape_error(path, span, exc) from None
        return [Step("convert", path, x, y, span, name=conv, op=op)], y

    def _item(self, path: str, item, x: Shape) -> tuple[list, Shape]:
        if isinstance(item, OpNode):
            pre, x = self._convert(f"{path}.{item.name}", x, item.op.layout, item.span)
            try:
                y = item.op.infer(x)
            except ShapeError as exc:
                raise _shape_error(f"{path}.{item.name}", item.span, exc, x) from None
            node = f"{path}.{item.name}"
            self.graph.add_node(node, kind="op", op=item.op.name, x=x, y=y)
            self.graph.add_edge(self.last, node)
            self.last = node
            batch = self._batch()
            self._fold(node, item, x)
            return pre + [Step("op", node, x, y, item.span, item.name, item.op, batch=batch)], y
        if isinstance(item, SubSeq):
            steps, y = self._seq(f"{path}.{item.name}", item.items, x)
            return [Step("seq", f"{path}.{item.name}", x, y, item.span, item.name, body=steps, call=item.call)], y
        if isinstance(item, ResidualNode):
            pre, x = self._convert(path, x, _first_need(item.body), item.span)
            start = self.last
            short, xs = self._seq(path, item.shortcut, x)
            short_end = self.last
            self.last = start
            depth = len(self.folds)
            body, y = self._seq(path, item.body, x)
            self._folds_closed(path, depth)
            if y.layout != xs.layout:
                back, y = self._convert(path, y, xs.layout, item.span)
                body += back
            if y != xs:
                raise _shape_error(path, item.span, ShapeError(
                    f"residual: the body gives {y} but the shortcut carries {xs}",
                    "a residual's body must keep the shape; use residual(shortcut = ...) to project the shortcut"))
            node = f"{path}.add@{item.span.line}:{item.span.column}"
            self.graph.add_node(node, kind="merge", merge="add", y=y)
            self.graph.add_edge(self.last, node)
            self.graph.add_edge(short_end, node)
            self.last = node
            return pre + [Step("residual", path, x, y, item.span, body=body, shortcut=short,
                               drop_path=item.drop_path)], y
        if isinstance(item, ParallelNode):
            return self._parallel(path, item, x)
        if isinstance(item, NamedTensor):
            if self.folds:
                raise error("shape", f"`{'save' if item.action == 'save' else 'from'} {item.tensor}` between "
                            "patches_to_batch and batch_to_patches: the batch is multiplied there", item.span,
                            "save or load named tensors outside the unfolded part")
            if item.action == "save":
                self.saved[item.tensor] = (x, self.last)
                return [Step("save", path, x, x, item.span, name=item.tensor)], x
            if item.tensor not in self.saved:
                raise error("unknown-tensor", f"no tensor named '{item.tensor}' is saved before this point", item.span,
                            did_you_mean(item.tensor, self.saved) or "name a tensor with `save NAME` first")
            y, node = self.saved[item.tensor]
            self.last = node
            return [Step("load", path, x, y, item.span, name=item.tensor)], y
        raise AssertionError(f"unknown item {item!r}")

    def _parallel(self, path, item: ParallelNode, x: Shape):
        if item.split is not None and sum(item.split) != x.channels:
            raise _shape_error(path, item.span, ShapeError(
                f"split {item.split} adds up to {sum(item.split)}, but the input has {x.channels} channels"))
        start, ends, branches, outs = self.last, [], [], []
        for i, b in enumerate(item.branches):
            self.last = start
            xb = x.with_(channels=item.split[i]) if item.split else x
            depth = len(self.folds)
            steps, y = self._seq(path, b, xb)
            self._folds_closed(path, depth)
            branches.append(steps)
            outs.append(y)
            ends.append(self.last)
        if item.merge == "tokens":
            return self._merge_tokens(path, item, x, start, ends, branches, outs)
        first = outs[0]
        for i, y in enumerate(outs[1:], 1):
            if y.layout != first.layout:
                back, outs[i] = self._convert(path, y, first.layout, item.span)
                branches[i] += back
        if item.merge == "mul":  # a pooled gate (C, 1x1) broadcasts over a map (squeeze-excite style)
            full = next((o for o in outs if not _is_gate(o)), first)
            outs = [full if _is_gate(o) and o.channels == full.channels and o.ndim == full.ndim
                    and o.layout == full.layout == "map" else o for o in outs]
            first = outs[0]
        for i, y in enumerate(outs[1:], 1):
            same = (y.spatial, y.extra) == (first.spatial, first.extra) if item.merge == "concat" else y == first
            if not same:
                raise _shape_error(path, item.span, ShapeError(
                    f"parallel {item.merge}: branch 1 gives {first} but branch {i + 1} gives {y}",
                    "concat needs the same grid in every branch" if item.merge == "concat"
                    else f"{item.merge} needs the same shape in every branch"))
        y = first.with_(channels=sum(o.channels for o in outs)) if item.merge == "concat" else first
        node = f"{path}.{item.merge}@{item.span.line}:{item.span.column}"
        self.graph.add_node(node, kind="merge", merge=item.merge, y=y)
        for e in ends:
            self.graph.add_edge(e, node)
        self.last = node
        return [Step("parallel", path, x, y, item.span, branches=branches, merge=item.merge, split=item.split)], y


    def _merge_tokens(self, path, item: ParallelNode, x: Shape, start, ends, branches, outs):
        """`parallel tokens`: concatenate along the token axis. The last branch's grid stays the
        grid; every token ahead of it (all tokens of the earlier branches, then the last branch's
        own prefix tokens) becomes a prefix token. Maps are flattened to tokens first."""
        for i, y in enumerate(outs):
            if y.layout == "map":
                back, outs[i] = self._convert(path, y, "tokens", item.span)
                branches[i] += back
            if outs[i].layout != "tokens":
                raise _shape_error(path, item.span, ShapeError(
                    f"parallel tokens: branch {i + 1} gives a {outs[i].layout} {outs[i]}, not tokens"))
            if outs[i].channels != outs[0].channels:
                raise _shape_error(path, item.span, ShapeError(
                    f"parallel tokens: branch 1 gives {outs[0]} but branch {i + 1} gives {outs[i]}",
                    "token sequences concatenate only with the same channels; project one with linear(...)"))
        last = outs[-1]
        y = last.with_(extra=last.extra + sum(o.tokens for o in outs[:-1]))
        node = f"{path}.tokens@{item.span.line}:{item.span.column}"
        self.graph.add_node(node, kind="merge", merge="tokens", y=y)
        for e in ends:
            self.graph.add_edge(e, node)
        self.last = node
        return [Step("parallel", path, x, y, item.span, branches=branches, merge="tokens", split=item.split)], y


def _is_gate(s: Shape) -> bool:
    return s.layout == "map" and all(g == 1 for g in s.spatial)


def _first_need(items) -> str:
    """The layout the first layout-specific op of `items` needs ("any" if none does)."""
    for item in items:
        if isinstance(item, OpNode):
            if item.op.layout != "any":
                return item.op.layout
        elif isinstance(item, SubSeq):
            need = _first_need(item.items)
            if need != "any":
                return need
        elif isinstance(item, ResidualNode):
            need = _first_need(item.shortcut + item.body)
            if need != "any":
                return need
        elif isinstance(item, ParallelNode):
            need = _first_need(item.branches[0])
            if need != "any":
                return need
    return "any"


def _shape_error(path: str, span, exc: ShapeError, x: Shape | None = None) -> ComposerError:
    notes = [f"at {path}" + (f", input {x}" if x is not None else "")]
    return ComposerError(Diagnostic("shape", exc.message, span, exc.hint, notes))
