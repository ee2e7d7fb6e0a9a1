"""`composer convert FILE --to yaml|arch`: a blueprint in the other syntax, comments carried along.

.arch -> YAML writes the form of docs/yaml.md (read by composer/yaml_front.py): `imports`, then
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
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import ast
from .diagnostics import error
from .files import write_atomic
from .format import END, Comment, Layout, Printer, _end, _start, render

WIDTH = 100


# ---- a small YAML writer with comments ------------------------------------------------------------

@dataclass
class Y:
    kind: str  # "scalar" (text), "block" (a document rendered as a |- block), "seq", "map"
    value: object = None  # scalar text, block doc, or a list of Entry
    dangling: list = field(default_factory=list)  # comment lines after the last item
    after_open: list = field(default_factory=list)  # comments on the line that opens it (.arch `{`)
    block_style: bool = False  # never written as a flow collection

    def depth(self) -> int:
        if self.kind in ("scalar", "block"):
            return 0
        return 1 + max((e.node.depth() for e in self.value), default=0)

    def flow(self) -> str | None:
        """The flow form (one line), or None when it has comments or multi-line parts."""
        if self.kind == "scalar":
            return self.value
        if self.kind == "block" or self.dangling or self.block_style or self.depth() > 2:
            return None
        parts = []
        for e in self.value:
            if e.lead or e.trail:
                return None
            f = e.node.flow()
            if f is None:
                return None
            parts.append(f if e.key is None else f"{e.key}: {f}")
        return ("[" if self.kind == "seq" else "{") + ", ".join(parts) + ("]" if self.kind == "seq" else "}")


@dataclass
class Entry:
    key: str | None  # None: a sequence item
    node: Y
    lead: list = field(default_factory=list)  # comment lines above; "" is a blank line
    trail: list = field(default_factory=list)  # comments at the end of its first line


def _plain_ok(s: str, value) -> bool:
    import yaml

    if not s or s != s.strip() or any(ch in s for ch in ",[]{}#\"'") or ": " in s or s.endswith(":") \
            or s[0] in "-?:&*!|>%@`":
        return False
    try:
        back = yaml.safe_load(s)
    except yaml.YAMLError:
        return False
    return type(back) is type(value) and back == value


def ystr(s: str) -> Y:
    """A YAML string scalar whose value is exactly `s`."""
    if not s.isprintable():  # a newline or a control character: YAML reads these only escaped
        return Y("scalar", '"' + s.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"')
    return Y("scalar", s if _plain_ok(s, s) else "'" + s.replace("'", "''") + "'")


def _write_value(out: list, head: str, node: Y, indent: int, trail: list) -> None:
    comment = "".join("  " + c for c in trail[:1])
    extra = trail[1:]
    if node.kind == "scalar":
        out.append(f"{head} {node.value}{comment}")
    elif node.kind == "block":
        out.append(f"{head} |-{comment}")
        width = max(40, WIDTH - indent - 2)
        for line in render(node.value, width).split("\n"):
            out.append(" " * (indent + 2) + line if line else "")
    else:
        flow = node.flow()
        if flow is not None and not extra and len(head) + 1 + len(flow) <= WIDTH:
            out.append(f"{head} {flow}{comment}")
            return
        out.append(f"{head}{comment}")
        _write_items(out, node, indent + 2, extra)
        return
    for c in extra:
        out.append(" " * (indent + 2) + c)


def _write_items(out: list, node: Y, indent: int, first_lead=()) -> None:
    pad = " " * indent
    for k, e in enumerate(node.value):
        lead = (list(first_lead) if k == 0 else []) + e.lead
        if lead and lead[0] and out and out[-1].lstrip().startswith("#") \
                and len(out[-1]) - len(out[-1].lstrip()) > indent:
            out.append("")  # a comment closing the block above is not part of this entry's doc
        for c in lead:
            out.append(pad + c if c else "")
        if e.key is not None:
            _write_value(out, pad + e.key + ":", e.node, indent, e.trail)
        elif e.node.kind == "map" and e.node.value and (
                e.node.flow() is None or len(pad) + 2 + len(e.node.flow()) > WIDTH or e.trail):
            # `- key: value` with the mapping's other keys below, aligned
            first, rest = e.node.value[0], e.node.value[1:]
            for c in first.lead:
                out.append(pad + c if c else "")
            _write_value(out, pad + "- " + first.key + ":", first.node, indent + 2, e.trail + first.trail)
            _write_items(out, Y("map", rest, e.node.dangling), indent + 2)
        else:
            _write_value(out, pad + "-", e.node, indent, e.trail)
    for c in node.dangling:
        out.append(pad + c if c else "")


def write_yaml(root: Y, header: list[str], tail: list[str], header_blank: bool = True) -> str:
    out = list(header)
    if header and root.value and header_blank:
        out.append("")
    _write_items(out, root, 0)
    if tail:
        out += [""] + tail if out else tail
    return "\n".join(out) + "\n"


# ---- .arch -> YAML -------------------------------------------------------------------------------

def _not_yaml(what: str, span) -> Exception:
    return error("convert", f"{what} cannot be written in YAML", span)


class _ToYaml:
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

    # -- values
    def value(self, e) -> Y:
        if isinstance(e, ast.Literal) and isinstance(e.value, (bool, int, float)) and e.value is not None:
            text = render(self.P.expr(e))
            if _plain_ok(text, e.value):
                return Y("scalar", text)
        if isinstance(e, ast.ListExpr) and not self.L.any(_start(e), _end(e)):
            return Y("seq", [Entry(None, self.expr_string(x.expr, x.alias) if isinstance(x, ast.Named)
                                   else self.value(x)) for x in e.items])
        return self.expr_string(e)

    def expr_string(self, e, alias: str | None = None, raw: bool = False) -> Y:
        has_comments = self.L.any(_start(e), _end(e))
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
            region, _ = self.P.region(node, _start(body[0]) if body else None)
        items = [(_start(s), _end(s), s.span.line, (lambda s=s: [Entry(None, self.stmt(s))])) for s in body]
        after_open, entries, dangling = self.entries(items, region)
        return Y("seq", entries, dangling, after_open)

    def stmt(self, s) -> Y:
        if isinstance(s, ast.Apply):
            return self.stmt_string(s)
        if isinstance(s, ast.Let):
            return Y("map", [Entry("let", Y("map", [Entry(s.name, self.value(s.value))]))])
        if isinstance(s, ast.Save):
            return Y("map", [Entry("save", ystr(s.name))])
        if isinstance(s, ast.Load):
            return Y("map", [Entry("from", ystr(s.name))])
        if isinstance(s, ast.Reuse):
            return Y("map", [Entry("reuse", ystr(s.path))])
        if isinstance(s, ast.Residual):
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
        if isinstance(s, ast.Parallel):
            spec = self.merge_spec(s)
            spec.append(self.with_open(Entry("branches", self.branches(s))))
            return Y("map", [Entry("parallel", Y("map", spec, block_style=True))])
        if isinstance(s, ast.ParallelFor):
            spec = self.merge_spec(s)
            spec.append(Entry("for", ystr(s.var)))
            if s.stop is None:
                spec.append(Entry("in", self.value(s.items)))
            else:
                spec.append(Entry("range", ystr(render(self.P.range(s.items, s.stop), 10 ** 9))))
            spec.append(self.with_open(Entry("body", self.stmts(s, s.body))))
            return Y("map", [Entry("parallel", Y("map", spec, block_style=True))])
        raise _not_yaml(f"a {type(s).__name__.lower()} statement here", s.span)

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
        region, _ = self.P.region(s, _start(first) if first else None)
        items, prev = [], region[0]
        for b in s.branches:
            p = self.L.after("{", prev, _start(b[0]))
            if p is not None and p in self.L.match:
                start, end = p, (self.L.match[p][0], self.L.match[p][1] + 1)
                inner = ((p[0], p[1] + 1), self.L.match[p])
            else:
                start, end, inner = _start(b[0]), _end(b[-1]), (_start(b[0]), _end(b[-1]))
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
            region, _ = self.P.region(s, _start(s.body[0]))
            if not self.L.any(region[0], _start(s.body[0])) and not self.L.any(_end(s.body[0]), region[1]):
                return Entry(key, self.stmt_string(s.body[0]))
        return self.with_open(Entry(key, self.stmts(s, s.body)))

    # -- stages
    def stage(self, st: ast.Stage) -> Entry:
        spec = []
        if st.loop_var is not None:
            rng = render(self.P.expr(st.start), 10 ** 9) + ".." + render(self.P.expr(st.stop), 10 ** 9)
            spec += [Entry("for", ystr(st.loop_var)), Entry("range", ystr(rng))]
        region, _ = self.P.region(st, _start(st.items[0]) if st.items else None)
        items = [(_start(i), _end(i), i.span.line, (lambda i=i: [Entry(None, self.stage_item(i))])) for i in st.items]
        after_open, entries, dangling = self.entries(items, region)
        spec.append(Entry("body", Y("seq", entries, dangling), trail=after_open))
        return Entry(None, Y("map", spec))

    def stage_item(self, i) -> Y:
        if isinstance(i, (ast.Let, ast.Reuse)):
            return self.stmt(i)
        if isinstance(i, ast.Section):
            return Y("map", [self.section(i)])
        if isinstance(i, ast.Repeat):
            spec = []
            if i.count is not None:
                spec.append(Entry("repeat", self.value(i.count)))
                if i.var is not None:
                    spec.append(Entry("as", ystr(i.var)))
            if isinstance(i.block, tuple):
                spec.append(self.with_open(Entry("body", self.stmts(i, i.block))))
            else:
                spec.append(Entry("block", self.value(i.block) if isinstance(i.block, ast.ListExpr)
                                  else self.expr_string(i.block)))
            return Y("map", spec)
        raise _not_yaml(f"a {type(i).__name__.lower()} in a stage", i.span)

    # -- definitions
    def params(self, d) -> Entry | None:
        if not d.params:
            return None
        p = self.L.after("(", _start(d), _start(d.params[0]))
        region = ((p[0], p[1] + 1), self.L.match.get(p, END)) if p is not None else (_start(d), _start(d.params[0]))
        items = [(_start(q), _end(q), q.span.line,
                  (lambda q=q: [Entry(q.name, Y("scalar", "null") if q.default is None else self.value(q.default))]))
                 for q in d.params]
        after_open, entries, dangling = self.entries(items, region)
        return Entry("params", Y("map", entries, dangling), trail=after_open)

    def composite(self, c: ast.CompositeDef) -> list:
        spec = [e for e in [self.params(c)] if e]
        body = self.with_open(Entry("body", self.stmts(c, c.body)))
        return spec + [body]

    def file(self, f: ast.File) -> str:
        items = sorted(f.imports + f.models + f.composites, key=_start)
        after_open, per, dangling = self.L.attach((0, 0), END, [(_start(i), _end(i)) for i in items])
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
                extra = [c.text for c in self.L.take(_start(d), _end(d))]
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
        region, _ = self.P.region(m, _start(m.body[0]) if m.body else None)
        groups: dict = {}
        seen: set = set()

        def once(key, span):
            if key in seen:
                raise _not_yaml(f"a second model-level {key if isinstance(key, str) else key[1]!r}", span)
            seen.add(key)

        def build(s):
            """(entry, the group it goes into or None)"""
            if isinstance(s, ast.Assign) and s.name in ("reference", "paper", "drop_path"):
                once(s.name, s.span)
                if s.name != "drop_path":
                    if not (isinstance(s.value, ast.Literal) and isinstance(s.value.value, str)):
                        raise _not_yaml(f"a {s.name} that is not a string", s.value.span)
                    return Entry(s.name, ystr(s.value.value)), None
                return Entry(s.name, self.value(s.value)), None
            if isinstance(s, (ast.Assign, ast.Let)):
                key = "set" if isinstance(s, ast.Assign) else "let"
                once((key, s.name), s.span)
                return Entry(s.name, self.value(s.value)), key
            if isinstance(s, ast.Input):
                once("input", s.span)
                return Entry("input", self.value(s.expr)), None
            if isinstance(s, ast.Section):
                once(s.kind, s.span)
                return self.section(s), None
            if isinstance(s, ast.Stage):
                return self.stage(s), "stages"
            raise _not_yaml(f"a {type(s).__name__.lower()} in a model", s.span)

        after_open, per, dangling = self.L.attach(*region, [(_start(s), _end(s)) for s in m.body])
        for s, (lead, trail) in zip(m.body, per):
            entry, key = build(s)
            inner = self.L.take(_start(s), _end(s))
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
    from .yaml_front import parse_yaml

    tree = parse_text(text, name)
    out = _ToYaml(text, name).file(tree)
    _check(tree, lambda: parse_yaml(out, name + " (as YAML)"), name, "YAML")
    return out


# ---- YAML -> .arch ---------------------------------------------------------------------------------

def yaml_comments(text: str) -> list[Comment]:
    """The `#` comments of YAML text, by position; inside a `|`/`>` block (an expression) the
    comments of the expression, outside strings."""
    import yaml

    mask = bytearray(len(text))  # 1: inside a plain or quoted scalar, 2: inside a block scalar
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        root = None
    todo = [root] if root is not None else []
    while todo:
        node = todo.pop()
        if isinstance(node, yaml.ScalarNode):
            kind = 2 if node.style in ("|", ">") else 1
            for i in range(node.start_mark.index, min(node.end_mark.index, len(text))):
                mask[i] = kind
        elif isinstance(node, yaml.SequenceNode):
            todo += node.value
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                todo += [k, v]
    out, at = [], 0
    for n, line in enumerate(text.split("\n"), 1):
        in_str = False
        for i, ch in enumerate(line):
            m = mask[at + i] if at + i < len(mask) else 0
            if m == 1:
                continue
            if m == 2 and ch == '"':
                in_str = not in_str
            elif ch == "#" and (m == 2 and not in_str or m == 0 and (i == 0 or line[i - 1] in " \t")):
                out.append(Comment(n, i + 1, line[i:].rstrip(), not line[:i].strip()))
                break
        at += len(line) + 1
    return out


def yaml_to_arch(text: str, name: str = "<string>") -> str:
    """Canonical .arch text for the YAML blueprint `text`, its comments put back by position."""
    from .yaml_front import parse_yaml

    tree = parse_yaml(text, name)

    def oneline(node, start, end) -> bool:
        """One line (when it fits): a model that only sets values, or a block written on one line."""
        if isinstance(node, ast.ModelDef):
            return node.base is not None and bool(node.body) and all(isinstance(s, ast.Assign) for s in node.body)
        return start[0] == end[0]

    order = sorted(tree.imports, key=_start) + sorted(tree.models + tree.composites, key=_start)
    # comments below a definition, indented deeper than its name, are inside it (before its `}`)
    lines, ends = text.split("\n"), {}
    for d in tree.models + tree.composites:
        end, k = None, d.span.end_line
        while k < len(lines):
            stripped = lines[k].lstrip()
            if stripped and not (stripped.startswith("#") and len(lines[k]) - len(stripped) >= d.span.column):
                break
            if stripped:
                end = (k + 1, len(lines[k]) + 1)
            k += 1
        if end is not None:
            ends[id(d)] = end
    extra: set = set()
    header = None
    for _ in range(2):  # a doc the comments do not give (a `doc:` key) is written as comments above
        printer = Printer(Layout(text, name, yaml_comments(text)), oneline=oneline)
        printer.ends = ends
        printer.extra_lead = {id(c): ["# " + x if x else "#" for x in c.doc.split("\n")]
                              for c in tree.composites if c.name in extra}
        out = printer.file(tree, order=order, header_doc=header)
        back = _quiet_parse(out, name + " (as .arch)")
        docs = {c.name: c.doc for c in back.composites}
        extra = {c.name for c in tree.composites if c.doc and docs.get(c.name) != c.doc}
        header = tree.doc.split("\n") if tree.doc and back.doc != tree.doc else None
        if not extra and header is None:
            break
    _check(tree, lambda: back, name, ".arch")  # `back`: the parse of this `out`
    return out


@contextlib.contextmanager
def _sources_kept():
    """Parses of converted text leave the registered sources (for diagnostics) as they were."""
    from .source import SOURCES

    saved = dict(SOURCES)
    try:
        yield
    finally:
        SOURCES.clear()
        SOURCES.update(saved)


def _quiet_parse(text: str, name: str):
    from .parse import parse_text

    with _sources_kept():
        try:
            return parse_text(text, name)
        except Exception as exc:
            raise RuntimeError(f"convert produced .arch that does not parse ({name}): {exc}") from None


# ---- checking ---------------------------------------------------------------------------------------

def _canon(x):
    """`shape` of an AST, with the freedom the YAML form takes: definitions by name, a model's
    statements in any order, negative number literals as negations, no docs."""
    if isinstance(x, ast.File):
        return (tuple(sorted(i.path for i in x.imports)),
                tuple(sorted((c.kind, c.name, _canon(c.params), _canon(c.body)) for c in x.composites)),
                tuple(sorted((m.name, _canon(m.params), m.base, tuple(sorted(map(repr, _canon(m.body)))))
                             for m in x.models)))
    if isinstance(x, ast.Literal) and isinstance(x.value, (int, float)) and not isinstance(x.value, bool) \
            and (x.value < 0 or str(x.value).startswith("-")):
        return ("UnaryOp", ("op", "-"), ("operand", ("Literal", ("value", _canon(-x.value)))))
    if isinstance(x, (list, tuple)):
        return tuple(_canon(y) for y in x)
    if type(x).__name__ == "Span":
        return None
    if hasattr(x, "__dataclass_fields__"):
        import dataclasses

        return (type(x).__name__,) + tuple((f.name, _canon(getattr(x, f.name))) for f in dataclasses.fields(x)
                                           if f.name not in ("span", "file", "doc"))
    if isinstance(x, float):
        return ("float", x)
    return x


def _check(tree, reparse, name: str, what: str) -> None:
    with _sources_kept():
        try:
            again = reparse()
        except Exception as exc:  # a converter bug: never hand back text that does not read back
            raise RuntimeError(f"convert produced {what} that does not read back for {name}: {exc}") from None
    if _canon(again) != _canon(tree):
        raise RuntimeError(f"convert would change the blueprint {name} (a converter bug); nothing written")


# ---- the command ----------------------------------------------------------------------------------

def convert_text(text: str, name: str, source: str, to: str) -> str:
    """`text` (`source`: "arch" or "yaml") in the syntax `to`."""
    if source == to:
        if source == "arch":
            from .parse import parse_text

            parse_text(text, name)
        else:
            from .yaml_front import parse_yaml

            parse_yaml(text, name)
        return text
    return arch_to_yaml(text, name) if to == "yaml" else yaml_to_arch(text, name)


def main(args) -> int:
    """`composer convert FILE --to yaml|arch [-o OUT]`: 0 written, 2 error."""
    path = Path(args.file)
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
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error("io", f"cannot read {path}: {exc}") from None
    out = convert_text(text, str(path), source, args.to)
    if getattr(args, "output", None):
        try:
            write_atomic(Path(args.output), out)
        except OSError as exc:
            raise error("io", f"cannot write {args.output}: {exc.strerror or exc}") from None
    else:
        sys.stdout.write(out)
    return 0
