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

import bisect
import dataclasses
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from . import ast
from .diagnostics import error
from .files import write_atomic

WIDTH = 100
INDENT = 4

# ---- documents (a Wadler/Prettier-style layout algebra) ---------------------------------------
# A document is a str (text), a list (concatenation) or a tuple:
#   ("line", flat)          a break, printed as `flat` (" " or "") when its group fits on the line
#   ("hard",)               always a newline (and its enclosing groups break)
#   ("group", doc, hard)    printed flat if it fits, else broken; `hard`: it holds a hard newline
#   ("nest", doc)           breaks inside are indented one more level
#   ("ifbreak", a, b)       `a` if the enclosing group is broken, else `b`
#   ("suffix", text)        text put at the end of the current line (a trailing comment)
#   ("break",)              forces the enclosing groups to break

LINE = ("line", " ")
SOFT = ("line", "")
HARD = ("hard",)
BREAK = ("break",)


def _hard(doc) -> bool:
    if isinstance(doc, str):
        return False
    if isinstance(doc, list):
        return any(_hard(d) for d in doc)
    kind = doc[0]
    if kind in ("hard", "break"):
        return True
    if kind == "group":
        return doc[2]
    if kind == "nest":
        return _hard(doc[1])
    if kind == "ifbreak":
        return _hard(doc[1]) or _hard(doc[2])
    return False


def group(*parts):
    doc = list(parts)
    return ("group", doc, _hard(doc))


def nest(*parts):
    return ("nest", list(parts))


def ifbreak(broken, flat=""):
    return ("ifbreak", broken, flat)


def suffix(text: str):
    return ("suffix", text)


def join(sep, docs) -> list:
    out = []
    for i, d in enumerate(docs):
        if i:
            out.append(sep)
        out.append(d)
    return out


def _fits(doc, stack, width: int) -> bool:
    """Does `doc` (flat) plus what follows it up to the next possible newline fit in `width`?"""
    todo = [(False, doc)]
    rest = len(stack) - 1
    while width >= 0:
        if not todo:
            if rest < 0:
                return True
            _, brk, d = stack[rest]
            rest -= 1
            todo.append((brk, d))
            continue
        brk, d = todo.pop()
        if isinstance(d, str):
            width -= len(d)
        elif isinstance(d, list):
            todo.extend((brk, x) for x in reversed(d))
        elif d[0] == "nest":
            todo.append((brk, d[1]))
        elif d[0] == "group":
            todo.append((brk or d[2], d[1]))
        elif d[0] == "line":
            if brk:
                return True
            width -= len(d[1])
        elif d[0] == "hard":
            return True
        elif d[0] == "ifbreak":
            todo.append((brk, d[1] if brk else d[2]))
    return False


def render(doc, width: int = WIDTH) -> str:
    out: list[str] = []
    col = 0
    pending: list[str] = []
    stack = [(0, True, doc)]
    while stack:
        ind, brk, d = stack.pop()
        if isinstance(d, str):
            out.append(d)
            col += len(d)
        elif isinstance(d, list):
            stack.extend((ind, brk, x) for x in reversed(d))
        elif d[0] == "nest":
            stack.append((ind + INDENT, brk, d[1]))
        elif d[0] == "group":
            if not brk and not d[2]:
                stack.append((ind, False, d[1]))
            else:
                stack.append((ind, d[2] or not _fits(d[1], stack, width - col), d[1]))
        elif d[0] in ("line", "hard"):
            if d[0] == "line" and not brk:
                out.append(d[1])
                col += len(d[1])
            else:
                out.extend(pending)
                pending = []
                out.append("\n" + " " * ind)
                col = ind
        elif d[0] == "ifbreak":
            stack.append((ind, brk, d[1] if brk else d[2]))
        elif d[0] == "suffix":
            pending.append(d[1])
    out.extend(pending)
    return "\n".join(line.rstrip() for line in "".join(out).split("\n"))


# ---- the source: comments, brackets, blank lines ----------------------------------------------

END = (1 << 30, 0)


@dataclass
class Comment:
    line: int
    col: int
    text: str  # from '#', trailing blanks removed
    own: bool  # nothing but blanks before it on its line
    used: bool = False

    @property
    def pos(self) -> tuple[int, int]:
        return (self.line, self.col)


def _start(node) -> tuple[int, int]:
    s = node.span
    return (s.line, s.column)


def _end(node) -> tuple[int, int]:
    s = node.span
    return (s.end_line, s.end_column)


class Layout:
    """What the printer knows of the source text: its comments (with positions), where its
    brackets are (.arch only) and its blank lines. `Layout()` knows nothing (printing an AST)."""

    def __init__(self, text: str = "", name: str | None = None, comments: list[Comment] | None = None,
                 brackets: bool = False):
        self.name, self.text = name, text
        self.lines = text.split("\n")  # as Lark counts lines (not at \x0c, \x1c, ...)
        self.comments = sorted(comments or [], key=lambda c: c.pos)
        self._keys = [c.pos for c in self.comments]
        self.match: dict = {}
        self.opens: dict[str, list] = {"{": [], "(": []}
        self.arch = brackets
        if brackets:
            self._scan_brackets()

    @classmethod
    def arch_source(cls, text: str, name: str) -> "Layout":
        return cls(text, name, scan_comments(text), brackets=True)

    def _scan_brackets(self) -> None:
        stack = []
        for n, line in enumerate(self.lines, 1):
            in_str = False
            for i, ch in enumerate(line):
                if ch == '"':
                    in_str = not in_str
                elif in_str:
                    continue
                elif ch == "#":
                    break
                elif ch in "({[":
                    stack.append((n, i + 1))
                    if ch in self.opens:
                        self.opens[ch].append((n, i + 1))
                elif ch in ")}]" and stack:
                    self.match[stack.pop()] = (n, i + 1)

    # -- comments
    def take(self, lo, hi) -> list[Comment]:
        """The comments not yet printed in [lo, hi), now marked printed."""
        out = []
        for k in range(bisect.bisect_left(self._keys, lo), len(self.comments)):
            c = self.comments[k]
            if c.pos >= hi:
                break
            if not c.used:
                c.used = True
                out.append(c)
        return out

    def any(self, lo, hi) -> bool:
        for k in range(bisect.bisect_left(self._keys, lo), len(self.comments)):
            c = self.comments[k]
            if c.pos >= hi:
                return False
            if not c.used:
                return True
        return False

    def attach(self, lo, hi, extents):
        """Comments in [lo, hi) around items at `extents` [(start, end)]: those trailing the opening
        line, (leading, trailing) per item, and those dangling before the close."""
        after_open, per, dangling = [], [([], []) for _ in extents], []
        prev_end, prev = lo, -1
        for i in range(len(extents) + 1):
            nxt = extents[i][0] if i < len(extents) else hi
            for c in self.take(prev_end, nxt):
                if not c.own and c.line == prev_end[0]:
                    (after_open if prev < 0 else per[prev][1]).append(c)
                elif i < len(extents):
                    per[i][0].append(c)
                else:
                    dangling.append(c)
            if i < len(extents):
                prev_end, prev = max(extents[i][1], prev_end), i
        return after_open, per, dangling

    def rest(self) -> list[Comment]:
        return self.take((0, 0), END)

    # -- brackets and lines
    def after(self, ch: str, lo, hi=None):
        """The first `ch` ('{' or '(') at or after `lo` and before `hi`, or None."""
        if not self.arch:
            return None
        seq = self.opens[ch]
        k = bisect.bisect_left(seq, lo)
        if k < len(seq) and (hi is None or seq[k] < hi):
            return seq[k]
        return None

    def blank_between(self, a: int, b: int) -> bool:
        """Is one of the lines strictly between lines `a` and `b` blank?"""
        return any(not self.lines[k - 1].strip() for k in range(a + 1, b) if 0 < k <= len(self.lines))

    def spelling(self, span) -> str | None:
        if span is None or span.file != self.name or span.line != span.end_line or span.line > len(self.lines):
            return None
        return self.lines[span.line - 1][span.column - 1:span.end_column - 1]


def scan_comments(text: str) -> list[Comment]:
    """Every `#` comment of .arch text (strings have no escapes and end on their line)."""
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        in_str = False
        for i, ch in enumerate(line):
            if ch == '"':
                in_str = not in_str
            elif ch == "#" and not in_str:
                out.append(Comment(n, i + 1, line[i:].rstrip(), not line[:i].strip()))
                break
    return out


# ---- the printer --------------------------------------------------------------------------------

_LEVEL = {"or": 1, "and": 2, "==": 4, "!=": 4, "<": 4, "<=": 4, ">": 4, ">=": 4, "+": 5, "-": 5,
          "*": 6, "/": 6, "//": 6, "%": 6, "**": 8}
# (left, right) levels the operands of a binary operator need; see grammar/expr.lark
_OPERANDS = {1: (1, 2), 2: (2, 3), 4: (5, 5), 5: (5, 6), 6: (6, 7), 8: (9, 7)}
_INT = re.compile(r"[0-9][0-9_]*")
_FLOAT = re.compile(r"[0-9][0-9_]*\.[0-9]+([eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+")
_STARTS_OPERAND = ("[", "(", "-", "+")  # a repeat block starting so would join its count: add ':'


def level(e) -> int:
    """Binding strength: 0 conditional, 1 or, 2 and, 3 not, 4 compare, 5 sum, 6 product, 7 unary,
    8 power, 9 call/index, 10 atom."""
    if isinstance(e, ast.Conditional):
        return 0
    if isinstance(e, ast.BinOp):
        return _LEVEL[e.op]
    if isinstance(e, ast.UnaryOp):
        return 3 if e.op == "not" else 7
    if isinstance(e, ast.Literal) and isinstance(e.value, (int, float)) and not isinstance(e.value, bool) \
            and (e.value < 0 or str(e.value).startswith("-")):
        return 7
    if isinstance(e, (ast.Call, ast.Index)):
        return 9
    return 10


def _unrepresentable(what: str, span) -> Exception:
    return error("format", f"{what} cannot be written in .arch", span)


class Printer:
    """AST -> document, taking comments from `layout` where they belong."""

    def __init__(self, layout: Layout | None = None, oneline=None):
        self.L = layout or Layout()
        # a block without .arch layout (from YAML) is one line when `oneline(node, start, end)` says so
        self.oneline_default = oneline or (lambda node, start, end: False)
        self.extra_lead: dict[int, list[str]] = {}  # id(definition) -> comment lines to put above it
        self.ends: dict[int, tuple] = {}  # id(definition) -> where its comments end, if not at its span's end

    # -- expressions
    def expr(self, e, need: int = 0):
        doc = self._expr(e)
        if level(e) < need:
            return ["(", doc, ")"]
        return doc

    def _literal(self, e: ast.Literal) -> str:
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

    def _expr(self, e):
        if isinstance(e, ast.Literal):
            return self._literal(e)
        if isinstance(e, ast.Name):
            return e.id
        if isinstance(e, ast.ListExpr):
            s = e.span
            region = ((s.line, s.column + 1), (s.end_line, s.end_column - 1))
            return self.bracket("[", [(_start(x), _end(x), self.expr(x)) for x in e.items], "]", region)
        if isinstance(e, ast.ListComp):
            return group("[", nest(SOFT, self.expr(e.expr), LINE, "for ", e.var, " in ", self.expr(e.items)),
                         SOFT, "]")
        if isinstance(e, ast.Index):
            return [self.expr(e.target, 9), "[", self.expr(e.index), "]"]
        if isinstance(e, ast.Call):
            region = (_end(e.func), (e.span.end_line, e.span.end_column - 1))
            return [self.expr(e.func, 9), self.args(e.args, e.kwargs, region)]
        if isinstance(e, ast.BinOp):
            lv = _LEVEL[e.op]
            left, right = _OPERANDS[lv]
            return group(self.expr(e.left, left), " " + e.op, nest(LINE, self.expr(e.right, right)))
        if isinstance(e, ast.UnaryOp):
            if e.op == "not":
                return ["not ", self.expr(e.operand, 3)]
            return ["-", self.expr(e.operand, 7)]
        if isinstance(e, ast.Conditional):
            return group(self.expr(e.test, 1), nest(LINE, "? ", self.expr(e.then), LINE, ": ", self.expr(e.orelse)))
        if isinstance(e, ast.Named):  # a list element naming its layer: `[conv(8, 3) as proj, relu]`
            return [self.expr(e.expr), " as ", e.alias]
        raise TypeError(f"not an expression: {e!r}")

    def args(self, args, kwargs, region):
        items = [(_start(a), _end(a), self.expr(a)) for a in args]
        items += [((s.line, s.column), _end(v), [k, " = ", self.expr(v)]) for k, v, s in kwargs]
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
        p = self.L.after("{", _start(node), inner_start)
        if p is not None and p in self.L.match:
            close = self.L.match[p]
            return ((p[0], p[1] + 1), close), p[0] == close[0]
        end = self.ends.get(id(node), _end(node))
        return (_start(node), end), self.oneline_default(node, _start(node), _end(node))

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
        region, oneline = self.region(node, _start(stmts[0]) if stmts else None)
        items = [(_start(s), _end(s), (lambda s=s: build(s))) for s in stmts]
        return self.braced(items, region, oneline)

    def _bare_ok(self, node, stmts, kinds, region_node=None) -> bool:
        """Can `stmts` be written without braces (one statement of `kinds`, no comment around it)?"""
        if len(stmts) != 1 or not isinstance(stmts[0], kinds):
            return False
        p = self.L.after("{", _start(region_node or node), _start(stmts[0]))
        if p is None or p not in self.L.match:
            return True
        close = self.L.match[p]
        return not self.L.any((p[0], p[1] + 1), _start(stmts[0])) and not self.L.any(_end(stmts[0]), close)

    # -- statements
    def stmt(self, s):
        if isinstance(s, ast.Let):
            return group("let ", s.name, " = ", self.expr(s.value))
        if isinstance(s, ast.Assign):
            return group(s.name, " = ", self.expr(s.value))
        if isinstance(s, ast.Input):
            return ["input ", self.expr(s.expr)]
        if isinstance(s, ast.Apply):
            return [self.expr(s.expr)] + ([" as ", s.alias] if s.alias else [])
        if isinstance(s, ast.Save):
            return ["save ", s.name]
        if isinstance(s, ast.Load):
            return ["from ", s.name]
        if isinstance(s, ast.Reuse):
            return ["reuse ", s.path]
        if isinstance(s, ast.Residual):
            return ["residual", self._kw_args(s, s.args, s.kwargs), " ", self.block_of(s, s.body)]
        if isinstance(s, ast.Parallel):
            return ["parallel ", s.merge, self._kw_args(s, s.args, s.kwargs), " ", self._branches(s)]
        if isinstance(s, ast.ParallelFor):
            return ["parallel ", s.merge, self._kw_args(s, s.args, s.kwargs), " for ", s.var, " in ",
                    self.range(s.items, s.stop), " ", self.block_of(s, s.body)]
        if isinstance(s, ast.Section):
            kw = {"stem": "stem", "head": "head", "downsample": "downsample", "norm": "after"}[s.kind]
            if self._bare_ok(s, s.body, ast.Apply):
                return [kw, " ", self.stmt(s.body[0])]
            return [kw, " ", self.block_of(s, s.body)]
        if isinstance(s, ast.Stage):
            if s.loop_var is None:
                return ["stage ", self.block_of(s, s.items)]
            return ["stages for ", s.loop_var, " in ", self.range(s.start, s.stop), " ", self.block_of(s, s.items)]
        if isinstance(s, ast.Repeat):
            head = ["block"] if s.count is None else ["repeat ", self.expr(s.count)]
            if s.var is not None:
                head += [" as ", s.var]
            if isinstance(s.block, tuple):
                return head + [" ", self.block_of(s, s.block)]
            block = self.expr(s.block)
            first = render(block, 10 ** 9)[:1]
            return head + ([":"] if s.count is not None and first in _STARTS_OPERAND else []) + [" ", block]
        raise TypeError(f"not a statement: {s!r}")

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
        p = self.L.after("(", _start(node), _start(body))
        region = ((p[0], p[1] + 1), self.L.match.get(p, END)) if p is not None else None
        return self.args(args, kwargs, region)

    def _branches(self, s: ast.Parallel):
        first = s.branches[0][0] if s.branches and s.branches[0] else None
        region, oneline = self.region(s, _start(first) if first else None)
        items, prev = [], region[0]
        for b in s.branches:
            if not b:
                continue
            p = self.L.after("{", prev, _start(b[0]))
            if p is not None and p in self.L.match:
                start, end = p, (self.L.match[p][0], self.L.match[p][1] + 1)
            else:
                start, end = _start(b[0]), _end(b[-1])
            items.append((start, end, (lambda b=b, p=p: self._branch(b, p))))
            prev = end
        return self.braced(items, region, oneline)

    def _branch(self, stmts, brace):
        if brace is None or brace not in self.L.match:
            if len(stmts) == 1 and isinstance(stmts[0], (ast.Apply, ast.Load)):
                return self.stmt(stmts[0])
            region = (_start(stmts[0]), _end(stmts[-1]))
            items = [(_start(x), _end(x), (lambda x=x: self.stmt(x))) for x in stmts]
            return self.braced(items, region, self.oneline_default(stmts, *region))
        close = self.L.match[brace]
        lo = (brace[0], brace[1] + 1)
        if len(stmts) == 1 and isinstance(stmts[0], (ast.Apply, ast.Load)) \
                and not self.L.any(lo, _start(stmts[0])) and not self.L.any(_end(stmts[0]), close):
            return self.stmt(stmts[0])
        items = [(_start(x), _end(x), (lambda x=x: self.stmt(x))) for x in stmts]
        return self.braced(items, (lo, close), brace[0] == close[0])

    # -- definitions
    def definition(self, d):
        if isinstance(d, ast.Import):
            return ["import ", self._literal(ast.Literal(d.path, d.span))]
        first = d.body[0] if d.body else None
        head = ["model " if isinstance(d, ast.ModelDef) else d.kind + " ", d.name]
        if d.params:
            p = self.L.after("(", _start(d), _start(d.params[0]))
            region = ((p[0], p[1] + 1), self.L.match.get(p, END)) if p is not None else None
            items = [(_start(q), _end(q), self._param(q)) for q in d.params]
            head.append(self.bracket("(", items, ")", region))
        if isinstance(d, ast.ModelDef) and d.base:
            head += [" : ", d.base]
        region, oneline = self.region(d, _start(first) if first else None)
        items = [(_start(s), _end(s), (lambda s=s: self.stmt(s))) for s in d.body]
        return head + [" ", self.braced(items, region, oneline)]

    def _param(self, q: ast.Param):
        if q.default is None:
            return q.name
        return [q.name, " = ", self.expr(q.default)]

    def file(self, f: ast.File, order=None, header_doc: list[str] | None = None) -> str:
        """The whole file. `order`: the top-level items in print order (default: by position)."""
        items = order or sorted(f.imports + f.models + f.composites, key=_start)
        ends = [self.ends.get(id(i), _end(i)) for i in items]
        after_open, per, dangling = self.L.attach((0, 0), END, [(_start(i), e) for i, e in zip(items, ends)])
        elems = []  # (doc, first line, last line, owner index, one-line def)
        for c in after_open:
            elems.append((c.text, c.line, c.line, -1, False))
        for k, (item, (lead, trail)) in enumerate(zip(items, per)):
            for c in lead:
                elems.append((c.text, c.line, c.line, k, False))
            elems += [(t, item.span.line, item.span.line, k, False) for t in self.extra_lead.get(id(item), [])]
            doc = self.definition(item)
            oneline = "\n" not in render(doc)
            extra = self.L.take(_start(item), ends[k])
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

def shape(x):
    """An AST without its spans and file names (for comparing two parses)."""
    if isinstance(x, (list, tuple)):
        return tuple(shape(y) for y in x)
    if type(x).__name__ == "Span":
        return None
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x).__name__,) + tuple(
            (f.name, shape(getattr(x, f.name))) for f in dataclasses.fields(x) if f.name not in ("span", "file", "path")
            or (f.name == "path" and isinstance(x, ast.Import)))
    if isinstance(x, float):
        return ("float", x)
    return x


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


# ---- the command ----------------------------------------------------------------------------------

def arch_files(paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*.arch") if q.is_file())
        elif p.is_file():
            if p.suffix != ".arch":
                raise error("io", f"{p} is not a .arch file", None,
                            "fmt formats .arch files; `composer convert FILE --to arch` turns YAML into .arch")
            out.append(p)
        else:
            raise error("io", f"no such file or directory: {p}")
    return list(dict.fromkeys(out))


def main(args) -> int:
    """`composer fmt PATH... [--check]`: 0 formatted (or rewritten), 1 would change (--check), 2 error."""
    files = arch_files(args.paths)
    changed = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise error("io", f"cannot read {path}: {exc}") from None
        new = format_text(text, str(path))
        if new != text:
            changed.append((path, text, new))
    if getattr(args, "check", False):
        for path, text, new in changed:
            sys.stdout.writelines(difflib.unified_diff(
                text.splitlines(keepends=True), new.splitlines(keepends=True), f"{path}", f"{path} (formatted)"))
        if changed:
            print(f"{len(changed)} of {len(files)} file{'s' * (len(files) != 1)} would be reformatted", file=sys.stderr)
        return 1 if changed else 0
    for path, _, new in changed:
        write_atomic(path, new)
        print(f"reformatted {path}")
    return 0
