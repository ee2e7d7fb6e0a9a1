"""`composer convert --to arch`: a YAML blueprint as canonical .arch text (`yaml_to_arch`), and the
check both directions of composer/convert.py run on what they produce (`check_round_trip`): the
text reads back to the same blueprint, or nothing is handed back. No torch here."""

from __future__ import annotations

import contextlib

from . import ast
from .comments import Layout, start_of, yaml_comments
from .diagnostics import ComposerError, error
from .format import Printer


# ---- YAML -> .arch ---------------------------------------------------------------------------------

def yaml_to_arch(text: str, name: str = "<string>") -> str:
    """Canonical .arch text for the YAML blueprint `text`, its comments put back by position."""
    from .yaml_read import parse_yaml

    tree = parse_yaml(text, name)

    def oneline(node, start, end) -> bool:
        """One line (when it fits): a model that only sets values, or a block written on one line."""
        if isinstance(node, ast.ModelDef):
            return node.base is not None and bool(node.body) and all(isinstance(s, ast.Assign) for s in node.body)
        return start[0] == end[0]

    order = sorted(tree.imports, key=start_of) + sorted(tree.models + tree.composites, key=start_of)
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
    check_round_trip(tree, lambda: back, name, ".arch")  # `back`: the parse of this `out`
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


def check_round_trip(tree, reparse, name: str, what: str) -> None:
    """`tree` converted and read back by `reparse()` is the same blueprint (`_canon`), else a converter
    bug (RuntimeError: nothing is written); a file nested too deeply for YAML is a located error."""
    with _sources_kept():
        try:
            again = reparse()
        except ComposerError as exc:
            if exc.code != "yaml-size":
                raise RuntimeError(f"convert produced {what} that does not read back for {name}: {exc}") from None
            raise error("too-deep", f"{name} is nested too deeply to write as {what}", getattr(tree, "span", None),
                        "blocks (`block name { ... }`) make the nesting shallower") from None
        except Exception as exc:  # a converter bug: never hand back text that does not read back
            raise RuntimeError(f"convert produced {what} that does not read back for {name}: {exc}") from None
    if _canon(again) != _canon(tree):
        raise RuntimeError(f"convert would change the blueprint {name} (a converter bug); nothing written")
