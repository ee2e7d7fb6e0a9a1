"""`composer fmt`: print a blueprint AST as canonical .arch text, keeping every comment.

The canonical style
-------------------
* 4 spaces per indentation level; one statement per line inside a multi-line block.
* One space around binary operators, `=`, `?`, `:` and after `,`; none inside brackets
  (`conv(64, 3, stride = 2)`, `dims[i] * 2`, `[2, 2, 6, 2]`). `model b : a`, `stages for i in 0..4`.
* Expressions carry only the parentheses the grammar (grammar/expr.lark) needs; numbers keep the
  spelling they were written with (`1e-6`, `1_000`).
* Lines are at most 100 columns where the grammar lets them break (black-like): a statement is
  tried on one line; when it does not fit, its outermost bracket is broken with one argument per
  line, a hanging indent of 4 and a trailing comma, and the arguments are broken the same way when
  they are still too long. A long `a ? b : c` breaks before `?` and `:`, a long `a + b` after the
  operator (a newline there continues the statement).
* A block `{ ... }` written on one line stays on one line (`head { layernorm; classifier(10) }`,
  `model b : a { x = 1; y = 2 }`) while it fits and holds no comment; otherwise one statement
  per line. `stem`, `head`, `downsample`, `after` and a parallel branch with a single expression
  statement (no comment in its braces) lose their braces: `stem patch_embed(96, 4)`. An empty block is `{}`
  and an empty parameter list is left out (`mixer m {`).
* `repeat n: x` keeps its `:` only where the block would otherwise read as part of the count
  (it starts with `[`, `(` or a sign).
* Blank lines: one between top-level definitions (consecutive one-line definitions written
  without one, a group of variants, stay together); elsewhere a run of blank lines becomes one,
  and none directly after `{` or before `}`.
* Comments: an own-line comment stays above the statement (or argument, or `}`) it precedes,
  at that statement's indentation; a trailing comment stays after its statement (or argument,
  which then forces one argument per line), two spaces before the `#`; the file's header
  comment and the doc comments of definitions stay where they are. A comment in a place the
  printer does not lay out itself (inside `a +` / `b` on two lines, say) moves above its statement.

`format_text` checks its own work: the result must parse to the same AST (spans aside) with
the same comments, or it raises an internal error instead of returning a changed meaning.
No torch here.
"""

from __future__ import annotations

import re

from . import ast
from .ast import shape
from .comments import END, Layout, end_of, scan_comments, start_of
from .diagnostics import error
from .pretty import BREAK, HARD, LINE, SOFT, group, ifbreak, join, nest, render, suffix

# ---- the printer --------------------------------------------------------------------------------

_LEVEL = {"or": 1, "and": 2, "==": 4, "!=": 4, "<": 4, "<=": 4, ">": 4, ">=": 4, "+": 5, "-": 5,
          "*": 6, "/": 6, "//": 6, "%": 6, "**": 8}
# (left, right) levels the operands of a binary operator need; see grammar/expr.lark
_OPERANDS = {1: (1, 2), 2: (2, 3), 4: (5, 5), 5: (5, 6), 6: (6, 7), 8: (9, 7)}
_INT = re.compile(r"[0-9][0-9_]*")
_FLOAT = re.compile(r"[0-9][0-9_]*\.[0-9]+([eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+")
_STARTS_OPERAND = ("[", "(", "-", "+")  # a repeat block starting so would join its count: add ':'


def _fixed(n: int):
    return lambda self, e: n


class _Precedence(ast.NodeVisitor):
    """`level(e)`: how strongly the expression `e` binds: 0 conditional, 1 or, 2 and, 3 not,
    4 compare, 5 sum, 6 product, 7 unary (a negative number too: it is printed as a negation),
    8 power, 9 call/index, 10 atom."""

    def visit_BinOp(self, e: ast.BinOp) -> int:
        return _LEVEL[e.op]

    def visit_UnaryOp(self, e: ast.UnaryOp) -> int:
        return 3 if e.op == "not" else 7

    def visit_Literal(self, e: ast.Literal) -> int:
        v = e.value
        return 7 if isinstance(v, (int, float)) and not isinstance(v, bool) and (v < 0 or str(v).startswith("-")) \
            else 10

    visit_Conditional = _fixed(0)
    visit_Call = visit_Index = _fixed(9)
    visit_Name = visit_ListExpr = visit_ListComp = visit_Named = _fixed(10)


level = _Precedence().visit


def _unrepresentable(what: str, span) -> Exception:
    return error("format", f"{what} cannot be written in .arch", span)


class Printer(ast.NodeVisitor):
    """AST -> document, taking comments from `layout` where they belong; a statement or an
    expression by its `visit_` method."""

    def __init__(self, layout: Layout | None = None, oneline=None):
        self.L = layout or Layout()
        # a block without .arch layout (from YAML) is one line when `oneline(node, start, end)` says so
        self.oneline_default = oneline or (lambda node, start, end: False)
        self.extra_lead: dict[int, list[str]] = {}  # id(definition) -> comment lines to put above it
        self.ends: dict[int, tuple] = {}  # id(definition) -> where its comments end, if not at its span's end

    # -- expressions
    def expr(self, e, need: int = 0):
        """The document of expression `e` (by its `visit_` method), in parentheses if it binds
        less strongly than `need`."""
        doc = self.visit(e)
        if level(e) < need:
            return ["(", doc, ")"]
        return doc

    def visit_Literal(self, e: ast.Literal) -> str:
        v = e.value
        if v is None:
            return "none"
        if v is True:
            return "true"
        if v is False:
            return "false"
        if isinstance(v, str):
            if '"' in v or "\n" in v or "\r" in v:
                raise _unrepresentable(f"the string {v!r} (a '\"' or a newline in it)", e.span)
            return f'"{v}"'
        if isinstance(v, (int, float)):
            sign = "-" if v < 0 or str(v).startswith("-") else ""
            mag = -v if sign else v
            spelled = self.L.spelling(e.span)
            if spelled and (_INT.fullmatch(spelled) or _FLOAT.fullmatch(spelled)):
                try:
                    same = (int if _INT.fullmatch(spelled) else float)(spelled.replace("_", "")) == mag
                except ValueError:
                    same = False
                if same and type(mag) is (int if _INT.fullmatch(spelled) else float):
                    return sign + spelled
            text = repr(mag)
            if not (_INT.fullmatch(text) or _FLOAT.fullmatch(text)):
                raise _unrepresentable(f"the number {v!r}", e.span)
            return sign + text
        raise _unrepresentable(f"the value {v!r}", e.span)

    def visit_Name(self, e: ast.Name):
        return e.id

    def visit_ListExpr(self, e: ast.ListExpr):
        s = e.span
        region = ((s.line, s.column + 1), (s.end_line, s.end_column - 1))
        return self.bracket("[", [(start_of(x), end_of(x), self.expr(x)) for x in e.items], "]", region)

    def visit_ListComp(self, e: ast.ListComp):
        return group("[", nest(SOFT, self.expr(e.expr), LINE, "for ", e.var, " in ", self.expr(e.items)),
                     SOFT, "]")

    def visit_Index(self, e: ast.Index):
        return [self.expr(e.target, 9), "[", self.expr(e.index), "]"]

    def visit_Call(self, e: ast.Call):
        region = (end_of(e.func), (e.span.end_line, e.span.end_column - 1))
        return [self.expr(e.func, 9), self.args(e.args, e.kwargs, region)]

    def visit_BinOp(self, e: ast.BinOp):
        left, right = _OPERANDS[_LEVEL[e.op]]
        return group(self.expr(e.left, left), " " + e.op, nest(LINE, self.expr(e.right, right)))

    def visit_UnaryOp(self, e: ast.UnaryOp):
        if e.op == "not":
            return ["not ", self.expr(e.operand, 3)]
        return ["-", self.expr(e.operand, 7)]

    def visit_Conditional(self, e: ast.Conditional):
        return group(self.expr(e.test, 1), nest(LINE, "? ", self.expr(e.then), LINE, ": ", self.expr(e.orelse)))

    def visit_Named(self, e: ast.Named):  # a list element naming its layer: `[conv(8, 3) as proj, relu]`
        return [self.expr(e.expr), " as ", e.alias]

    def args(self, args, kwargs, region):
        items = [(start_of(a), end_of(a), self.expr(a)) for a in args]
        items += [((s.line, s.column), end_of(v), [k, " = ", self.expr(v)]) for k, v, s in kwargs]
        return self.bracket("(", items, ")", region)

    def bracket(self, open_, items, close, region):
        """`open_ item, item close`: flat, or one item per line with a trailing comma."""
        lo, hi = region if region else (None, None)
        if lo is not None:
            after_open, per, dangling = self.L.attach(lo, hi, [(s, e) for s, e, _ in items])
        else:
            after_open, per, dangling = [], [([], []) for _ in items], []
        if not items and not after_open and not dangling:
            return open_ + close
        parts = []
        for i, ((_, _, doc), (lead, trail)) in enumerate(zip(items, per)):
            for c in lead:
                parts += [c.text, HARD]
            parts.append(doc)
            parts.append("," if i < len(items) - 1 else ifbreak(","))
            parts += self._trailing(trail)
            if i < len(items) - 1:
                parts.append(LINE)
        for c in dangling:
            parts += [HARD, c.text]
        head = [open_] + self._trailing(after_open)
        return group(*head, nest(SOFT, *parts), SOFT, close)

    @staticmethod
    def _trailing(comments) -> list:
        out = []
        for k, c in enumerate(comments):
            out += [suffix("  " + c.text), BREAK] if k == 0 else [HARD, c.text]
        return out

    # -- blocks
    def region(self, node, inner_start):
        """(lo, hi) inside the braces of `node`'s block and whether they sit on one line."""
        p = self.L.after("{", start_of(node), inner_start)
        if p is not None and p in self.L.match:
            close = self.L.match[p]
            return ((p[0], p[1] + 1), close), p[0] == close[0]
        end = self.ends.get(id(node), end_of(node))
        return (start_of(node), end), self.oneline_default(node, start_of(node), end_of(node))

    def braced(self, items, region, oneline: bool):
        """`{ ... }` around statements: items are (start, end, build) with build() -> doc."""
        lo, hi = region
        has_comments = self.L.any(lo, hi)
        after_open, per, dangling = self.L.attach(lo, hi, [(s, e) for s, e, _ in items])
        elems = []  # (doc, first line, last line)
        for (s, e, build), (lead, trail) in zip(items, per):
            elems += [(c.text, c.line, c.line) for c in lead]
            doc = build()
            elems += [(c.text, s[0], s[0]) for c in self.L.take(s, e)]  # comments the printer did not place
            elems.append(([doc, suffix("  " + trail[0].text)] if trail else doc, s[0], e[0]))
            elems += [(c.text, c.line, c.line) for c in trail[1:]]
        elems += [(c.text, c.line, c.line) for c in dangling]
        if not elems and not after_open:
            return "{}"
        if oneline and not has_comments:
            docs = [d for d, _, _ in elems]
            return group("{", nest(LINE, *join([ifbreak("", ";"), LINE], docs)), LINE, "}")
        body = []
        for k, (doc, first, last) in enumerate(elems):
            if k:
                body.append(HARD)
                if self.L.blank_between(elems[k - 1][2], first):
                    body.append(HARD)
            body.append(doc)
        return ["{"] + self._trailing(after_open) + [nest(HARD, *body), HARD, "}"]

    def block_of(self, node, stmts, build=None):
        build = build or self.stmt
        region, oneline = self.region(node, start_of(stmts[0]) if stmts else None)
        items = [(start_of(s), end_of(s), (lambda s=s: build(s))) for s in stmts]
        return self.braced(items, region, oneline)

    def _bare_ok(self, node, stmts, kinds, region_node=None) -> bool:
        """Can `stmts` be written without braces (one statement of `kinds`, no comment around it)?"""
        if len(stmts) != 1 or not isinstance(stmts[0], kinds):
            return False
        p = self.L.after("{", start_of(region_node or node), start_of(stmts[0]))
        if p is None or p not in self.L.match:
            return True
        close = self.L.match[p]
        return not self.L.any((p[0], p[1] + 1), start_of(stmts[0])) and not self.L.any(end_of(stmts[0]), close)

    # -- statements
    def stmt(self, s):
        return self.visit(s)

    def visit_Let(self, s: ast.Let):
        return group("let ", s.name, " = ", self.expr(s.value))

    def visit_Assign(self, s: ast.Assign):
        return group(s.name, " = ", self.expr(s.value))

    def visit_Input(self, s: ast.Input):
        return ["input ", self.expr(s.expr)]

    def visit_Apply(self, s: ast.Apply):
        return [self.expr(s.expr)] + ([" as ", s.alias] if s.alias else [])

    def visit_Save(self, s: ast.Save):
        return ["save ", s.name]

    def visit_Load(self, s: ast.Load):
        return ["from ", s.name]

    def visit_Reuse(self, s: ast.Reuse):
        return ["reuse ", s.path]

    def visit_Bind(self, s: ast.Bind):
        lhs = ", ".join(s.names) + " = "
        if s.body is not None:
            return [lhs, self.block_of(s, s.body)]
        return [lhs, self.expr(s.expr)] + ([" as ", s.alias] if s.alias else [])

    def visit_Residual(self, s: ast.Residual):
        return ["residual", self._kw_args(s, s.args, s.kwargs), " ", self.block_of(s, s.body)]

    def visit_Parallel(self, s: ast.Parallel):
        return ["parallel ", s.merge, self._kw_args(s, s.args, s.kwargs), " ", self._branches(s)]

    def visit_ParallelFor(self, s: ast.ParallelFor):
        return ["parallel ", s.merge, self._kw_args(s, s.args, s.kwargs), " for ", s.var, " in ",
                self.range(s.items, s.stop), " ", self.block_of(s, s.body)]

    def visit_Section(self, s: ast.Section):
        kw = {"stem": "stem", "head": "head", "downsample": "downsample", "norm": "after"}[s.kind]
        if self._bare_ok(s, s.body, ast.Apply):
            return [kw, " ", self.stmt(s.body[0])]
        return [kw, " ", self.block_of(s, s.body)]

    def visit_Stage(self, s: ast.Stage):
        if s.loop_var is None:
            return ["stage ", self.block_of(s, s.items)]
        return ["stages for ", s.loop_var, " in ", self.range(s.start, s.stop), " ", self.block_of(s, s.items)]

    def visit_Repeat(self, s: ast.Repeat):
        head = ["block"] if s.count is None else ["repeat ", self.expr(s.count)]
        if s.var is not None:
            head += [" as ", s.var]
        if isinstance(s.block, tuple):
            return head + [" ", self.block_of(s, s.block)]
        block = self.expr(s.block)
        first = render(block, 10 ** 9)[:1]
        return head + ([":"] if s.count is not None and first in _STARTS_OPERAND else []) + [" ", block]

    def range(self, start, stop):
        """`start..stop` (spaced when a bound is more than a name, call or index), or just `start`."""
        if stop is None:
            return self.expr(start)
        dots = ".." if level(start) >= 9 and level(stop) >= 9 else " .. "
        return [self.expr(start), dots, self.expr(stop)]

    def _kw_args(self, node, args, kwargs):
        if not args and not kwargs:
            return ""
        body = args[0] if args else kwargs[0][1]
        p = self.L.after("(", start_of(node), start_of(body))
        region = ((p[0], p[1] + 1), self.L.match.get(p, END)) if p is not None else None
        return self.args(args, kwargs, region)

    def _branches(self, s: ast.Parallel):
        first = s.branches[0][0] if s.branches and s.branches[0] else None
        region, oneline = self.region(s, start_of(first) if first else None)
        items, prev = [], region[0]
        for b in s.branches:
            if not b:
                continue
            p = self.L.after("{", prev, start_of(b[0]))
            if p is not None and p in self.L.match:
                start, end = p, (self.L.match[p][0], self.L.match[p][1] + 1)
            else:
                start, end = start_of(b[0]), end_of(b[-1])
            items.append((start, end, (lambda b=b, p=p: self._branch(b, p))))
            prev = end
        return self.braced(items, region, oneline)

    def _branch(self, stmts, brace):
        if brace is None or brace not in self.L.match:  # written bare: one statement
            if len(stmts) == 1 and isinstance(stmts[0], (ast.Apply, ast.Load, ast.Residual, ast.Parallel,
                                                         ast.ParallelFor)):
                return self.stmt(stmts[0])
            region = (start_of(stmts[0]), end_of(stmts[-1]))
            items = [(start_of(x), end_of(x), (lambda x=x: self.stmt(x))) for x in stmts]
            return self.braced(items, region, self.oneline_default(stmts, *region))
        close = self.L.match[brace]
        lo = (brace[0], brace[1] + 1)
        if len(stmts) == 1 and isinstance(stmts[0], (ast.Apply, ast.Load)) \
                and not self.L.any(lo, start_of(stmts[0])) and not self.L.any(end_of(stmts[0]), close):
            return self.stmt(stmts[0])
        items = [(start_of(x), end_of(x), (lambda x=x: self.stmt(x))) for x in stmts]
        return self.braced(items, (lo, close), brace[0] == close[0])

    # -- definitions
    def definition(self, d):
        if isinstance(d, ast.Import):
            return ["import ", self.visit_Literal(ast.Literal(d.path, d.span))]
        first = d.body[0] if d.body else None
        head = ["model " if isinstance(d, ast.ModelDef) else d.kind + " ", d.name]
        if d.params:
            p = self.L.after("(", start_of(d), start_of(d.params[0]))
            region = ((p[0], p[1] + 1), self.L.match.get(p, END)) if p is not None else None
            items = [(start_of(q), end_of(q), self._param(q)) for q in d.params]
            head.append(self.bracket("(", items, ")", region))
        if isinstance(d, ast.ModelDef) and d.base:
            head += [" : ", d.base]
        region, oneline = self.region(d, start_of(first) if first else None)
        items = [(start_of(s), end_of(s), (lambda s=s: self.stmt(s))) for s in d.body]
        return head + [" ", self.braced(items, region, oneline)]

    def _param(self, q: ast.Param):
        if q.default is None:
            return q.name
        return [q.name, " = ", self.expr(q.default)]

    def file(self, f: ast.File, order=None, header_doc: list[str] | None = None) -> str:
        """The whole file. `order`: the top-level items in print order (default: by position)."""
        items = order or sorted(f.imports + f.models + f.composites, key=start_of)
        ends = [self.ends.get(id(i), end_of(i)) for i in items]
        after_open, per, dangling = self.L.attach((0, 0), END, [(start_of(i), e) for i, e in zip(items, ends)])
        elems = []  # (doc, first line, last line, owner index, one-line def)
        for c in after_open:
            elems.append((c.text, c.line, c.line, -1, False))
        for k, (item, (lead, trail)) in enumerate(zip(items, per)):
            for c in lead:
                elems.append((c.text, c.line, c.line, k, False))
            elems += [(t, item.span.line, item.span.line, k, False) for t in self.extra_lead.get(id(item), [])]
            doc = self.definition(item)
            oneline = "\n" not in render(doc)
            extra = self.L.take(start_of(item), ends[k])
            elems += [(c.text, item.span.line, item.span.line, k, False) for c in extra]
            elems.append(([doc, suffix("  " + trail[0].text)] if trail else doc, item.span.line,
                          item.span.end_line, k, oneline and not isinstance(item, ast.Import)))
            elems += [(c.text, c.line, c.line, k, False) for c in trail[1:]]
        for c in dangling + self.L.rest():
            elems.append((c.text, c.line, c.line, len(items), False))
        out = [] if not header_doc else [join(HARD, ["# " + x if x else "#" for x in header_doc])]
        if header_doc and elems:
            out += [HARD, HARD]
        is_def = [not isinstance(i, ast.Import) for i in items] + [False]
        for n, (doc, first, last, owner, oneline) in enumerate(elems):
            if n:
                prev = elems[n - 1]
                out.append(HARD)
                new_def = owner != prev[3] and owner >= 0 and is_def[owner]
                if new_def:  # one blank line before a definition, except in a group of one-liners
                    blank = not (oneline and prev[4] and not self.L.blank_between(prev[2], first))
                elif owner != prev[3] and prev[3] >= 0 and is_def[prev[3]]:
                    blank = True  # and after one
                else:
                    blank = self.L.blank_between(prev[2], first)
                if blank:
                    out.append(HARD)
            out.append(doc)
        text = render(out)
        return text + "\n" if text else ""


# ---- checking a result --------------------------------------------------------------------------

def format_text(text: str, name: str = "<string>") -> str:
    """Canonical text for .arch `text`; raises ComposerError (located) on a syntax error."""
    from .parse import parse_text

    tree = parse_text(text, name)
    layout = Layout.arch_source(text, name)
    out = Printer(layout).file(tree)
    _verify(tree, text, out, name)
    return out


def _verify(tree, text: str, out: str, name: str) -> None:
    from .parse import parse_text
    from .source import SOURCES

    saved = SOURCES.get(name)
    try:
        again = parse_text(out, name + " (formatted)")
    except Exception as exc:  # a printer bug: never hand back text that does not parse
        raise RuntimeError(f"fmt produced text that does not parse for {name}: {exc}") from None
    finally:
        SOURCES.pop(name + " (formatted)", None)
        if saved is not None:
            SOURCES[name] = saved
    if shape(again) != shape(tree):
        raise RuntimeError(f"fmt would change the meaning of {name} (a printer bug); nothing written")
    if sorted(c.text for c in scan_comments(out)) != sorted(c.text for c in scan_comments(text)):
        raise RuntimeError(f"fmt would lose or reorder comments of {name} (a printer bug); nothing written")


def print_expr(e) -> str:
    """One expression as canonical text (on one line if it fits in 100 columns)."""
    return render(Printer().expr(e))
