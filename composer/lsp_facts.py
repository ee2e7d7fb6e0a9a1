"""What the language server (composer/lsp.py) tells about a checked buffer: hovers (an op's or a
composite's documentation, a statement's shapes, parameters and MACs from the plans), completion
items, definitions and document symbols. Positions are 0-based lines and code points; no pygls and
no torch here. The statement under a position is mapped to plan steps by their spans: every step
records where it was written, so a statement's steps are those whose span lies inside it."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from . import ast
from .lsp_check import Analysis, name_range, same_file, span_range
from .ops import OPS
from .source import SOURCES, Span

MAX_MODELS, MAX_PLACES = 3, 4  # a hover on a statement lists at most this many models, places per model
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Item:
    """A completion item: `kind` is op, part, loss, block, mixer, parameter, file or model."""

    label: str
    kind: str
    detail: str = ""
    doc: str = ""
    insert: str | None = None
    replace_from: int | None = None  # the character where the text it replaces starts (import paths)


@dataclass
class Symbol:
    name: str
    kind: str  # model, block, mixer, section, stage
    detail: str
    range: tuple
    selection: tuple
    children: list = field(default_factory=list)


def word_at(text: str, line: int, character: int) -> tuple[str, int, int] | None:
    """The identifier at (or just before) a position: (word, start, end) on that line."""
    rows = text.split("\n")
    if not 0 <= line < len(rows):
        return None
    for m in _WORD.finditer(rows[line]):
        if m.start() <= character <= m.end():
            return m.group(), m.start(), m.end()
    return None


def _inside(span: Span, line: int, character: int) -> bool:
    a, b, c, d = span_range(span)
    return (a, b) <= (line, character) <= (c, d)


def _within(inner: Span, outer: Span) -> bool:
    return (outer.line, outer.column) <= (inner.line, inner.column) and \
        (inner.end_line, inner.end_column) <= (outer.end_line, outer.end_column)


# ---- statements -------------------------------------------------------------------------------


class _Statements(ast.NodeVisitor):
    """`visit(node, out)`: the statements of a definition body, nested ones included, into `out`."""

    def _leaf(self, node, out: list) -> None:
        out.append(node)

    visit_Input = visit_Let = visit_Assign = visit_Apply = visit_Save = visit_Load = visit_Reuse = _leaf
    visit_Repeat = _leaf

    def _body(self, node, out: list) -> None:
        out.append(node)
        for s in node.body:
            self.visit(s, out)

    visit_Section = visit_Residual = visit_ParallelFor = _body

    def visit_Bind(self, node: ast.Bind, out: list) -> None:
        out.append(node)
        for s in node.body or ():
            self.visit(s, out)

    def visit_Stage(self, node: ast.Stage, out: list) -> None:
        out.append(node)
        for s in node.items:
            self.visit(s, out)

    def visit_Parallel(self, node: ast.Parallel, out: list) -> None:
        out.append(node)
        for branch in node.branches:
            for s in branch if isinstance(branch, tuple) else (branch,):
                self.visit(s, out)


_STATEMENTS = _Statements()


def statements(file: ast.File) -> list:
    """Every statement of the file's models and composites, outer ones before the ones they hold."""
    out: list = []
    for d in file.models + file.composites:
        for s in d.body:
            _STATEMENTS.visit(s, out)
    return out


def statement_at(file: ast.File, line: int, character: int):
    """The innermost statement at a position, or None."""
    best = None
    for s in statements(file):
        if s.span is not None and _inside(s.span, line, character):
            if best is None or _within(s.span, best.span):
                best = s
    return best


# ---- hovers -----------------------------------------------------------------------------------


def hover(analysis: Analysis, line: int, character: int, unit=None) -> str | None:
    """Markdown for a hover: the shapes at the statement under the position (per model), and the
    documentation of the op, composite or model named there. `unit`: the last unit that loaded
    (names stay documented while the text does not parse)."""
    unit = analysis.unit or unit
    parts = []
    word = word_at(analysis.text, line, character)
    file = analysis.file
    header = None  # the model whose name (in `model NAME`) is under the position
    if file is not None and word is not None:
        header = next((m for m in file.models if m.name == word[0]
                       and name_range(analysis.text, m.span, m.name)[:2] == (line, word[1])), None)
    if header is not None and header.name in analysis.plans:
        parts.append(model_summary(analysis.plans[header.name]))
    elif file is not None and analysis.plans:
        stmt = statement_at(file, line, character)
        if stmt is not None and not isinstance(stmt, (ast.Let, ast.Assign)):
            text = statement_shapes(analysis, stmt.span)
            if text:
                parts.append(text)
    if word is not None and header is None:
        doc = name_doc(word[0], unit)
        if doc:
            parts.append(doc)
    return "\n\n---\n\n".join(parts) or None


def model_summary(p) -> str:
    return (f"**model {p.name}**: {p.input_kind} `{p.input}` → `{p.head.y}`  \n"
            f"{p.params:,} params · {count(p.macs)}MACs")


def count(n: int) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} "


def occurrences(p, span: Span) -> list[list]:
    """The runs of steps of plan `p` written inside `span` (one run per place the statement is
    used: each block of a repeat, each use of a composite), outermost steps only."""
    runs: list = []

    def walk(steps: list) -> None:
        run: list = []
        for s in steps:
            if s.span is not None and same_span_file(s.span, span) and _within(s.span, span):
                run.append(s)
                continue
            if run:
                runs.append(run)
                run = []
            for child in s.children():
                walk(child)
        if run:
            runs.append(run)

    for section in p.sections:
        if section.span is not None and same_span_file(section.span, span) and _within(section.span, span):
            runs.append([section])  # a stage's block, written by this `repeat` or `block`
        else:
            walk(section.steps)
    return runs


def same_span_file(a: Span, b: Span) -> bool:
    return a.file == b.file or same_file(a.file, b.file)


def statement_shapes(analysis: Analysis, span: Span) -> str | None:
    """The output shape, parameters and MACs at a statement, per model of the file and place."""
    found: dict = {}  # the lines of a model's places -> the models giving exactly those
    for name, p in analysis.plans.items():
        runs = occurrences(p, span)
        if not runs:
            continue
        if len(runs) == 1 and len(analysis.plans) == 1:
            return _place(runs[0], single=True)
        rows = [_place(run) for run in runs[:MAX_PLACES]]
        if len(runs) > MAX_PLACES:
            rest = runs[MAX_PLACES:]
            params = sum(s.params for r in rest for s in r)
            macs = sum(s.macs for r in rest for s in r)
            rows.append(f"... {len(rest)} more places ({params:,} params, {count(macs)}MACs)")
        found.setdefault(tuple(rows), []).append(name)
    lines = []
    for rows, names in list(found.items())[:MAX_MODELS]:
        lines.append("**" + ", ".join(names) + "**")
        lines += ["- " + r for r in rows]
    if len(found) > MAX_MODELS:
        lines.append(f"... and {len(found) - MAX_MODELS} more models of this file")
    return "\n".join(lines) or None


def _place(run: list, single: bool = False) -> str:
    params = sum(s.params for s in run)
    macs = sum(s.macs for s in run)
    shape = f"`{run[0].x}` → `{run[-1].y}`"
    where = _common_path([s.path for s in run])
    if single:
        return f"**output** `{run[-1].y}` (input `{run[0].x}`) at `{where}`  \n{params:,} params · {count(macs)}MACs"
    return f"`{where}`: {shape}, {params:,} params, {count(macs)}MACs"


def _common_path(paths: list) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        out.append(group[0])
    return ".".join(out) or paths[0]


def name_doc(word: str, unit) -> str | None:
    """The documentation of an op, or of a composite or model the unit sees."""
    if word in OPS:
        return op_doc(word)
    if unit is not None and word in unit.names.composites:
        return composite_doc(unit.names.composites[word])
    if unit is not None and word in unit.models:
        m = unit.models[word]
        base = f" : {m.base}" if m.base else ""
        return f"**model {m.name}**{_signature(m.params)}{base}  \n{_where(m.span)}"
    return None


@functools.lru_cache(maxsize=None)
def _op_listing() -> dict:
    from .catalog import listing

    return {o["name"]: o for o in listing("ops")}


def op_doc(name: str) -> str:
    o = _op_listing()[name]
    head = f"**{name}** ({o['kind']}, {o['category']}, layout {o['layout']})"
    rows = [head, "", o["doc"]]
    if o["params"]:
        rows.append("")
        rows.append("Parameters:")
        for p in o["params"]:
            extra = ", ".join(x for x in (p["range"], "" if p["required"] else f"default {p['default']}") if x)
            rows.append(f"- `{p['name']}`: {p['type']}" + (f" ({extra})" if extra else ""))
    return "\n".join(rows)


def composite_doc(c: ast.CompositeDef) -> str:
    rows = [f"**{c.kind} {c.name}**{_signature(c.params)}", ""]
    if c.doc:
        rows += [c.doc, ""]
    rows.append(_where(c.span))
    return "\n".join(rows)


def _signature(params) -> str:
    return "(" + ", ".join(p.name + (f" = {source_of(p.default)}" if p.default is not None else "")
                           for p in params) + ")"


def _where(span: Span) -> str:
    from .locate import BLUEPRINTS_DIR

    name = span.file
    try:
        from pathlib import Path

        name = str(Path(span.file).resolve().relative_to(BLUEPRINTS_DIR.resolve()))
        name = "zoo: " + name
    except ValueError:
        pass
    return f"defined in {name}:{span.line}"


def source_of(expr) -> str:
    """The text an expression was written as (one line), or `...`."""
    s = getattr(expr, "span", None)
    src = SOURCES.get(s.file) if s is not None else None
    if src is None or s.line != s.end_line:
        return "..."
    return src.line(s.line)[s.column - 1:s.end_column - 1]


# ---- definitions and symbols ------------------------------------------------------------------


def definition(analysis: Analysis, line: int, character: int, unit=None) -> tuple[str, tuple] | None:
    """Where the name at a position is defined: (file, 0-based range) for an import (the file
    itself), a composite or a model (base models included), or None."""
    unit = analysis.unit or unit
    file = analysis.file
    if file is not None:
        for imp in file.imports:
            if _inside(imp.span, line, character):
                from pathlib import Path

                from .diagnostics import ComposerError
                from .loader import find_import

                try:
                    return str(find_import(imp, Path(analysis.path).parent).resolve()), (0, 0, 0, 0)
                except ComposerError:
                    return None
    word = word_at(analysis.text, line, character)
    if word is None or unit is None:
        return None
    target = unit.names.composites.get(word[0]) or unit.models.get(word[0])
    if target is None:
        return None
    src = analysis.text if same_file(target.span.file, analysis.path) else \
        (SOURCES[target.span.file].text if target.span.file in SOURCES else "")
    return target.span.file, name_range(src, target.span, target.name)


def symbols(analysis: Analysis) -> list[Symbol]:
    """The outline of a file: models (their stem, stages and head inside), blocks and mixers."""
    file, text = analysis.file, analysis.text
    if file is None:
        return []
    out = []
    for m in file.models:
        sym = Symbol(m.name, "model", (": " + m.base) if m.base else "model", span_range(m.span),
                     name_range(text, m.span, m.name))
        n = 0
        for item in m.body:
            if isinstance(item, ast.Section):
                sym.children.append(Symbol(item.kind, "section", "", span_range(item.span), _first_word(item.span)))
            elif isinstance(item, ast.Stage):
                label = f"stages for {item.loop_var}" if item.loop_var else f"stage {n}"
                n += 1
                sym.children.append(Symbol(label, "stage", "", span_range(item.span), _first_word(item.span)))
        out.append(sym)
    for c in file.composites:
        out.append(Symbol(c.name, c.kind, f"{c.kind}({', '.join(p.name for p in c.params)})", span_range(c.span),
                          name_range(text, c.span, c.name)))
    out.sort(key=lambda s: s.range)
    return out


def _first_word(span: Span) -> tuple:
    line, col, _, _ = span_range(span)
    return line, col, line, col
