"""Lower a resolved model to a plan (composer/plan.py): typed steps with every shape inferred.

Layouts (map, tokens, vector) are tracked per step; where an op needs another layout a conversion
step is inserted, before a residual when its body needs it so the shortcut follows along.
The module a `reuse` runs is found, and checked, by composer/lower_reuse.py.
"""

from __future__ import annotations

from .budget import MAX_NUMBER
from .diagnostics import ComposerError, Diagnostic, did_you_mean, error
from .ops import OPS
from .lower_reuse import check_reuses, find_module
from .plan import (ConvertStep, LoadStep, OpStep, ParallelStep, Plan, ResidualStep, ReuseStep, SaveStep,
                   Section, SeqStep, StagePlan)
from .resolved import Model, NamedTensor, OpNode, ParallelNode, ResidualNode, ReuseNode, Stage, SubSeq
from .shapes import Shape, ShapeError, TensorRef
from .speed import fold_kind, gc_paused, kept_section, lowered_block, sections_kept_here


def plan(model: Model, counted: bool = True) -> Plan:
    """Infer shapes for `model` and lower it to build steps; raise a located error on a mismatch.
    `counted=False`: the plan's parameters and MACs are neither counted nor kept while lowering
    (composer.sizes plans a model again at hundreds of sizes only to learn which it admits)."""
    with gc_paused():
        return _Lowering(model, counted).run()


class _Lowering:
    def __init__(self, model: Model, counted: bool = True):
        self.model = model
        self.counted = counted
        self.saved: dict = {}  # tensor key -> Shape
        # tensor key -> (how many folds were open where it was saved, the innermost one's opener)
        self.fold_of: dict = {"input": (0, None)}
        self.folds: list = []  # open patches_to_batch ops: (op, span, batch factor), innermost last
        # (id(op), input shape) -> (op, output shape): ops are frozen, and repeated blocks share them
        self.inferred: dict = {}
        self.reusing: list = []  # the `reuse` targets being lowered, innermost last (to refuse cycles)
        self.reuses: list = []  # every `reuse` step lowered
        self.ties: dict = {}  # tie key -> the path of the op that owns the shared parameter
        self.tie_calls = 0  # ops lowered that own or share a tied parameter (`_tie`)
        self.tape = None  # while a block is lowered to be replayed: its named tensors (speed.TensorTape)
        self.kept = sections_kept_here()  # composer.sizes probing: sections may be taken again

    def run(self) -> Plan:
        inp = self.model.input
        x = Shape(inp.channels, tuple(inp.size), "map")
        self.saved["input"] = x
        stem = self._lowered("stem", self.model.stem, x)  # its input is the model's: never kept (kept_section)
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
        spans = self.model.outputs_spans
        for i, name in enumerate(self.model.outputs or []):
            where = spans[i] if i < len(spans) else None  # where the name is written in `outputs = [...]`
            if name not in self.saved:
                raise error("unknown-tensor", f"output '{name}' is never saved", where,
                            did_you_mean(name, self.saved) or "name a tensor with `save NAME` in a block")
            if self.fold_of[name][0]:
                raise error("shape", f"output '{name}' is saved between patches_to_batch and batch_to_patches",
                            where, "save it where the batch is the model's")
        m = self.model
        out = Plan(m.name, m.file, Shape(inp.channels, tuple(inp.size), "map"), inp.kind, stem, stages, head,
                   arguments=m.params, chain=m.chain, overrides=m.overrides, drop_path=m.drop_path,
                   outputs=m.outputs, features=m.features, loss=m.loss, reference=m.reference, paper=m.paper,
                   doc=m.doc, span=m.span, saved=dict(self.saved), source=m,
                   preprocess=dict(m.preprocess))
        if self.reuses:
            check_reuses(out, self.reuses)
        for what, count in zip(("parameters", "MACs"), out.cost() if self.counted else ()):
            if count > MAX_NUMBER:  # a summary prints the counts as floats
                size = f"10**{int(count.bit_length() * 0.30103)}" if isinstance(count, int) else f"{count:.3g}"
                raise error("too-large", f"too large: the model has about {size} {what}",
                            m.span, f"counts must stay below {MAX_NUMBER:.3g}: make the layers smaller")
        return out

    def _section(self, path, items, x) -> Section:
        """A downsample, norm or head (composer.sizes probing sizes may take it from an earlier
        plan: `speed.kept_section`)."""
        if self.kept:
            return kept_section(self, items, path, x, lambda: self._lowered(path, items, x))
        return self._lowered(path, items, x)

    def _lowered(self, path, items, x, drop_path=0.0, call="", span=None) -> Section:
        steps, y = self._seq(path, items, x)
        self._folds_closed(path, 0)
        return Section(path, steps, x, y, drop_path, call, span)

    def _block(self, path: str, block, x: Shape) -> Section:
        """A stage's block; an equal block may be replayed instead of lowered (`speed.lowered_block`)."""
        lower = lambda: lowered_block(  # noqa: E731
            lambda: self._lowered(path, block.items, x, block.drop_path, block.call, block.span),
            path, block, x, self.counted, self)
        return kept_section(self, block, path, x, lower) if self.kept else lower()

    def _folds_closed(self, path, depth: int) -> None:
        """A patches_to_batch opened in a section, residual body or parallel branch closes there."""
        if len(self.folds) > depth:
            op, span = self.folds[-1][:2]
            raise _shape_error(path, span, ShapeError(
                f"{_fold_call(op)} is not closed by {_closer_of(op)} in the same body",
                "unfold and fold back within one block (and within one residual or parallel branch)"))

    def _batch(self) -> int:
        n = 1
        for _, _, factor, _ in self.folds:
            n *= factor
        return n

    def _fold(self, path, item, x: Shape) -> Shape | None:
        """Track patches_to_batch (opens: the batch grows by size^d) and batch_to_patches (closes it);
        a close returns the map its opener unfolded."""
        kind = fold_kind(item.op)
        if kind is None:
            return
        if kind == "open":
            try:
                factor = item.op.fold_factor(x)
            except ShapeError as exc:
                raise _shape_error(path, item.span, exc, x) from None
            self.folds.append((item.op, item.span, factor, x))
        elif kind == "close":
            why = item.op.closes(self.folds[-1][0]) if self.folds else None
            if why is not None or not self.folds:
                op = item.op
                said = f"{_fold_call(op)} has no matching {_fold_call(op, op.opener)} before it"
                raise _shape_error(path, item.span, ShapeError(
                    said + (f": {why}" if why else ""),
                    f"fold back what {op.opener} unfolded earlier in the same block, with the same arguments"))
            opener = self.folds[-1][0]
            if getattr(opener, "fit", None) != getattr(item.op, "fit", None):
                raise _shape_error(path, item.span, ShapeError(
                    f"{item.op.name}(fit = {item.op.fit!r}) closes {opener.name}(fit = {opener.fit!r})",
                    "give the pair the same fit"))
            return self.folds.pop()[3]
        elif kind == "join":  # a tensor from outside the innermost fold cut into as many pieces
            factor = item.op.fold_factor(x)
            if factor != self.folds[-1][2]:
                raise _shape_error(path, item.span, ShapeError(
                    f"{item.op.name} cuts {factor} pieces per image, but the open {self.folds[-1][0].name} "
                    f"puts {self.folds[-1][2]} in the batch", "the queries' windows and the keys' blocks must pair up"))
        return None

    def _seq(self, path: str, items: list, x: Shape) -> tuple[list, Shape]:
        steps = []
        for item in items:
            new, x = self._item(path, item, x)
            steps += new
        return steps, x

    def _convert(self, path: str, x: Shape, need: str, span) -> tuple[list, Shape]:
        if need in ("any", x.layout):
            return [], x
        if need in _ATTENTION_LAYOUTS or x.layout in _ATTENTION_LAYOUTS:
            hint = {"heads": "split the channels into heads first: split_heads(heads)",
                    "scores": "make scores first: scores(q, k)"}.get(need) or (
                "merge the heads first: merge_heads" if x.layout == "heads" else
                "weigh values by the scores first: weighted_sum(v)")
            raise _shape_error(path, span, ShapeError(f"this op needs a {need} but gets {x.layout} {x}", hint))
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
        return [ConvertStep(path, x, y, span, conv)], y

    def _item(self, path: str, item, x: Shape) -> tuple[list, Shape]:
        if isinstance(item, OpNode):
            op = item.op
            node = f"{path}.{item.name}"
            load = None
            if op.tensor_args:
                op, load = self._tensor_args(node, op)
                if load is not None:
                    x = load.y
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
                    if any(g > MAX_SIDE for g in y.spatial) or y.numel > MAX_ELEMENTS:
                        what = str(y) if len(str(y)) <= 60 else f"a tensor of about {float(y.numel):.1e} values"
                        raise ShapeError(f"too large: {what} is beyond what any model runs (a side of at most "
                                         f"{MAX_SIDE:,}, at most {MAX_ELEMENTS:,} values)",
                                         "check the sizes, strides and paddings that lead here")
                except ShapeError as exc:
                    raise _shape_error(node, item.span, exc, x) from None
                self.inferred[key] = (op, y)
            batch = self._batch() if self.folds and op.per_fold else 1
            if x.heads and need == "any" and op.per_head:  # an op of any layout runs on every head alike
                batch *= x.heads
            opened = self._fold(node, item, x)
            if opened is not None:  # a fold back: its map lies on the grid its opener unfolded
                y = op.closed(y, opened)
            step = OpStep(node, x, y, item.span, item.name, op, batch)
            if op.tied:
                self._tie(step)
            steps = pre + [step] if pre else [step]
            return ([load] + steps if load is not None else steps), y
        if isinstance(item, SubSeq):
            steps, y = self._seq(f"{path}.{item.name}", item.items, x)
            return [SeqStep(f"{path}.{item.name}", x, y, item.span, item.name, steps, item.call)], y
        if isinstance(item, ResidualNode):
            pre, x = self._convert(path, x, _first_need(item.body), item.span)
            short, xs = self._seq(path, item.shortcut, x)
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
            return pre + [ResidualStep(path, x, y, item.span, body, short, item.drop_path)], y
        if isinstance(item, ParallelNode):
            return self._parallel(path, item, x)
        if isinstance(item, ReuseNode):
            return self._reuse(path, item, x)
        if isinstance(item, NamedTensor):
            if item.action == "save":
                self.saved[item.tensor] = x
                self.fold_of[item.tensor] = (len(self.folds), self.folds[-1][0].name if self.folds else None)
                if self.tape is not None:
                    self.tape.write(item.tensor, x, self.fold_of[item.tensor])
                return [SaveStep(path, x, x, item.span, item.tensor)], x
            y = self._saved(item.tensor, item.span)
            return [LoadStep(path, x, y, item.span, item.tensor)], y
        raise AssertionError(f"unknown item {item!r}")

    def _saved(self, key: str, span, outer: bool = False) -> Shape:
        """The shape of the tensor saved under `key`, which must be reachable from here."""
        if key not in self.saved:
            name = key.rpartition(".")[2]
            raise error("unknown-tensor", f"no tensor named '{name}' is saved before this point", span,
                        did_you_mean(name, self.saved) or "name a tensor with `save NAME` or `NAME = ...` first")
        depth, opener = self.fold_of[key]
        if depth != len(self.folds) - outer:
            fold = self.folds[-1][0].name if len(self.folds) > depth else opener
            raise error("shape", f"tensor '{key.rpartition('.')[2]}' is used across {fold} and its closing op: "
                        "the batch is multiplied on one side only", span,
                        "use named tensors on one side of the unfolded part")
        if self.tape is not None:
            self.tape.read(key, self.saved[key], self.fold_of[key])
        return self.saved[key]

    def _tensor_args(self, node: str, op):
        """`op` with the shapes of the named tensors it takes filled in, and the load of its input
        tensor (`input_arg`, when given), else None."""
        updates, load = {}, None
        for name in op.tensor_args:
            ref = getattr(op, name)
            if not isinstance(ref, TensorRef):  # not given, or a field that also takes a value (a mode)
                continue
            outer = name == op.input_arg and fold_kind(op) == "join"  # joins the fold: taken from outside it
            if outer and not self.folds:
                raise error("shape", f"{op.name} joins the windows of an open windows_to_batch, and none is open",
                            ref.span, "cut the queries into windows with windows_to_batch first")
            shape = self._saved(ref.key, ref.span, outer)
            updates[name] = TensorRef(ref.name, ref.key, ref.span, shape)
            if name == op.input_arg:
                load = LoadStep(node, shape, shape, ref.span, ref.key)
        return op.model_copy(update=updates), load

    def _tie(self, step: OpStep) -> None:
        tie = step.op.tie_key(step.x)
        if tie is not None and not self.reusing:  # a reused op is its own owner, counted where it is built
            self.tie_calls += 1
            key, n = tie
            if self.ties.setdefault(key, step.path) != step.path:
                step.tied = n

    def _reuse(self, path: str, item: ReuseNode, x: Shape):
        """`reuse PATH`: lower the target's items again at this input; the step counts their MACs,
        not their parameters."""
        target = item.path
        if target in self.reusing or path == target or path.startswith(target + "."):
            raise error("reuse", f"`reuse {target}` would apply {target} inside itself", item.span,
                        "reuse a module that does not contain this statement")
        found = find_module(self.model, target)
        if isinstance(found, str):
            raise error("unknown-module", f"no module '{target}' in this model: {found}", item.span,
                        "name a state_dict path such as stem.NAME, stages.0, stages.1.blocks.2, head.NAME")
        self.reusing.append(target)
        try:
            steps, y = self._reused(target, found, x)
        except ComposerError as exc:
            exc.diagnostics[0].notes.append(f"applied by `reuse {target}` at {item.span}")
            raise
        finally:
            self.reusing.pop()
        step = ReuseStep(path, x, y, item.span, target, steps)
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
                sec = self._lowered(f"{target}.{name}", items, x)
                steps += sec.steps
                x = sec.y
            return steps, x
        sec = self._lowered(target if isinstance(found, list) else target.rpartition(".")[0],
                            found if isinstance(found, list) else [found], x)
        return sec.steps, sec.y

    def _parallel(self, path, item: ParallelNode, x: Shape):
        if item.split is not None and sum(item.split) != x.channels:
            raise _shape_error(path, item.span, ShapeError(
                f"split {item.split} adds up to {sum(item.split)}, but the input has {x.channels} channels"))
        branches, outs = [], []
        for i, b in enumerate(item.branches):
            xb = x.with_(channels=item.split[i]) if item.split else x
            depth = len(self.folds)
            steps, y = self._seq(path, b, xb)
            self._folds_closed(path, depth)
            branches.append(steps)
            outs.append(y)
        if item.merge == "tokens":
            return self._merge_tokens(path, item, x, branches, outs)
        first = outs[0]
        for i, y in enumerate(outs[1:], 1):
            if y.layout != first.layout:
                back, outs[i] = self._convert(path, y, first.layout, item.span)
                branches[i] += back
        if item.merge == "mul":  # a pooled gate broadcasts over a map along its axes of size 1: (C, 1x1)
            full = max(outs, key=lambda o: o.tokens if o.layout == "map" else 0)  # as squeeze-excite, (C, Hx1)
            outs = [full if _broadcasts(o, full) else o for o in outs]
            first = outs[0]
        for i, y in enumerate(outs[1:], 1):
            same = (y.spatial, y.extra) == (first.spatial, first.extra) if item.merge == "concat" else y == first
            if not same:
                raise _shape_error(path, item.span, ShapeError(
                    f"parallel {item.merge}: branch 1 gives {first} but branch {i + 1} gives {y}",
                    "concat needs the same grid in every branch" if item.merge == "concat"
                    else f"{item.merge} needs the same shape in every branch"))
        y = first.with_(channels=sum(o.channels for o in outs)) if item.merge == "concat" else first
        return [ParallelStep(path, x, y, item.span, item.merge, branches, item.split)], y

    def _merge_tokens(self, path, item: ParallelNode, x: Shape, branches, outs):
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
        return [ParallelStep(path, x, y, item.span, "tokens", branches, item.split)], y


_ATTENTION_LAYOUTS = ("heads", "scores")


def _fold_call(op, name: str | None = None) -> str:
    """How a fold op (or, by `name`, its partner) is written in a message: with its size if it has one."""
    size = getattr(op, "size", None)
    return f"{name or op.name}({size})" if size is not None else (name or op.name)


def _closer_of(op) -> str:
    """The op that closes the fold `op` opens, written as a call."""
    closer = next((n for n, cls in OPS.items() if getattr(cls, "opener", None) == op.name), "its closer")
    return _fold_call(op, closer)


def _broadcasts(gate: Shape, full: Shape) -> bool:
    """Whether map `gate` multiplies map `full` by broadcasting: same channels, every axis as long
    or of size 1."""
    return (gate.layout == full.layout == "map" and gate.channels == full.channels and gate.ndim == full.ndim
            and all(g in (1, f) for g, f in zip(gate.spatial, full.spatial)))


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


# A tensor no model can hold: refused where it is made, before any rule does per-position work on it
# (a padding of 2**62 made a grid whose continuous-bias table was counted for minutes)
MAX_SIDE = 2 ** 20
MAX_ELEMENTS = 2 ** 40


def _shape_error(path: str, span, exc: ShapeError, x: Shape | None = None) -> ComposerError:
    notes = [f"at {path}" + (f", input {x}" if x is not None else "")]
    return ComposerError(Diagnostic("shape", exc.message, span, exc.hint, notes))
