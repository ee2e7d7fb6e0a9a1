"""Parse a YAML blueprint (text) into the same `ast.File` as the .arch form, with spans into the YAML.

The document is composed with PyYAML's safe loader (nodes keep line/column marks, nothing is
constructed from tags), checked against strict pydantic models (composer/yaml_schema.py), then walked node by node. Every
YAML string is an expression parsed by `parse.parse_expr`; its spans are moved into the YAML file.
The YAML shape is documented in docs/yaml.md.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from typing import Any

import yaml
from pydantic import ValidationError

from . import ast
from .comments import comment_block
from .diagnostics import ComposerError, did_you_mean, error
from .parse import parse_expr
from .source import Span, register
from .yaml_schema import STAGE_KEYS, STMT_KEYS, FileSchema

# ---- loading --------------------------------------------------------------------

_CORE = "tag:yaml.org,2002:"
_SCALARS = {_CORE + t for t in ("str", "int", "float", "bool", "null")}
_MAX_NODES, _MAX_DEPTH = 200_000, 64  # aliases share nodes: bound the walk (also stops `&a [*a]`)
_STRINGS_LITERAL = ("reference", "paper")  # settings that are plain strings, not expressions
_EXPR_FILE = "<yaml-expression>"


class CoreLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading plain scalars as YAML 1.2's core schema does: only
    true/false (any case as written: true, True, TRUE) are booleans, so YAML 1.1's yes, no, on
    and off stay strings (an expression naming `yes`: a located error where a value is needed);
    no sexagesimal numbers (`1:30` is a string, not 90) and no octal by a leading zero (`017`)."""


CoreLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in {_CORE + "bool", _CORE + "int", _CORE + "float"}]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
CoreLoader.add_implicit_resolver(_CORE + "bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
CoreLoader.add_implicit_resolver(_CORE + "int", re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]{0,3999}))$"), list("-+0123456789"))
CoreLoader.add_implicit_resolver(_CORE + "float", re.compile(
    r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def parse_yaml(text: str, name: str = "<yaml>") -> ast.File:
    """Parse a YAML blueprint into an `ast.File`; raise a located `ComposerError` on any mistake."""
    register(name, text)
    return _Front(text, name).file()


def _plain_words(node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
            "null": "null"}.get(node.tag.rsplit(":", 1)[-1], "a value")


_EXPECTED = {
    "string_type": "a string", "int_type": "an integer", "float_type": "a number", "bool_type": "a boolean",
    "none_required": "null", "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
    "model_attributes_type": "a mapping", "string_pattern_mismatch": "a name (letters, digits, _)",
    "too_short": "a list of two values", "too_long": "a list of two values",
}


class _Front:
    def __init__(self, text: str, name: str):
        self.text, self.name = text, name
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.constructor = yaml.constructor.SafeConstructor()
        self.count = 0
        self.aligned: dict[int, list[int] | None] = {}  # id(scalar node) -> its alignment

    # -- spans
    def _pos(self, index: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.line_starts, index)
        return line, index - self.line_starts[line - 1] + 1

    def _mark_span(self, start: int, end: int) -> Span:
        return Span(self.name, *self._pos(start), *self._pos(end))

    def _end(self, node) -> int:
        # A block collection's end mark lies at the next token (often the next line): use its last child.
        if isinstance(node, yaml.MappingNode) and not node.flow_style and node.value:
            return self._end(node.value[-1][1])
        if isinstance(node, yaml.SequenceNode) and not node.flow_style and node.value:
            return self._end(node.value[-1])
        return node.end_mark.index

    def span(self, node, key=None) -> Span:
        return self._mark_span((key or node).start_mark.index, self._end(node))

    # -- load and validate
    def file(self) -> ast.File:
        try:
            root = yaml.compose(self.text, Loader=CoreLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            at = min(mark.index, len(self.text.rstrip())) if mark else 0  # not past the last line
            hint = None
            if exc.context and exc.context_mark and exc.problem:
                hint = f"{exc.context} at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}"
            raise error("yaml-syntax", f"invalid YAML: {exc.problem or exc.context}",
                        self._mark_span(at, at + 1), hint) from None
        except RecursionError:
            raise error("yaml-size", "the YAML document is nested too deeply", Span(self.name, 1, 1, 1, 2)) from None
        except yaml.YAMLError as exc:
            raise error("yaml-syntax", f"invalid YAML: {exc}", Span(self.name, 1, 1, 1, 2)) from None
        if root is None:
            return ast.File(self.name, doc=self._header())
        data = self._plain(root)
        try:
            FileSchema.model_validate(data)
        except ValidationError as exc:
            raise self._schema_error(root, exc.errors()) from None
        return self._file(root)

    def _plain(self, node, depth: int = 0):
        """Plain Python data for pydantic; rejects non-core tags, duplicate keys and recursive aliases."""
        self.count += 1
        if self.count > _MAX_NODES or depth > _MAX_DEPTH:
            raise error("yaml-size", "the YAML document is too large, too deep or its aliases are recursive",
                        self._mark_span(node.start_mark.index, node.start_mark.index + 1))
        if isinstance(node, yaml.ScalarNode):
            if node.tag not in _SCALARS:
                raise self._tag_error(node)
            return self.constructor.construct_object(node)
        if node.tag not in (_CORE + "seq", _CORE + "map"):
            raise self._tag_error(node)
        if isinstance(node, yaml.SequenceNode):
            return [self._plain(n, depth + 1) for n in node.value]
        out = {}
        for k, v in node.value:
            key = self._plain(k, depth + 1)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise error("yaml-schema", "a key must be a name", self.span(k))
            if key in out:
                raise error("yaml-schema", f"duplicate key '{key}'", self.span(k), "each key may appear once")
            out[key] = self._plain(v, depth + 1)
        return out

    def _tag_error(self, node) -> ComposerError:
        tag, at = node.tag.replace(_CORE, "!!"), node.start_mark.index
        span = self._mark_span(at, at + 1)
        if self.text.startswith("!", at):
            return error("yaml-tag", f"YAML tag '{tag}' is not allowed in a blueprint", span,
                         "blueprints use plain YAML: strings, numbers, booleans, null, lists and mappings")
        return error("yaml-tag", f"YAML reads this value as '{tag}', which is not a blueprint value", span,
                     "quote it to make it a string")

    def _locate(self, root, loc) -> tuple[Any, int, Any]:
        """Follow a pydantic `loc` through the YAML nodes: (node, depth, key node of the last step)."""
        node, depth, key = root, 0, None
        for i, part in enumerate(loc):
            if isinstance(node, yaml.MappingNode):
                pair = next(((k, v) for k, v in node.value if self.constructor.construct_object(k) == part), None)
                if pair is None:
                    continue  # a union member's name, or a missing key
                if i + 1 < len(loc) and loc[i + 1] == "[key]":
                    return pair[0], depth + 1, None
                key, node, depth = pair[0], pair[1], depth + 1
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                key, node, depth = None, node.value[part], depth + 1
        return node, depth, key

    def _schema_error(self, root, errors) -> ComposerError:
        located = [(self._locate(root, e["loc"]), e) for e in errors]
        # The deepest error is the most specific; an unknown key sits one level below its mapping.
        best = max(d + (e["type"] == "unknown_key") for (_, d, _), e in located)
        here = [(n, k, e) for (n, d, k), e in located if d + (e["type"] == "unknown_key") == best]
        node, key, _ = here[0]
        for n, _, e in here:
            if e["type"] == "unknown_key":
                bad = e["ctx"]["key"]
                knode = next((k for k, _ in n.value if self.constructor.construct_object(k) == bad), n)
                allowed = e["ctx"]["allowed"]
                return error("yaml-schema", f"unknown key '{bad}'", self.span(knode),
                             did_you_mean(str(bad), allowed) or did_you_mean(str(bad), STMT_KEYS + STAGE_KEYS)
                             or "allowed keys: " + ", ".join(allowed))
        for n, _, e in here:
            if e["type"] == "missing":
                return error("yaml-schema", f"missing key '{e['loc'][-1]}'", self.span(n, key))
        for n, _, e in here:
            if e["type"] == "unknown_form":
                keys = [self.constructor.construct_object(k) for k, _ in n.value] if isinstance(
                    n, yaml.MappingNode) else []
                if keys:
                    return error("yaml-schema", f"unknown {e['ctx']['noun']} '{keys[0]}'", self.span(n),
                                 did_you_mean(str(keys[0]), e["ctx"]["allowed"]) or e["msg"])
                return error("yaml-schema", f"got {_plain_words(n)}: {e['msg']}", self.span(n))
        expected = list(dict.fromkeys(_EXPECTED[e["type"]] for _, _, e in here if e["type"] in _EXPECTED))
        if expected:
            return error("yaml-schema", f"expected {' or '.join(expected)}, got {_plain_words(node)}", self.span(node))
        return error("yaml-schema", here[0][2]["msg"], self.span(node, key))

    # -- expressions
    def _align(self, node) -> list[int] | None:
        """Source index of each character of a string scalar's value (escapes and folding skipped)."""
        j, stop = node.start_mark.index, node.end_mark.index
        if node.style in ("|", ">"):
            j = self.text.index("\n", j) + 1
        elif node.style in ('"', "'"):
            j += 1
        out = []
        for ch in node.value:
            while j < stop and self.text[j] != ch:
                j += 1
            if j >= stop:
                return None
            out.append(j)
            j += 1
        return out

    def _scalar_span(self, node, a: int, b: int) -> Span:
        """The span of value characters [a, b) of a string scalar."""
        if id(node) not in self.aligned:
            self.aligned[id(node)] = self._align(node)
        index = self.aligned[id(node)]
        base = node.start_mark.index + (node.style in ('"', "'"))
        if not index:  # alignment failed (e.g. an escape like \n): count from the scalar's start
            return self._mark_span(base + a, base + max(b, a + 1))

        def at(k: int) -> int:
            return index[k] if k < len(index) else index[-1] + 1 + k - len(index)

        return self._mark_span(at(a), at(b - 1) + 1 if b > a else at(a) + 1)

    def _shift(self, obj, node, a: int, sub: str):
        """Move spans of an expression parsed from `value[a:]` (text `sub`) into the YAML file."""
        lines = [0] + [m.end() for m in re.finditer("\n", sub)]

        def fix(s: Span) -> Span:
            lo = a + lines[min(s.line, len(lines)) - 1] + s.column - 1
            hi = a + lines[min(s.end_line, len(lines)) - 1] + s.end_column - 1
            return self._scalar_span(node, lo, hi)

        def walk(x):
            if isinstance(x, Span):
                return fix(x)
            if isinstance(x, tuple):
                return tuple(walk(y) for y in x)
            if dataclasses.is_dataclass(x):
                return dataclasses.replace(x, **{f.name: walk(getattr(x, f.name)) for f in dataclasses.fields(x)})
            return x

        return walk(obj)

    def expr(self, node, a: int = 0, b: int | None = None, statement: bool = False) -> ast.Expr:
        """The expression in characters [a, b) of a string scalar; `statement`: a statement's or a
        block's value, whose list elements may name their layers (`[conv(8, 3) as proj, relu]`)."""
        sub = node.value[a:b]
        try:
            return self._shift(parse_expr(sub, _EXPR_FILE, statement), node, a, sub)
        except ComposerError as exc:
            for d in exc.diagnostics:
                if d.span is not None and d.span.file == _EXPR_FILE:
                    d.span = self._shift(d.span, node, a, sub)
            if node.style is None and self.text.startswith(",", node.end_mark.index):
                exc.diagnostics[0].hint = "YAML splits [...] and {...} at commas: quote this expression"
            raise ComposerError(exc.diagnostics) from None

    def value(self, node, layer: bool = False) -> ast.Expr:
        """A value; `layer`: a block's value, whose list items may be "expr as name"."""
        if isinstance(node, yaml.SequenceNode):
            if layer:
                return ast.ListExpr(tuple(self._layer_item(n) for n in node.value), self.span(node))
            return ast.ListExpr(tuple(self.value(n) for n in node.value), self.span(node))
        if node.tag == _CORE + "str":
            return self.expr(node, statement=layer)
        return ast.Literal(self.constructor.construct_object(node), self.span(node))

    def _layer_item(self, node) -> ast.Expr:
        """An item of a block's list value: a value, or "expr as name" (a `Named` element)."""
        if isinstance(node, yaml.SequenceNode) or node.tag != _CORE + "str":
            return self.value(node, layer=True)
        apply = self.apply(node)
        return apply.expr if apply.alias is None else ast.Named(apply.expr, apply.alias, apply.span)

    # -- structure
    @staticmethod
    def pairs(node):
        return [(k.value, k, v) for k, v in node.value]

    def entry(self, node, key):
        """(key node, value node) of `key` in a mapping node, or (None, None)."""
        return next(((kn, v) for k, kn, v in self.pairs(node) if k == key), (None, None))

    def get(self, node, key):
        return self.entry(node, key)[1]

    def _header(self) -> str:
        head = []
        for line in self.text.splitlines():
            if not line.lstrip().startswith("#"):
                break
            head.append(line.lstrip()[1:].strip())
        return "\n".join(head)

    def _file(self, root) -> ast.File:
        doc = self.get(root, "doc")
        file = ast.File(self.name, doc=doc.value if doc is not None else self._header())
        lines = self.text.splitlines()
        for key, knode, v in self.pairs(root):
            if key == "imports":
                for n in ([v] if isinstance(v, yaml.ScalarNode) else v.value):
                    file.imports.append(ast.Import(n.value, self.span(n)))
            elif key in ("blocks", "mixers"):
                for cname, cnode, c in self.pairs(v):
                    cdoc = self.get(c, "doc")
                    cdoc = cdoc.value if cdoc is not None else comment_block(lines, cnode.start_mark.line + 1)
                    file.composites.append(ast.CompositeDef(
                        key[:-1], cname, self._params(c), self.stmts(self.get(c, "body")), self.span(c, cnode),
                        self.name, cdoc))
            elif key == "models":
                file.models += [self._model(mname, mnode, m) for mname, mnode, m in self.pairs(v)]
        return file

    def _params(self, node) -> tuple:
        params = self.get(node, "params")
        if params is None:
            return ()
        return tuple(ast.Param(k, None if _is_null(v) else self.value(v), self.span(v, kn))
                     for k, kn, v in self.pairs(params))

    def _assign(self, key, knode, v) -> ast.Assign:
        if key in _STRINGS_LITERAL and v.tag == _CORE + "str":
            return ast.Assign(key, ast.Literal(v.value, self.span(v)), self.span(v, knode))
        return ast.Assign(key, self.value(v), self.span(v, knode))

    def _model(self, name, knode, node) -> ast.ModelDef:
        body = []
        for key, kn, v in self.pairs(node):
            if key in ("reference", "paper", "drop_path"):
                body.append(self._assign(key, kn, v))
            elif key == "set":
                body += [self._assign(k, skn, sv) for k, skn, sv in self.pairs(v)]
            elif key == "let":
                body += self._lets(v)
            elif key == "input":
                body.append(ast.Input(self.value(v), self.span(v, kn)))
            elif key in ("stem", "head"):
                body.append(self.section(key, kn, v))
            elif key == "stages":
                body += [self._stage(s) for s in v.value]
        base = self.get(node, "base")
        return ast.ModelDef(name, self._params(node), base.value if base is not None else None, tuple(body),
                            self.span(node, knode), self.name)

    def _lets(self, node) -> list:
        return [ast.Let(k, self.value(v), self.span(v, kn)) for k, kn, v in self.pairs(node)]

    def section(self, kind, knode, node) -> ast.Section:
        body = (self.apply(node),) if isinstance(node, yaml.ScalarNode) else self.stmts(node)
        return ast.Section(kind, body, self.span(node, knode))

    def _stage(self, node) -> ast.Stage:
        items = []
        for item in self.get(node, "body").value:
            key = next(k for k in STAGE_KEYS if self.get(item, k) is not None)
            kn, v = self.entry(item, key)
            if key == "let":
                items += self._lets(v)
            elif key in ("downsample", "after"):
                items.append(self.section("downsample" if key == "downsample" else "norm", kn, v))
            elif key == "repeat":
                var, body = self.get(item, "as"), self.get(item, "body")
                block = self.value(self.get(item, "block"), layer=True) if body is None else self.stmts(body)
                items.append(ast.Repeat(self.value(self.get(item, "repeat")), None if var is None else var.value,
                                        block, self.span(item)))
            elif key == "body":
                items.append(ast.Repeat(None, None, self.stmts(v), self.span(item)))
            elif key == "reuse":
                items.append(ast.Reuse(v.value, self.span(item)))
            else:
                items.append(ast.Repeat(None, None, self.value(v, layer=True), self.span(item)))
        var, rng = self.get(node, "for"), self.get(node, "range")
        if var is None:
            return ast.Stage(tuple(items), self.span(node))
        start, stop = self._range(rng)
        return ast.Stage(tuple(items), self.span(node), var.value, start, stop)

    def _range(self, rng) -> tuple:
        """(start, stop) of `range: a..b` or `range: [a, b]`."""
        if isinstance(rng, yaml.SequenceNode):
            start, stop = (self.value(n) for n in rng.value)
            return start, stop
        cut = rng.value.find("..")
        if cut < 0:
            raise error("yaml-schema", "a range is `start..stop` or [start, stop]", self.span(rng))
        return self.expr(rng, 0, cut), self.expr(rng, cut + 2)

    # -- statements
    def stmts(self, node) -> tuple:
        out = []
        for item in node.value:
            if isinstance(item, yaml.ScalarNode):
                out.append(self.apply(item))
                continue
            key = next(k for k in STMT_KEYS if self.get(item, k) is not None)
            v = self.get(item, key)
            if key == "let":
                out += self._lets(v)
            elif key == "residual":
                out.append(self._residual(item, v))
            elif key in ("save", "from"):
                out.append((ast.Save if key == "save" else ast.Load)(v.value, self.span(item)))
            elif key == "reuse":
                out.append(ast.Reuse(v.value, self.span(item)))
            elif key == "bind":
                out.append(self._bind(item, v))
            else:
                out.append(self._parallel(item, v))
        return tuple(out)

    def apply(self, node) -> ast.Apply:
        text = node.value
        lo, hi = len(text) - len(text.lstrip()), len(text.rstrip())
        m = re.search(r"\s+as\s+([A-Za-z_][A-Za-z0-9_]*)\s*$", text)
        alias = m.group(1) if m and text[:m.start()].strip() else None
        expr = self.expr(node, 0, m.start() if alias else None, statement=True)
        return ast.Apply(expr, alias, self._scalar_span(node, lo, max(hi, lo + 1)))

    def _kwargs(self, node, names) -> tuple:
        return tuple((k, self.value(v), self.span(kn)) for k, kn, v in self.pairs(node) if k in names)

    def _bind(self, item, v) -> ast.Bind:
        names = tuple(n.value for n in v.value) if isinstance(v, yaml.SequenceNode) else (v.value,)
        body = self.get(item, "body")
        if body is not None:
            return ast.Bind(names, None, None, self.stmts(body), self.span(item))
        value = self.apply(self.get(item, "value"))
        return ast.Bind(names, value.expr, value.alias, None, self.span(item))

    def _residual(self, item, v) -> ast.Residual:
        if isinstance(v, yaml.SequenceNode):
            return ast.Residual((), (), self.stmts(v), self.span(item))
        return ast.Residual((), self._kwargs(v, ("shortcut", "when")), self.stmts(self.get(v, "body")), self.span(item))

    def _parallel(self, item, v) -> ast.Parallel | ast.ParallelFor:
        var = self.get(v, "for")
        if var is not None:  # branches from a loop
            rng = self.get(v, "range")
            start, stop = self._range(rng) if rng is not None else (self.value(self.get(v, "in")), None)
            return ast.ParallelFor(self.get(v, "merge").value, (), self._kwargs(v, ("split",)), var.value, start,
                                   stop, self.stmts(self.get(v, "body")), self.span(item))
        nodes = self.get(v, "branches").value
        for b in nodes:
            if isinstance(b, yaml.SequenceNode) and not b.value:
                raise error("yaml-schema", "an empty parallel branch", self.span(b),
                            "write `identity` for a branch that passes the input through")
        branches = tuple((self.apply(b),) if isinstance(b, yaml.ScalarNode) else self.stmts(b) for b in nodes)
        return ast.Parallel(self.get(v, "merge").value, (), self._kwargs(v, ("split",)), branches, self.span(item))


def _is_null(node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _CORE + "null"
