"""Resolve a parsed model into a concrete architecture: imports, inheritance, lets, stages, repeats,
per-block cycles and schedules, composites expanded, every op validated (pydantic). Nothing
symbolic is left in the result.

This module is the one recursive walk of expansion (bodies, residuals, parallels, composites,
stages). Beside it: inheritance and the model's settings (composer/resolve_inherit.py), the values
of statements (composer/resolve_values.py: per-block values, named list elements, reuse paths,
a parallel's split), ops validated (composer/resolve_ops.py). Loading files is
composer/loader.py's, module names composer/naming.py's, the instance cache composer/speed.py's."""

from __future__ import annotations

import typing

from . import ast, budget
from .diagnostics import ComposerError, did_you_mean, error
from .expr import InputSpec, Ref, Schedule, Scope, evaluate, type_name
from .loader import Unit, load  # noqa: F401  (`resolve.load`: the files it resolves are loaded so)
from .naming import Names, Numbered
from .preprocess import preprocess_settings
from .resolve_inherit import SETTINGS, flatten, model_chain, user_setting
from .resolve_ops import model_loss, to_op
from .resolve_values import (MERGES, Aliased, Ctx, concretize, layer_name, layer_value,  # noqa: F401  (MERGES: `resolve.MERGES`)
                             parallel_split, reuse_path, twice)
from .tensors import bind_tensor, find_tensor, split_parts
from .resolved import Block, Model, NamedTensor, OpNode, ParallelNode, ResidualNode, ReuseNode, Stage, SubSeq
from .shapes import TensorRef
from .source import Span
from .speed import gc_paused, instance_key, instance_mark, keep_instance, reused_instance

STATEMENT_UNITS = 100  # work units per statement expanded or layer copied (as much work as about 100 expression nodes)

# ---- models ----------------------------------------------------------------------


def resolve_model(unit: Unit, name: str, overrides: dict | None = None) -> Model:
    """Resolve model `name` of `unit`; `overrides` maps parameter names to values or expression text."""
    chain = model_chain(unit, name)
    with gc_paused(), budget.opened():  # one work budget per model checked (composer/budget.py)
        return _Resolver(unit, chain, overrides or {}).run()


class _Resolver(ast.NodeVisitor):
    """Expands one model; as a `NodeVisitor`, the statements of a body (see `_items`)."""

    def __init__(self, unit: Unit, chain: list, overrides: dict):
        self.unit, self.chain, self.user = unit, chain, overrides
        self.model = chain[-1]
        self.binding = 0  # bindings open around the statement being resolved (`q = { k = {...} }`)

    def run(self) -> Model:
        params, lets, settings, sections, stages, overrides = flatten(self.chain)  # base first, variants overriding by name
        for key, value in self.user.items():
            if key in SETTINGS and key not in params:  # a model-level setting, overridden like a parameter
                settings[key] = user_setting(key, value)
            elif key not in params:
                src = str(getattr(getattr(value, "span", None), "file", ""))  # `--set key=...` names its source
                raise error("unknown-parameter", (f"{src}: " if src.startswith("--set") else "") +
                            f"model '{self.model.name}' has no parameter '{key}'", None,
                            did_you_mean(key, [*params, *SETTINGS]) or f"its parameters are: {', '.join(params) or '(none)'}; settings: {', '.join(SETTINGS)}")
        names = self.unit.names
        scope = Scope(names)
        values = {}
        for p in params.values():
            if p.name in self.user:
                given = self.user[p.name]
                is_expr = isinstance(given, typing.get_args(ast.Expr))
                values[p.name] = evaluate(given, scope.child(values)) if is_expr else given
            elif p.default is None:
                raise error("missing-argument", f"parameter '{p.name}' of model '{self.model.name}' has no value",
                            p.span, "give it a default, or set it with --set")
            else:
                values[p.name] = evaluate(p.default, scope.child(values))
        scope = scope.child(values)
        for lname, expr in lets.items():
            scope.values[lname] = evaluate(expr, scope)
        self.scope = scope
        if "input" not in sections:
            raise error("missing-input", f"model '{self.model.name}' has no input", self.model.span,
                        "add e.g. `input image(3, 224)`")
        inp = evaluate(sections["input"].expr, scope)
        if not isinstance(inp, InputSpec):
            raise error("type", f"input must be image(...), signal(...) or volume(...), got {type_name(inp)}",
                        sections["input"].expr.span)
        self.drop_setting = evaluate(settings["drop_path"].value, scope) if "drop_path" in settings else 0.0
        if not isinstance(self.drop_setting, (int, float, Schedule)) or isinstance(self.drop_setting, bool):
            raise error("type", f"drop_path must be a number or linspace(a, b), got {type_name(self.drop_setting)}",
                        settings["drop_path"].value.span)
        rates = (self.drop_setting.start, self.drop_setting.end) if isinstance(self.drop_setting, Schedule) \
            else (self.drop_setting,)
        if not all(0 <= r < 1 for r in rates):  # a rate of 1 or more drops every residual branch (or NaN)
            shown = rates[0] if len(rates) == 1 else f"linspace{rates}"
            raise error("value", f"drop_path must be at least 0 and below 1, got {shown}",
                        settings["drop_path"].value.span, "a rate of stochastic depth, e.g. 0.1 or linspace(0, 0.1)")
        meta = {k: evaluate(settings[k].value, scope) for k in ("reference", "paper") if k in settings}
        for k, v in meta.items():
            if not isinstance(v, str):
                raise error("type", f"{k} must be a string, got {type_name(v)}", settings[k].value.span)
        outputs = evaluate(settings["outputs"].value, scope) if "outputs" in settings else None
        if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
            raise error("type", f"outputs must be a list of saved tensor names, got {type_name(outputs)}",
                        settings["outputs"].value.span, 'e.g. outputs = ["c3", "c4"] with `save c3` in a block')
        self.outputs_span = settings["outputs"].value.span if outputs is not None else None
        written = settings["outputs"].value if outputs is not None else None
        outputs_spans = [item.span for item in written.items] if isinstance(written, ast.ListExpr) \
            and len(written.items) == len(outputs) else [self.outputs_span] * len(outputs or [])
        features = evaluate(settings["feature_points"].value, scope) if "feature_points" in settings else "stages"
        if features not in ("stages", "blocks"):
            raise error("value", f'feature_points must be "stages" or "blocks", got {features!r}',
                        settings["feature_points"].value.span)
        loss = model_loss(settings["loss"].value, scope) if "loss" in settings else None
        preprocess = preprocess_settings(settings, scope, inp.channels)

        expanded = [it for s in stages for it in self._expand_stages(s)]
        self.total = sum(not isinstance(item, ast.Reuse) for _, _, blocks in expanded for item, _ in blocks)
        self.next_block = 0
        self.rates = []
        stem = self._section(sections.get("stem"), Ctx())
        out_stages = [self._stage(i, sscope, items, blocks) for i, (sscope, items, blocks) in enumerate(expanded)]
        head = self._section(sections.get("head"), Ctx())
        return Model(
            self.model.name, self.model.file, inp, stem, out_stages, head, self.rates, values,
            overrides, meta.get("reference"), meta.get("paper"), self.unit.file.doc, self.model.span, outputs,
            features, loss, [m.name for m in reversed(self.chain)], outputs_spans, preprocess,
        )

    def _expand_stages(self, stage: ast.Stage):
        """Yield (scope, items, block expressions) per stage; repeat counts are evaluated here."""
        if stage.loop_var is None:
            iterations = [self.scope.child()]
        else:
            lo, hi = evaluate(stage.start, self.scope), evaluate(stage.stop, self.scope)
            for v, e in ((lo, stage.start), (hi, stage.stop)):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise error("type", f"stage range bounds must be ints, got {type_name(v)}", e.span)
            if not 0 <= hi - lo <= 64:
                raise error("value", f"stage range {lo}..{hi} is empty or too long", stage.span)
            iterations = [self.scope.child({stage.loop_var: i}) for i in range(lo, hi)]
        for sscope in iterations:
            blocks = []
            for item in stage.items:
                _STAGE_BLOCKS.visit(item, sscope, blocks)
            yield sscope, stage, blocks

    def _stage(self, index: int, sscope: Scope, stage: ast.Stage, blocks) -> Stage:
        sections = _StageSections(self, sscope)
        for item in stage.items:
            sections.visit(item)
        down, down_last, norm, out_blocks = sections.down, sections.down_last, sections.norm, []
        in_stage = 0
        evaluated = {}  # the block expression of a `repeat` without `as`: the same value for every block
        for item, k in blocks:
            if isinstance(item, ast.Reuse):  # not a block of the drop-path schedule: the reused one has its rate
                out_blocks.append(Block([ReuseNode(reuse_path(item, sscope), item.span)], 0.0, self.next_block, item.span,
                                        f"reuse {item.path}"))
                in_stage += 1
                continue
            bscope = sscope.child({item.var: k} if item.var else {})
            rate = self.drop_setting.at(self.next_block, self.total) if isinstance(self.drop_setting, Schedule) \
                else float(self.drop_setting)
            ctx = Ctx(in_stage, self.next_block, self.total, rate)
            names = Names()
            if isinstance(item.block, tuple):  # an inline body: `repeat 2 { conv(16, 3); relu }`
                value = None
                items = self._items(item.block, bscope, ctx, names)
            else:
                if item.var is not None:
                    raw = layer_value(item.block, bscope)
                elif id(item) in evaluated:
                    raw = evaluated[id(item)]
                else:
                    raw = evaluated[id(item)] = layer_value(item.block, bscope)
                value = concretize(raw, ctx, item.block.span)
                if isinstance(value, Ref) and value.kind == "composite":
                    items = self._instantiate(value, ctx)
                else:
                    items = self._apply(value, None, ctx, names, item.block.span, item.block)
                    names.finish()
            call = value.name if isinstance(value, Ref) else "block" if value is None else type_name(value)
            out_blocks.append(Block(items, rate, self.next_block, item.span, call))
            self.rates.append(rate)
            self.next_block += 1
            in_stage += 1
        return Stage(index, down if down else None, down_last, out_blocks, stage.span, norm or None)

    def _section(self, section, ctx: "Ctx") -> list:
        if section is None:
            return []
        return self._items(section.body, self.scope, ctx, Names())

    # -- bodies
    def _items(self, body, scope: Scope, ctx: "Ctx", names: "Names", finish: bool = True) -> list:
        out = []
        scope = scope.child()
        methods = self._methods  # `self.visit(stmt, ...)` inlined: this loop is the hot path of `check`
        work = budget.STATE
        for stmt in body:
            work.left -= STATEMENT_UNITS  # each statement expanded draws on the check's work budget
            if work.left < 0:
                raise budget.exhausted(stmt.span, "expanding this")
            (methods.get(stmt.__class__) or self._method_for(stmt.__class__))(self, stmt, scope, ctx, names, out)
        if finish:
            names.finish()
        return out

    # each statement of a body adds its items to `out`
    def visit_Let(self, stmt: ast.Let, scope, ctx, names, out) -> None:
        if stmt.name in scope.values:  # `scope`: this body's own (see `_items`)
            raise twice(stmt)
        scope.values[stmt.name] = evaluate(stmt.value, scope)

    def visit_Apply(self, stmt: ast.Apply, scope, ctx, names, out) -> None:
        value = concretize(layer_value(stmt.expr, scope), ctx, stmt.expr.span)
        if isinstance(value, list):  # a list of layers (`[conv, bn] * n`): each is a statement's work
            budget.charge(STATEMENT_UNITS * len(value), stmt.expr.span, "applying this list of layers")
        out += self._apply(value, stmt.alias, ctx, names, stmt.span, stmt.expr)

    def visit_Residual(self, stmt: ast.Residual, scope, ctx, names, out) -> None:
        out += self._residual(stmt, scope, ctx, names)

    def visit_Parallel(self, stmt: ast.Parallel, scope, ctx, names, out) -> None:
        out.append(self._parallel(stmt, scope, ctx, names))

    def visit_ParallelFor(self, stmt: ast.ParallelFor, scope, ctx, names, out) -> None:
        out.append(self._parallel_for(stmt, scope, ctx, names))

    def visit_Save(self, stmt: ast.Save, scope, ctx, names, out) -> None:
        bound = find_tensor(scope, stmt.name)
        if bound is not None and bound.key != stmt.name:  # a tensor parameter or binding: update that tensor
            out.append(NamedTensor("save", bound.key, stmt.span))
            return
        out.append(NamedTensor("save", stmt.name, stmt.span))
        ref = TensorRef(stmt.name, stmt.name, stmt.span)  # a saved name is global: the key is the name
        bind_tensor(scope, ref)
        if not ctx.depth:  # saved at model level: later blocks may pass it as an argument
            bind_tensor(self.scope, ref)

    def visit_Load(self, stmt: ast.Load, scope, ctx, names, out) -> None:
        bound = find_tensor(scope, stmt.name)
        out.append(NamedTensor("load", bound.key if bound is not None else stmt.name, stmt.span))

    def visit_Bind(self, stmt: ast.Bind, scope, ctx, names, out) -> None:
        """`q = X`: X applied to the running tensor, its result kept as tensor `q`, and the running
        tensor restored; `q, k, v = X`: X made once per name, each with its own `part`."""
        # the running tensor, kept while the binding runs: keyed by the names bound and how deep the
        # binding is nested, not by where it is written (a reformatted file resolves the same)
        hold = f"~{ctx.scope}{','.join(stmt.names)}#{self.binding}"
        refs = [TensorRef(n, f"{ctx.scope}{n}" if ctx.scope else n, stmt.span) for n in stmt.names]
        if len(set(stmt.names)) != len(refs):
            raise error("redefinition", "a tensor is named twice in one binding", stmt.span)
        out.append(NamedTensor("save", hold, stmt.span))
        if stmt.body is not None:
            if len(refs) != 1:
                raise error("type", f"a body gives one tensor, but {len(refs)} names are bound", stmt.span,
                            "bind the parts of a splitting op instead: `q, k, v = split_heads(heads)`")
            self.binding += 1
            try:
                out += self._items(stmt.body, scope, ctx, names, finish=False)
            finally:
                self.binding -= 1
            out.append(NamedTensor("save", refs[0].key, stmt.span))
        else:
            value = concretize(layer_value(stmt.expr, scope), ctx, stmt.expr.span)
            parts = [value] if len(refs) == 1 else split_parts(value, len(refs), stmt.expr.span)
            for i, (part, ref) in enumerate(zip(parts, refs)):
                if i:
                    out.append(NamedTensor("load", hold, stmt.span))
                # a single layer is named after its tensor (`q = linear(64)`: `q`) unless `as` names it
                fallback = ref.name if len(refs) == 1 and isinstance(part, Ref) else None
                out += self._apply(part, stmt.alias, ctx, names, stmt.span, stmt.expr, fallback)
                out.append(NamedTensor("save", ref.key, stmt.span))
        out.append(NamedTensor("load", hold, stmt.span))
        for ref in refs:
            bind_tensor(scope, ref, stmt.span)

    def visit_Reuse(self, stmt: ast.Reuse, scope, ctx, names, out) -> None:
        out.append(ReuseNode(reuse_path(stmt, scope), stmt.span))

    def _residual(self, stmt: ast.Residual, scope, ctx, names) -> list:
        """A residual node; with `when = false` just its body (MobileNet's blocks that change shape)."""
        kwargs = {k: (evaluate(v, scope), v.span, s) for k, v, s in stmt.kwargs}
        if stmt.args:
            raise error("arguments", "residual takes keyword arguments only (shortcut=..., when=...)",
                        stmt.args[0].span)
        for k, (_, _, s) in kwargs.items():
            if k not in ("shortcut", "when"):
                raise error("unknown-parameter", f"residual has no parameter '{k}'", s,
                            did_you_mean(k, ("shortcut", "when")) or "its parameters are: shortcut, when")
        if "when" in kwargs:
            when, vspan, _ = kwargs["when"]
            if not isinstance(when, bool):
                raise error("type", f"residual `when` must be true or false, got {type_name(when)}", vspan)
            if not when:
                return self._items(stmt.body, scope, ctx, names, finish=False)
        shortcut = []
        if "shortcut" in kwargs:
            value, vspan, _ = kwargs["shortcut"]
            shortcut = self._apply(concretize(value, ctx, vspan), None, ctx, names, vspan, None)
        body = self._items(stmt.body, scope, ctx, names, finish=False)
        return [ResidualNode(body, shortcut, ctx.drop_path, stmt.span)]

    def _parallel(self, stmt: ast.Parallel, scope, ctx, names) -> ParallelNode:
        split = parallel_split(stmt, scope, len(stmt.branches), "branches")
        if len(stmt.branches) < 1:
            raise error("value", "parallel needs at least one branch", stmt.span)
        branches = [self._items(b, scope, ctx, names, finish=False) for b in stmt.branches]
        return ParallelNode(stmt.merge, branches, split, stmt.span)

    def _parallel_for(self, stmt: ast.ParallelFor, scope, ctx, names) -> ParallelNode:
        """One branch per value of the loop, each `stmt.body` with the variable bound. The branches
        share the enclosing names: a name every iteration uses is numbered (`dilate1`, `dilate2`)."""
        if stmt.args:
            raise error("arguments", "parallel takes keyword arguments only (split = ...)", stmt.args[0].span)
        if stmt.stop is None:
            values = evaluate(stmt.items, scope)
            if not isinstance(values, list):
                raise error("type", f"parallel ... for {stmt.var} in X: X must be a list or a range a..b, "
                            f"got {type_name(values)}", stmt.items.span)
            where = stmt.items.span
        else:
            lo, hi = evaluate(stmt.items, scope), evaluate(stmt.stop, scope)
            for v, e in ((lo, stmt.items), (hi, stmt.stop)):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise error("type", f"range bounds must be ints, got {type_name(v)}", e.span)
            values = list(range(lo, hi))
            where = Span(stmt.items.span.file, stmt.items.span.line, stmt.items.span.column, stmt.stop.span.end_line,
                         stmt.stop.span.end_column)
        if not 1 <= len(values) <= 256:
            raise error("value", f"parallel ... for needs 1 to 256 values, got {len(values)}", where,
                        "a parallel needs at least one branch")
        split = parallel_split(stmt, scope, len(values), "values of the loop")
        shared = Numbered(names)
        branches = [self._items(stmt.body, scope.child({stmt.var: v}), ctx, shared, finish=False) for v in values]
        return ParallelNode(stmt.merge, branches, split, stmt.span)

    def _apply(self, value, alias, ctx, names: "Names", span: Span, expr, fallback: str | None = None) -> list:
        """Turn a value used as a statement into items: an op, a composite instance, or nothing."""
        if value is None:
            return []
        if isinstance(value, list):
            out = []
            for v in value:
                out += self._apply(v, None, ctx, names, span, None)
            return out
        if value.__class__ is Aliased:  # `[conv(8, 3) as proj, relu]`
            inner = concretize(value.value, ctx, value.span)
            if isinstance(inner, list) and len(inner) != 1:
                raise error("type", f"`as {value.alias}` names one layer, but this is a list of {len(inner)}",
                            value.span)
            return self._apply(inner, value.alias, ctx, names, value.span, None)
        if not isinstance(value, Ref):
            raise error("type", f"a statement must be an op or a block, got {type_name(value)}", span)
        base = alias or fallback or layer_name(expr) or value.name
        if value.kind == "part":
            raise error("type", f"'{value.name}' configures another op (e.g. attention's partition) and cannot be "
                        "applied to a tensor", span)
        if value.kind == "loss":
            raise error("type", f"'{value.name}' is a loss: name it as the model's objective, not as a layer", span,
                        f"write `loss = {value.name}(...)` in the model")
        if value.kind == "composite":
            node = SubSeq("", value.target.kind, self._instantiate(value, ctx), value.span, value.name)
        else:
            node = OpNode("", to_op(value), value.span)  # where the op was written, not where it was applied
        names.add(node, base, alias is not None, span)
        return [node]

    def _instantiate(self, ref: Ref, ctx: "Ctx") -> list:
        """A composite's items for these arguments. An instance depends on the block it is in only
        through its residuals' drop-path rate, unless a per-block value (alternate, linspace) was
        concretized while expanding it: other instances are kept (`speed.INSTANCES`) and copied on reuse."""
        comp: ast.CompositeDef = ref.target
        depth = ctx.depth + 1
        if depth > 32:
            raise error("recursion", f"'{comp.name}' expands into itself (more than 32 levels deep)", ref.span,
                        "give the recursion an end: a condition on an argument that stops it")
        names = self.unit.scopes.get(id(comp), self.unit.names)  # what its body sees (`_expand`)
        key = instance_key(comp, names, ref.args, depth)
        found = reused_instance(key, comp, names, ctx.drop_path)
        if found is not None:  # a copy: as much work as the items copied
            items, count = found
            budget.charge(STATEMENT_UNITS * count, ref.span, f"expanding '{comp.name}'")
            return items
        mark = instance_mark()
        items = self._expand(ref, comp, ctx, depth, names)
        keep_instance(key, comp, names, items, mark)
        return items

    def _expand(self, ref: Ref, comp: ast.CompositeDef, ctx: "Ctx", depth: int, names) -> list:
        given = dict(ref.args)
        # the body calls what its own file sees (`names`): a definition of the importing file never
        # changes an imported composite (the unit's names: a composite the loader did not see, e.g.
        # built in a test)
        scope = Scope(names)
        for p in comp.params:
            if p.name in given:
                scope.values[p.name] = given[p.name]
            elif p.default is not None:
                scope.values[p.name] = concretize(evaluate(p.default, scope), ctx, p.default.span)
            else:
                raise error("missing-argument", f"{comp.kind} '{comp.name}' needs argument '{p.name}'", ref.span,
                            f"call it as {comp.name}({', '.join(q.name for q in comp.params if q.default is None)})")
        try:
            inner = Ctx(ctx.stage_block, ctx.block, ctx.total, ctx.drop_path, depth, f"{comp.name}@{depth}.")
            return self._items(comp.body, scope, inner, Names())
        except ComposerError as exc:
            notes = exc.diagnostics[0].notes
            note = f"in {comp.kind} '{comp.name}' used at {ref.span}"
            if note not in notes:  # a block expanding into itself: each use of the cycle once
                notes.append(note)
            raise


class _StageBlocks(ast.NodeVisitor):
    """A stage's items in one iteration of its loop (`_Resolver._expand_stages`): lets bound in
    the stage's scope, and its blocks, (item, index in its repeat), repeat counts evaluated."""

    def visit_Let(self, item: ast.Let, sscope: Scope, blocks: list) -> None:
        if item.name in sscope.values:
            raise twice(item)
        sscope.values[item.name] = evaluate(item.value, sscope)

    def visit_Repeat(self, item: ast.Repeat, sscope: Scope, blocks: list) -> None:
        count = 1 if item.count is None else evaluate(item.count, sscope)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 10_000:
            raise error("type", f"repeat count must be an int from 0 to 10000, got {count!r}", item.count.span)
        budget.charge(count, item.count.span if item.count is not None else item.span, "this repeat")
        blocks += [(item, k) for k in range(count)]

    def visit_Reuse(self, item: ast.Reuse, sscope: Scope, blocks: list) -> None:
        blocks.append((item, 0))  # a block of its own

    def visit_Section(self, item: ast.Section, sscope: Scope, blocks: list) -> None:
        pass  # downsample and norm: `_StageSections`


_STAGE_BLOCKS = _StageBlocks()  # it keeps no state


class _StageSections(ast.NodeVisitor):
    """A stage's `downsample` and `after` (norm) sections, and whether the downsample comes after
    its blocks (`_Resolver._stage`)."""

    def __init__(self, resolver: _Resolver, sscope: Scope):
        self.resolver, self.sscope = resolver, sscope
        self.down, self.down_last, self.seen_block, self.norm = None, False, False, None

    def visit_Section(self, item: ast.Section) -> None:
        norm = item.kind == "norm"  # else a downsample
        if (self.norm if norm else self.down) is not None:
            raise error("redefinition", f"a stage has one {'norm' if norm else 'downsample'}", item.span)
        items = self.resolver._items(item.body, self.sscope, Ctx(), Names())
        if norm:
            self.norm = items
        else:
            self.down, self.down_last = items, self.seen_block

    def visit_Repeat(self, item: ast.Repeat) -> None:
        self.seen_block = True

    visit_Reuse = visit_Repeat

    def visit_Let(self, item: ast.Let) -> None:
        pass  # bound by `_StageBlocks`
