"""`composer convert FILE --to yaml|arch`: a blueprint in the other syntax, comments carried along.

.arch -> YAML writes the form of docs/yaml.md (read by composer/yaml_read.py): `imports`, then
`blocks`, `mixers` and `models`; every expression is a YAML string in the expression syntax
(`patch_embed(dims[0], 4)`), numbers and booleans stay YAML numbers and booleans, and an
expression too long for its line (or holding comments) is a `|-` block holding the canonical
.arch layout of it. Statements the YAML form of docs/yaml.md lacked have these forms:
`{save: name}`, `{from: name}`, residual `when:`, `{repeat: n, body: [...]}` and `{body: [...]}`
for an inline `repeat n { ... }` / `block { ... }`, `{parallel: {merge, split, for, in | range,
body}}` for `parallel MERGE for x in ... { ... }`, and "expr as name" items in a block's list value.

Comments: the file's header comment stays the header; a comment above a definition or
statement stays above its YAML entry (so a composite's doc comment stays its doc); a trailing
comment stays on its entry's line; comments inside an expression stay inside its `|-` block.

YAML -> .arch reads the file with the YAML front end and prints it with the canonical printer
(composer/format.py); the `#` comments of the YAML text are put back by position, as above.

What the round trip does not keep (the resolved architecture is always the same):
* the order of definitions: YAML groups them into `blocks`, `mixers` and `models`;
* the order of a model's statements where YAML groups them: one `let` mapping, one `set`
  mapping (settings and overrides other than `reference`, `paper` and `drop_path`) and one
  `stages` list, each where its first statement was;
* the place of a comment after a block's `}` (it moves to the line that opens the block, or
  above the next definition) and of a comment in the middle of a parameter list in YAML;
* the layout itself (.arch -> YAML -> .arch gives the canonical layout, as `composer fmt`).
Not representable in YAML at all (a located error, exit 2): positional arguments of `residual`
or `parallel`, keyword arguments other than residual `shortcut`/`when` and parallel `split`, a
model-level `let`, setting or section given twice, `reference`/`paper` that are not strings.
No torch here.

This module writes .arch -> YAML and converts files; YAML -> .arch and the round-trip check that
guards both directions are composer/convert_arch.py's (the YAML writer is composer/yaml_write.py,
the reader composer/yaml_read.py).
"""

from __future__ import annotations

from pathlib import Path

from . import ast
from .comments import END, Comment, Layout, end_of, start_of
from .convert_arch import check_round_trip, yaml_to_arch
from .diagnostics import error
from .files import read_source
from .format import Printer
from .pretty import render
from .yaml_write import Entry, Y, plain_ok, write_yaml, ystr


# ---- .arch -> YAML -------------------------------------------------------------------------------

def _not_yaml(what: str, span) -> Exception:
    return error("convert", f"{what} cannot be written in YAML", span)


class _ToYaml(ast.NodeVisitor):
    """An .arch AST as YAML nodes, comments attached; as a `NodeVisitor`, the statements of a body
    and the expressions that are values."""

    def __init__(self, text: str, name: str):
        self.L = Layout.arch_source(text, name)
        self.P = Printer(self.L)

    # -- comments
    def lead(self, comments: list[Comment], line: int) -> list[str]:
        """Comment lines above an item starting on `line`, blank lines between them kept."""
        out = []
        for k, c in enumerate(comments):
            if k and self.L.blank_between(comments[k - 1].line, c.line):
                out.append("")
            out.append(c.text)
        if comments and self.L.blank_between(comments[-1].line, line):
            out.append("")
        return out

    def entries(self, items, region):
        """Entries for `items` [(start, end, line, build)] in the block `region`, comments attached.
        build() -> list of Entry (one item may become several, or none)."""
        lo, hi = region
        after_open, per, dangling = self.L.attach(lo, hi, [(s, e) for s, e, _, _ in items])
        out = []
        for (s, e, line, build), (lead, trail) in zip(items, per):
            made = build()
            inner = self.L.take(s, e)  # comments inside the item that no entry placed
            made[0].lead = self.lead(lead + inner, line) + made[0].lead
            made[-1].trail = made[-1].trail + [c.text for c in trail]
            out += made
        return [c.text for c in after_open], out, [c.text for c in dangling]

    # -- values: an expression by its `visit_` method
    def value(self, e) -> Y:
        return self.visit(e)

    def visit_Literal(self, e: ast.Literal) -> Y:
        if isinstance(e.value, (bool, int, float)) and e.value is not None:
            text = render(self.P.expr(e))
            if plain_ok(text, e.value):
                return Y("scalar", text)
        return self.expr_string(e)

    def visit_ListExpr(self, e: ast.ListExpr) -> Y:
        if self.L.any(start_of(e), end_of(e)):
            return self.expr_string(e)
        return Y("seq", [Entry(None, self.expr_string(x.expr, x.alias) if isinstance(x, ast.Named)
                               else self.value(x)) for x in e.items])

    def _as_string(self, e) -> Y:
        return self.expr_string(e)

    visit_Name = visit_ListComp = visit_Index = visit_Call = visit_BinOp = visit_UnaryOp = _as_string
    visit_Conditional = visit_Named = _as_string

    def expr_string(self, e, alias: str | None = None, raw: bool = False) -> Y:
        has_comments = self.L.any(start_of(e), end_of(e))
        doc = self.P.expr(e)
        if alias:
            doc = [doc, " as ", alias]
        flat = render(doc, 10 ** 9)
        if not has_comments and "\n" not in flat and len(flat) <= 72 or not flat.replace("\n", "").isprintable():
            return ystr(flat)  # short, or with a control character (in a string) that only quotes can hold
        return Y("block", doc)

    def stmt_string(self, s: ast.Apply) -> Y:
        return self.expr_string(s.expr, s.alias)

    # -- statements
    def stmts(self, node, body, region=None) -> Y:
        if region is None:
            region, _ = self.P.region(node, start_of(body[0]) if body else None)
        items = [(start_of(s), end_of(s), s.span.line, (lambda s=s: [Entry(None, self.stmt(s))])) for s in body]
        after_open, entries, dangling = self.entries(items, region)
        return Y("seq", entries, dangling, after_open)

    def stmt(self, s) -> Y:
        return self.visit(s)

    def visit_Apply(self, s: ast.Apply) -> Y:
        return self.stmt_string(s)

    def visit_Let(self, s: ast.Let) -> Y:
        return Y("map", [Entry("let", Y("map", [Entry(s.name, self.value(s.value))]))])

    def visit_Save(self, s: ast.Save) -> Y:
        return Y("map", [Entry("save", ystr(s.name))])

    def visit_Load(self, s: ast.Load) -> Y:
        return Y("map", [Entry("from", ystr(s.name))])

    def visit_Reuse(self, s: ast.Reuse) -> Y:
        return Y("map", [Entry("reuse", ystr(s.path))])

    def visit_Bind(self, s: ast.Bind) -> Y:
        names = ystr(s.names[0]) if len(s.names) == 1 else Y("seq", [Entry(None, ystr(n)) for n in s.names])
        if s.body is not None:
            body = self.with_open(Entry("body", self.stmts(s, s.body)))
            return Y("map", [Entry("bind", names), Entry("body", body.node, trail=body.trail)])
        return Y("map", [Entry("bind", names), Entry("value", self.expr_string(s.expr, s.alias))])

    def visit_Residual(self, s: ast.Residual) -> Y:
        if s.args:
            raise _not_yaml("a positional argument of residual", s.args[0].span)
        body = self.with_open(Entry("body", self.stmts(s, s.body)))
        if not s.kwargs:
            return Y("map", [Entry("residual", body.node, trail=body.trail)])
        spec = []
        for k, v, span in s.kwargs:
            if k not in ("shortcut", "when"):
                raise _not_yaml(f"residual's argument '{k}'", span)
            spec.append(Entry(k, self.value(v)))
        return Y("map", [Entry("residual", Y("map", spec + [body], block_style=True))])

    def visit_Parallel(self, s: ast.Parallel) -> Y:
        spec = self.merge_spec(s)
        spec.append(self.with_open(Entry("branches", self.branches(s))))
        return Y("map", [Entry("parallel", Y("map", spec, block_style=True))])

    def visit_ParallelFor(self, s: ast.ParallelFor) -> Y:
        spec = self.merge_spec(s)
        spec.append(Entry("for", ystr(s.var)))
        if s.stop is None:
            spec.append(Entry("in", self.value(s.items)))
        else:
            spec.append(Entry("range", ystr(render(self.P.range(s.items, s.stop), 10 ** 9))))
        spec.append(self.with_open(Entry("body", self.stmts(s, s.body))))
        return Y("map", [Entry("parallel", Y("map", spec, block_style=True))])

    def merge_spec(self, s) -> list:
        """`merge` and `split` of a parallel (with branches or a loop)."""
        if s.args:
            raise _not_yaml("a positional argument of parallel", s.args[0].span)
        spec = [Entry("merge", ystr(s.merge))]
        for k, v, span in s.kwargs:
            if k != "split":
                raise _not_yaml(f"parallel's argument '{k}'", span)
            spec.append(Entry(k, self.value(v)))
        return spec

    def with_open(self, entry: Entry) -> Entry:
        entry.trail = entry.trail + entry.node.after_open
        return entry

    def branches(self, s: ast.Parallel) -> Y:
        first = s.branches[0][0] if s.branches and s.branches[0] else None
        region, _ = self.P.region(s, start_of(first) if first else None)
        items, prev = [], region[0]
        for b in s.branches:
            p = self.L.after("{", prev, start_of(b[0]))
            if p is not None and p in self.L.match:
                start, end = p, (self.L.match[p][0], self.L.match[p][1] + 1)
                inner = ((p[0], p[1] + 1), self.L.match[p])
            else:
                start, end, inner = start_of(b[0]), end_of(b[-1]), (start_of(b[0]), end_of(b[-1]))
            items.append((start, end, start[0], (lambda b=b, inner=inner: [self.branch(b, inner)])))
            prev = end
        after_open, entries, dangling = self.entries(items, region)
        return Y("seq", entries, dangling, after_open)

    def branch(self, b, inner) -> Entry:
        if len(b) == 1 and isinstance(b[0], ast.Apply) and not self.L.any(*inner):
            return Entry(None, self.stmt_string(b[0]))
        return self.with_open(Entry(None, self.stmts(None, b, inner)))

    def section(self, s: ast.Section) -> Entry:
        key = {"norm": "after"}.get(s.kind, s.kind)
        if len(s.body) == 1 and isinstance(s.body[0], ast.Apply):
            region, _ = self.P.region(s, start_of(s.body[0]))
            if not self.L.any(region[0], start_of(s.body[0])) and not self.L.any(end_of(s.body[0]), region[1]):
                return Entry(key, self.stmt_string(s.body[0]))
        return self.with_open(Entry(key, self.stmts(s, s.body)))

    # -- stages
    def stage(self, st: ast.Stage) -> Entry:
        spec = []
        if st.loop_var is not None:
            rng = render(self.P.expr(st.start), 10 ** 9) + ".." + render(self.P.expr(st.stop), 10 ** 9)
            spec += [Entry("for", ystr(st.loop_var)), Entry("range", ystr(rng))]
        region, _ = self.P.region(st, start_of(st.items[0]) if st.items else None)
        stage_item = _StageItem(self)
        items = [(start_of(i), end_of(i), i.span.line, (lambda i=i: [Entry(None, stage_item.visit(i))]))
                 for i in st.items]
        after_open, entries, dangling = self.entries(items, region)
        spec.append(Entry("body", Y("seq", entries, dangling), trail=after_open))
        return Entry(None, Y("map", spec))

    # -- definitions
    def params(self, d) -> Entry | None:
        if not d.params:
            return None
        p = self.L.after("(", start_of(d), start_of(d.params[0]))
        region = ((p[0], p[1] + 1), self.L.match.get(p, END)) if p is not None else (start_of(d), start_of(d.params[0]))
        items = [(start_of(q), end_of(q), q.span.line,
                  (lambda q=q: [Entry(q.name, Y("scalar", "null") if q.default is None else self.value(q.default))]))
                 for q in d.params]
        after_open, entries, dangling = self.entries(items, region)
        return Entry("params", Y("map", entries, dangling), trail=after_open)

    def composite(self, c: ast.CompositeDef) -> list:
        spec = [e for e in [self.params(c)] if e]
        body = self.with_open(Entry("body", self.stmts(c, c.body)))
        return spec + [body]

    def file(self, f: ast.File) -> str:
        items = sorted(f.imports + f.models + f.composites, key=start_of)
        after_open, per, dangling = self.L.attach((0, 0), END, [(start_of(i), end_of(i)) for i in items])
        lead_of = {}
        for item, (lead, trail) in zip(items, per):
            lead_of[id(item)] = (lead, trail)
        # the header: the comment lines from line 1 on, up to a blank line, when the file starts with them
        header: list[str] = []
        header_blank = True
        first_lead = per[0][0] if items else []
        if first_lead and first_lead[0].line == 1:
            run = [first_lead[0]]
            for c in first_lead[1:]:
                if c.line != run[-1].line + 1:
                    break
                run.append(c)
            header = [c.text for c in run]
            nxt = first_lead[len(run)].line if len(first_lead) > len(run) else items[0].span.line
            header_blank = self.L.blank_between(run[-1].line, nxt)
            per[0] = (first_lead[len(run):], per[0][1])
            lead_of[id(items[0])] = per[0]
        root: list[Entry] = []
        imports = [i for i in items if isinstance(i, ast.Import)]
        if imports:
            lead = []
            for i in imports:
                lead += [c.text for c in lead_of[id(i)][0]] + [c.text for c in lead_of[id(i)][1]]
            paths = [ystr(i.path) for i in imports]
            node = paths[0] if len(paths) == 1 else Y("seq", [Entry(None, p) for p in paths])
            root.append(Entry("imports", node, lead))
        for kind, key in (("block", "blocks"), ("mixer", "mixers"), ("model", "models")):
            defs = [d for d in items if (isinstance(d, ast.ModelDef) and kind == "model")
                    or (isinstance(d, ast.CompositeDef) and d.kind == kind)]
            if not defs:
                continue
            entries = []
            for d in defs:
                lead, trail = lead_of[id(d)]
                lead_lines = self.lead(lead, d.span.line)
                if isinstance(d, ast.ModelDef):
                    spec, after_open, dangling_in = self.model(d)
                else:
                    spec, after_open, dangling_in = self.composite(d), [], []
                    if _doc_of(lead_lines) != d.doc:
                        spec.insert(0, Entry("doc", ystr(d.doc)))
                extra = [c.text for c in self.L.take(start_of(d), end_of(d))]
                entries.append(Entry(d.name, Y("map", spec, dangling_in, block_style=True), lead_lines + extra,
                                     after_open + [c.text for c in trail]))
            root.append(Entry(key, Y("map", entries)))
        tail = [c.text for c in dangling + self.L.rest()]
        if not header and f.doc and not root:
            header = ["# " + x if x else "#" for x in f.doc.split("\n")]
        return write_yaml(Y("map", root), header, tail, header_blank)

    def model(self, m: ast.ModelDef):
        """(entries, comments after its `{`, comments before its `}`)."""
        spec = [e for e in [self.params(m)] if e]
        if m.base:
            spec.append(Entry("base", ystr(m.base)))
        region, _ = self.P.region(m, start_of(m.body[0]) if m.body else None)
        groups: dict = {}
        entry_of = _ModelEntry(self)
        after_open, per, dangling = self.L.attach(*region, [(start_of(s), end_of(s)) for s in m.body])
        for s, (lead, trail) in zip(m.body, per):
            entry, key = entry_of.visit(s)
            inner = self.L.take(start_of(s), end_of(s))
            entry.lead = self.lead(lead + inner, s.span.line) + entry.lead
            entry.trail = entry.trail + [c.text for c in trail]
            if key is None:
                spec.append(entry)
            elif key in groups:
                groups[key].node.value.append(entry)
            else:  # a group is an entry where its first statement was
                groups[key] = Entry(key, Y("seq" if key == "stages" else "map", [entry]))
                spec.append(groups[key])
        return spec, [c.text for c in after_open], [c.text for c in dangling]


class _StageItem(ast.NodeVisitor):
    """An item of a stage as a YAML node (`_ToYaml.stage`)."""

    def __init__(self, w: _ToYaml):
        self.w = w

    def visit_Let(self, i: ast.Let) -> Y:
        return self.w.stmt(i)

    visit_Reuse = visit_Let

    def visit_Section(self, i: ast.Section) -> Y:
        return Y("map", [self.w.section(i)])

    def visit_Repeat(self, i: ast.Repeat) -> Y:
        w, spec = self.w, []
        if i.count is not None:
            spec.append(Entry("repeat", w.value(i.count)))
            if i.var is not None:
                spec.append(Entry("as", ystr(i.var)))
        if isinstance(i.block, tuple):
            spec.append(w.with_open(Entry("body", w.stmts(i, i.block))))
        else:
            spec.append(Entry("block", w.value(i.block) if isinstance(i.block, ast.ListExpr)
                              else w.expr_string(i.block)))
        return Y("map", spec)


class _ModelEntry(ast.NodeVisitor):
    """A model's statement as (entry, the group it goes into or None) (`_ToYaml.model`); YAML has
    one key per model-level setting, let and section."""

    def __init__(self, w: _ToYaml):
        self.w, self.seen = w, set()

    def once(self, key, span) -> None:
        if key in self.seen:
            raise _not_yaml(f"a second model-level {key if isinstance(key, str) else key[1]!r}", span)
        self.seen.add(key)

    def visit_Assign(self, s: ast.Assign):
        if s.name in ("reference", "paper", "drop_path"):
            self.once(s.name, s.span)
            if s.name != "drop_path":
                if not (isinstance(s.value, ast.Literal) and isinstance(s.value.value, str)):
                    raise _not_yaml(f"a {s.name} that is not a string", s.value.span)
                return Entry(s.name, ystr(s.value.value)), None
            return Entry(s.name, self.w.value(s.value)), None
        return self._grouped("set", s)

    def visit_Let(self, s: ast.Let):
        return self._grouped("let", s)

    def _grouped(self, key: str, s):
        self.once((key, s.name), s.span)
        return Entry(s.name, self.w.value(s.value)), key

    def visit_Input(self, s: ast.Input):
        self.once("input", s.span)
        return Entry("input", self.w.value(s.expr)), None

    def visit_Section(self, s: ast.Section):
        self.once(s.kind, s.span)
        return self.w.section(s), None

    def visit_Stage(self, s: ast.Stage):
        return self.w.stage(s), "stages"


def _doc_of(lead_lines: list[str]) -> str:
    """The doc YAML's front end reads from these comment lines directly above a key."""
    out = []
    for line in reversed(lead_lines):
        if not line.lstrip().startswith("#"):
            break
        out.append(line.lstrip()[1:].strip())
    return "\n".join(reversed(out))


def arch_to_yaml(text: str, name: str = "<string>") -> str:
    """YAML text for the .arch blueprint `text` (checked: it reads back to the same blueprint)."""
    from .parse import parse_text
    from .yaml_read import parse_yaml

    tree = parse_text(text, name)
    out = _ToYaml(text, name).file(tree)
    check_round_trip(tree, lambda: parse_yaml(out, name + " (as YAML)"), name, "YAML")
    return out


# ---- converting ----------------------------------------------------------------------------------

def convert_text(text: str, name: str, source: str, to: str) -> str:
    """`text` (`source`: "arch" or "yaml") in the syntax `to`."""
    if source == to:
        if source == "arch":
            from .parse import parse_text

            parse_text(text, name)
        else:
            from .yaml_read import parse_yaml

            parse_yaml(text, name)
        return text
    return arch_to_yaml(text, name) if to == "yaml" else yaml_to_arch(text, name)


def convert_file(path: Path, to: str) -> str:
    """The blueprint file `path` in the syntax `to` ("arch" or "yaml")."""
    if path.name.endswith(".port.yaml"):
        raise error("io", f"{path} is a weight map (.port.yaml), not a blueprint")
    if path.suffix in (".yaml", ".yml"):
        source = "yaml"
    elif path.suffix == ".arch":
        source = "arch"
    else:
        raise error("io", f"{path}: not a blueprint (.arch, .yaml or .yml)")
    if not path.is_file():
        raise error("io", f"no such file: {path}")
    return convert_text(read_source(path), str(path), source, to)
