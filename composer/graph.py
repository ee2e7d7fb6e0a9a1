"""Lower a resolved model to a program of steps, infer every shape, and record it as a networkx graph.

Layouts (map, tokens, vector) are tracked per step; where an op needs another layout a conversion
step is inserted, before a residual when its body needs it so the shortcut follows along.
"""

from __future__ import annotations

from dataclasses import dataclass, field


from .diagnostics import ComposerError, Diagnostic
from .ops import OPS
from .diagnostics import did_you_mean, error
from .resolved import Model, NamedTensor, OpNode, ParallelNode, ResidualNode, ReuseNode, Stage, SubSeq
from .shapes import Shape, ShapeError
from .source import Span
from .speed import gc_paused


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
    reused: list = field(default_factory=list)  # `reuse PATH`: the target's steps at this input (MACs, no params)
    tied: int = 0  # parameters of this op owned by an earlier op with the same tie key (`Op.tie_key`)

    def walk(self):
        yield self
        for child in [*self.shortcut, *self.body, *(s for b in self.branches for s in b)]:
            yield from child.walk()

    @property
    def params(self) -> int:
        return sum(s.op.params(s.x, s.y) - s.tied for s in self.walk() if s.kind == "op")

    @property
    def macs(self) -> int:
        return sum(s.op.macs(s.x, s.y) * s.batch if s.kind == "op" else sum(r.macs for r in s.reused)
                   for s in self.walk() if s.kind in ("op", "reuse"))


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
    with gc_paused():
        return _Lowering(model).run()


class GraphRecord:
    """Nodes and edges as lowering finds them; networkx (slow to import) is loaded only when a
    consumer asks for the graph, so `composer check` stays fast."""

    def __init__(self):
        self._nodes: list = []
        self._edges: list = []
        self._copies: list = []  # replayed blocks, renamed when the nodes or edges are read

    def add_node(self, name, **attrs):
        self._nodes.append((name, attrs))

    def add_edge(self, a, b):
        self._edges.append((a, b))

    def copy_block(self, nodes: list, edges: list, old: str, old_start: str, path: str, start: str) -> None:
        """Record the nodes and edges of a block again, renamed from path `old` to `path`, the
        edges from the node before it (`old_start`) now from `start`."""
        self._copies.append((len(self._nodes), len(self._edges), nodes, edges, old, old_start, path, start))

    @property
    def nodes(self) -> list:
        self._expand()
        return self._nodes

    @property
    def edges(self) -> list:
        self._expand()
        return self._edges

    def _expand(self) -> None:
        if not self._copies:
            return
        nodes, edges, n, e = [], [], 0, 0
        for at_node, at_edge, cnodes, cedges, old, old_start, path, start in self._copies:
            nodes += self._nodes[n:at_node]
            edges += self._edges[e:at_edge]
            n, e, cut = at_node, at_edge, len(old)
            nodes += [(path + name[cut:], dict(attrs)) for name, attrs in cnodes]
            edges += [(start if a == old_start else path + a[cut:], path + b[cut:]) for a, b in cedges]
        nodes += self._nodes[n:]
        edges += self._edges[e:]
        self._nodes, self._edges, self._copies = nodes, edges, []

    def to_networkx(self):
        import networkx as nx

        g = nx.DiGraph()
        g.add_nodes_from(self.nodes)
        g.add_edges_from(self.edges)
        return g


# (block signature, input shape) -> what lowering an equal block did: its path, the node before it,
# its section, nodes, edges and last node. Kept across plans: the variants of a family and repeated
# loads of a model share resolved instances, so their blocks are equal too. The entries hold the ops
# and spans whose ids the signatures name, so an id cannot be reused while its entry lives.
_LOWERED: dict = {}
_LOWERED_MAX = 4096


class _Lowering:
    def __init__(self, model: Model):
        self.model = model
        self.graph = GraphRecord()
        self.last = "input"
        self.saved: dict = {}
        self.folds: list = []  # open patches_to_batch ops: (op, span, batch factor), innermost last
        # (id(op), input shape) -> (op, output shape): ops are frozen, and repeated blocks share them
        self.inferred: dict = {}
        self.reusing: list = []  # the `reuse` targets being lowered, innermost last (to refuse cycles)
        self.reuses: list = []  # every `reuse` step lowered
        self.ties: dict = {}  # tie key -> the path of the op that owns the shared parameter

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
                sec = self._block(f"stages.{st.index}.blocks.{k}", b, x)
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
        out = Plan(self.model, Shape(inp.channels, tuple(inp.size), "map"), stem, stages, head, self.graph,
                   dict(self.saved))
        if self.reuses:
            _check_reuses(out, self.reuses)
        return out

    def _section(self, path, items, x, drop_path=0.0, call="") -> Section:
        steps, y = self._seq(path, items, x)
        self._folds_closed(path, 0)
        return Section(path, steps, x, y, drop_path, call)

    def _block(self, path: str, block, x: Shape) -> Section:
        """A stage's block. Repeated blocks are mostly equal (the same resolved instance, copied):
        an equal block with the same input is lowered once (see `_LOWERED`) and replayed with its
        own path, each step, node and edge renamed, its residuals at its own drop-path rate."""
        sig = _signature(block.items)
        if sig is None:
            return self._section(path, block.items, x, block.drop_path, block.call)
        key = (sig[0], x)
        done = _LOWERED.get(key)
        if done is not None:
            return self._replay(path, block, x, done, sig[1])
        start, n0, e0 = self.last, len(self.graph._nodes), len(self.graph._edges)
        sec = self._section(path, block.items, x, block.drop_path, block.call)
        nodes, edges = self.graph._nodes[n0:], self.graph._edges[e0:]  # no copies are made inside a block
        inside = path + "."
        if all(n.startswith(inside) for n, _ in nodes) and all(b.startswith(inside) for _, b in edges) \
                and all(a == start or a.startswith(inside) for a, _ in edges):
            if len(_LOWERED) >= _LOWERED_MAX:
                _LOWERED.clear()
            _LOWERED[key] = (path, start, sec, nodes, edges, self.last if self.last != start else None)
        return sec

    def _replay(self, path: str, block, x: Shape, done, drop_path) -> Section:
        old, old_start, sec, nodes, edges, last = done
        cut = len(old)
        self.graph.copy_block(nodes, edges, old, old_start, path, self.last)
        if last is not None:
            self.last = path + last[cut:]
        steps = _renamed(sec.steps, path, cut, drop_path)
        return Section(path, steps, x, sec.y, block.drop_path, block.call)

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
        kind = _fold_kind(item.op)
        if kind is None:
            return
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
            op = item.op
            node = f"{path}.{item.name}"
            need = op.layout
            if need == "any" or need == x.layout:
                pre = None
            else:
                pre, x = self._convert(node, x, need, item.span)
            key = (id(op), x)
            known = self.inferred.get(key)
            if known is not None and known[0] is op:
                y = known[1]
            else:
                try:
                    y = op.infer(x)
                except ShapeError as exc:
                    raise _shape_error(node, item.span, exc, x) from None
                self.inferred[key] = (op, y)
            self.graph.add_node(node, kind="op", op=op.name, x=x, y=y)
            self.graph.add_edge(self.last, node)
            self.last = node
            batch = self._batch() if self.folds else 1
            self._fold(node, item, x)
            step = Step("op", node, x, y, item.span, item.name, op, batch=batch)
            if op.tied:
                self._tie(step)
            return (pre + [step] if pre else [step]), y
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
        if isinstance(item, ReuseNode):
            return self._reuse(path, item, x)
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

    def _tie(self, step: Step) -> None:
        tie = step.op.tie_key(step.x)
        if tie is not None and not self.reusing:  # a reused op is its own owner, counted where it is built
            key, n = tie
            if self.ties.setdefault(key, step.path) != step.path:
                step.tied = n

    def _reuse(self, path: str, item: ReuseNode, x: Shape):
        """`reuse PATH`: lower the target's items again at this input, into a graph of their own
        (the model's graph gets one node); the step counts their MACs, not their parameters."""
        target = item.path
        if target in self.reusing or path == target or path.startswith(target + "."):
            raise error("reuse", f"`reuse {target}` would apply {target} inside itself", item.span,
                        "reuse a module that does not contain this statement")
        found = _find_module(self.model, target)
        if isinstance(found, str):
            raise error("unknown-module", f"no module '{target}' in this model: {found}", item.span,
                        "name a state_dict path such as stem.NAME, stages.0, stages.1.blocks.2, head.NAME")
        graph, last = self.graph, self.last
        self.graph, self.last = GraphRecord(), "input"
        self.reusing.append(target)
        try:
            steps, y = self._reused(target, found, x)
        except ComposerError as exc:
            exc.diagnostics[0].notes.append(f"applied by `reuse {target}` at {item.span}")
            raise
        finally:
            self.reusing.pop()
            self.graph = graph
            self.last = last
        node = f"{path}.reuse@{item.span.line}:{item.span.column}"
        self.graph.add_node(node, kind="reuse", op=f"reuse {target}", x=x, y=y)
        self.graph.add_edge(self.last, node)
        self.last = node
        step = Step("reuse", path, x, y, item.span, name=target, reused=steps)
        self.reuses.append(step)
        return [step], y

    def _reused(self, target: str, found, x: Shape) -> tuple[list, Shape]:
        if isinstance(found, Stage):
            steps = []
            parts = [("downsample", found.downsample)] if found.downsample and not found.downsample_last else []
            parts += [(f"blocks.{k}", b.items) for k, b in enumerate(found.blocks)]
            parts += [("downsample", found.downsample)] if found.downsample and found.downsample_last else []
            parts += [("norm", found.norm)] if found.norm else []
            for name, items in parts:
                sec = self._section(f"{target}.{name}", items, x)
                steps += sec.steps
                x = sec.y
            return steps, x
        sec = self._section(target if isinstance(found, list) else target.rpartition(".")[0],
                            found if isinstance(found, list) else [found], x)
        return sec.steps, sec.y

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


def _signature(items):
    """What lowering reads from a block's items, ops and spans by identity (equal blocks share
    them; an op's name comes with it), and the residuals' one drop-path rate; None where a block
    is lowered afresh (named tensors, patches_to_batch, residuals at different rates)."""
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
    """Flat: an op's id, or a marker (0 to 4, never an id) and the node's fields, its children, 0."""
    for it in items:
        cls = it.__class__
        if cls is OpNode:
            if _fold_kind(it.op) is not None or it.op.tied and it.op.ties():
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
        else:  # named tensors refer outside the block
            raise _Fresh


def _check_reuses(plan: Plan, reuses: list) -> None:
    """A reused module runs with the weights built for its first input: every op in it must get the
    same channels, and the same parameter count (grid-sized tables), where it is reused."""
    built = {s.path: s for sec in plan.sections for st in sec.steps for s in st.walk() if s.kind == "op"}
    for r in reuses:
        for s in (t for st in r.reused for t in st.walk()):
            orig = built.get(s.path) if s.kind == "op" else None
            if orig is None:
                continue
            if (s.x.channels, s.y.channels) != (orig.x.channels, orig.y.channels) \
                    or s.op.params(s.x, s.y) != orig.op.params(orig.x, orig.y):
                raise error("shape", f"`reuse {r.name}`: {s.path} was built for input {orig.x} but gets {s.x} here",
                            r.span, "a reused module must get inputs its weights fit: the same channels, and the "
                            "same grid where its parameters are sized by it")


def _find_module(model: Model, path: str):
    """The resolved part of `model` at a state_dict module path: a Stage, a list of items (a section
    or block), or one item; a string saying what is missing when there is none."""
    parts = path.split(".")
    head, rest = parts[0], parts[1:]
    if head in ("stem", "head"):
        items = model.stem if head == "stem" else model.head
        where = head
    elif head == "stages":
        if not rest or not rest[0].isdigit() or int(rest[0]) >= len(model.stages):
            return f"it has {len(model.stages)} stages (stages.0 .. stages.{len(model.stages) - 1})"
        stage = model.stages[int(rest[0])]
        where, rest = f"stages.{rest[0]}", rest[1:]
        if not rest:
            return stage
        if rest[0] == "blocks":
            if len(rest) < 2 or not rest[1].isdigit() or int(rest[1]) >= len(stage.blocks):
                return f"{where} has {len(stage.blocks)} blocks"
            items, where, rest = stage.blocks[int(rest[1])].items, f"{where}.blocks.{rest[1]}", rest[2:]
        elif rest[0] in ("downsample", "norm") and getattr(stage, rest[0]):
            items, where, rest = getattr(stage, rest[0]), f"{where}.{rest[0]}", rest[1:]
        else:
            return f"{where} has no '{rest[0]}'"
    else:
        return f"a path starts with stem, stages or head, not '{head}'"
    if not rest:
        return items
    for name in rest:
        item = _named(items, name)
        if item is None:
            return f"{where} has no layer '{name}'"
        where = f"{where}.{name}"
        items = item.items if isinstance(item, SubSeq) else None
        if items is None and name != rest[-1]:
            return f"{where} is an op, with no layers inside"
    return item


def _named(items: list, name: str):
    """The item called `name` in one naming scope (residual bodies and branches share their scope)."""
    for it in items:
        if isinstance(it, (OpNode, SubSeq)) and it.name == name:
            return it
        inner = [*it.body, *it.shortcut] if isinstance(it, ResidualNode) else \
            [s for b in it.branches for s in b] if isinstance(it, ParallelNode) else []
        found = _named(inner, name) if inner else None
        if found is not None:
            return found
    return None


def _renamed(steps: list, path: str, cut: int, drop_path) -> list:
    """Copies of a replayed block's steps under the new block path."""
    out = []
    for s in steps:
        out.append(Step(
            s.kind, path + s.path[cut:], s.x, s.y, s.span, s.name, s.op,
            _renamed(s.body, path, cut, drop_path) if s.body else [],
            _renamed(s.shortcut, path, cut, drop_path) if s.shortcut else [],
            [_renamed(b, path, cut, drop_path) for b in s.branches] if s.branches else [],
            s.merge, s.split, drop_path if s.kind == "residual" else s.drop_path, s.call, s.batch, s.reused,
            s.tied,
        ))
    return out


_FOLD_KINDS: dict = {}  # op class -> its `batch_fold` class attribute (None if it has none)


def _fold_kind(op):
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
