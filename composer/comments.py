"""The comments and layout of blueprint source text, for the printers that keep them: where each
`#` comment is (`scan_comments`), which statement it belongs to (`Layout.attach`), where the
brackets and blank lines are, and a definition's doc comment (`comment_block`); and the
comments of YAML text (`yaml_comments`), for `composer convert`."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

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


def start_of(node) -> tuple[int, int]:
    s = node.span
    return (s.line, s.column)


def end_of(node) -> tuple[int, int]:
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


def comment_block(lines: list[str], line_no: int) -> str:
    """The `#` comment lines directly above line `line_no` (1-based), as text."""
    out = []
    i = line_no - 2
    while i >= 0 and lines[i].lstrip().startswith("#"):
        out.append(lines[i].lstrip()[1:].strip())
        i -= 1
    return "\n".join(reversed(out))


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
