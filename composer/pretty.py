"""The pretty-printing document algebra (Wadler/Prettier style) that `composer fmt` and
`composer convert` lay their text out with: a document says where a line may break, `render`
decides which breaks to take so that lines fit in `width` columns. Knows nothing of blueprints."""

from __future__ import annotations

WIDTH = 100
INDENT = 4

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

