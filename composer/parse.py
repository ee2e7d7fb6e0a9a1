"""Parse .arch text (Lark, LALR) or YAML into the `ast` of one file."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from lark import Lark, Token, Transformer, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken, VisitError

from . import ast
from .diagnostics import ComposerError, error
from .locate import GRAMMAR_DIR
from .source import Span, register

_TOKEN_WORDS = {
    "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'",
    "COMMA": "','", "COLON": "':'", "SEMICOLON": "';'", "EQUAL": "'='", "QMARK": "'?'",
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "STRING": "a string",
    "KIND": "'block' or 'mixer'", "ADD": "'+' or '-'", "MUL": "'*', '/', '//' or '%'",
    "COMPARE": "a comparison", "POW": "'**'", "MINUS": "'-'", "$END": "the end of the file",
}


# Newlines end statements, except inside () or [], after a token that cannot end a statement, or
# before one that cannot start one: `let x = a +` / `    b` is one statement.
_OPEN, _CLOSE = {"LPAR", "LSQB"}, {"RPAR", "RSQB"}
_CONTINUES = {
    "ADD", "MUL", "POW", "COMPARE", "COMMA", "EQUAL", "QMARK", "COLON", "AND", "OR", "NOT", "LBRACE", "__ANON_0",
    "AFTER", "AS", "BLOCK", "DOWNSAMPLE", "FOR", "HEAD", "IMPORT", "IN", "INPUT", "KIND", "LET", "MODEL",
    "PARALLEL", "REPEAT", "RESIDUAL", "STAGE", "STAGES", "STEM",
}
_JOINS = {"LBRACE", "QMARK", "COLON"}


class _Newlines:
    """Post-lexer: drop the newline tokens that do not end a statement."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth, held, last = 0, None, None
        for tok in stream:
            kind = tok.type.split("__")[-1]
            if kind == "_NL":
                if depth == 0 and last not in _CONTINUES and last is not None:
                    held = held or tok
                continue
            if held is not None and kind not in _JOINS:
                yield held
            held = None
            depth += kind in _OPEN
            depth -= kind in _CLOSE and depth > 0
            last = kind
            yield tok
        if held is not None:
            yield held


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark.open(
        str(GRAMMAR_DIR / "arch.lark"), parser="lalr", propagate_positions=True, maybe_placeholders=True,
        start=["start", "expr"], postlex=_Newlines(), cache=True,  # LALR tables cached in the temp dir
    )


def _describe(terminal: str) -> str:
    name = terminal.split("__")[-1]
    if name in _TOKEN_WORDS:
        return _TOKEN_WORDS[name]
    if name.isupper() and name.isalpha():
        return f"'{name.lower()}'"
    return name.lower()


def _eof_hint(text: str) -> str:
    """Name the innermost bracket left open at the end of the file (comments and strings skipped)."""
    stack = []
    for n, line in enumerate(text.splitlines(), 1):
        for ch in re.sub(r'"[^"]*"|#.*', "", line):
            if ch in "{([":
                stack.append((ch, n, line.strip()))
            elif ch in "})]" and stack:
                stack.pop()
    if not stack:
        return "the file ends in the middle of a statement"
    ch, n, line = stack[-1]
    return f"the '{ch}' opened on line {n} (`{line}`) is never closed"


def parse_text(text: str, name: str = "<string>") -> ast.File:
    """Parse .arch text into an `ast.File`; raise `ComposerError` on a syntax error."""
    return _parse(text, name, "start")


def parse_expr(text: str, name: str = "<expr>") -> ast.Expr:
    """Parse one expression (a `--set` value, a YAML string) with the same grammar."""
    return _parse(text, name, "expr")


def _parse(text: str, name: str, start: str):
    register(name, text)
    try:
        tree = _parser().parse(text, start=start)
    except UnexpectedEOF:
        lines = text.splitlines() or [""]
        span = Span(name, len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
        raise error("syntax", "unexpected end of file", span, "a '}' or ')' may be missing") from None
    except UnexpectedCharacters as exc:
        span = Span(name, exc.line, exc.column, exc.line, exc.column + 1)
        if text[exc.pos_in_stream] == '"':
            raise error("syntax", "unterminated string", span, 'a string ends with " on the same line') from None
        raise error("syntax", f"unexpected character {text[exc.pos_in_stream]!r}", span) from None
    except UnexpectedToken as exc:
        tok = exc.token
        if tok.type == "$END":
            lines = text.splitlines() or [""]
            span = Span(name, len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
            raise error("syntax", "unexpected end of file", span, _eof_hint(text)) from None
        want = {t.split("__")[-1] for t in exc.expected if not t.startswith("_")}
        starts = {"LPAR", "LSQB", "ADD", "MINUS", "NAME", "INT", "FLOAT", "STRING", "NONE", "TRUE", "FALSE", "NOT"}
        if {"NAME", "INT", "LPAR"} <= want:  # an expression may start here: say so once
            want = (want - starts) | {"an expression"}
        expected = sorted({_describe(t) if t != "an expression" else t for t in want})
        span = Span(name, tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1)
        hint = "expected " + (", ".join(expected[:-1]) + " or " if len(expected) > 1 else "") + expected[-1] \
            if expected else None
        kind = tok.type.split("__")[-1]
        is_value = kind in ("NAME", "INT", "FLOAT", "STRING")
        closer = next((c for c in ("RPAR", "RSQB", "RBRACE") if c in want), None)
        if closer and kind.isalpha() and kind.isupper() and not is_value:  # a keyword: a bracket left open
            hint = f"is a {_TOKEN_WORDS[closer]} missing before it? ({hint})"
        elif "REPEAT" in want and kind == "NAME":
            hint = f"write `block {tok}` or `repeat N {tok}`: a stage holds blocks, `downsample`, `after` and `let`"
        elif "COMMA" in want and is_value:
            hint = f"is a ',' missing before it? ({hint})"
        what = repr(str(tok)) if is_value else _describe(tok.type)
        raise error("syntax", f"unexpected {what}", span, hint) from None
    try:
        result = _ToAst(name).transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, ComposerError):
            raise exc.orig_exc from None
        raise
    if isinstance(result, ast.File):
        _attach_docs(result, text)
    return result


def parse_file(path: str | Path) -> ast.File:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error("io", f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    if path.suffix in (".yaml", ".yml"):
        from .yaml_front import parse_yaml

        return parse_yaml(text, str(path))
    return parse_text(text, str(path))


def _comment_block(lines: list[str], line_no: int) -> str:
    """The `#` comment lines directly above line `line_no` (1-based), as text."""
    out = []
    i = line_no - 2
    while i >= 0 and lines[i].lstrip().startswith("#"):
        out.append(lines[i].lstrip()[1:].strip())
        i -= 1
    return "\n".join(reversed(out))


def _attach_docs(file: ast.File, text: str) -> None:
    lines = text.splitlines()
    head = []
    for line in lines:
        if not line.lstrip().startswith("#"):
            break
        head.append(line.lstrip()[1:].strip())
    file.doc = "\n".join(head)
    file.composites = [
        ast.CompositeDef(c.kind, c.name, c.params, c.body, c.span, c.file, _comment_block(lines, c.span.line))
        for c in file.composites
    ]


def _flatten_args(arglist) -> tuple[tuple, tuple]:
    args, kwargs, seen_kw = [], [], False
    for item in (arglist.children if isinstance(arglist, Tree) else []):
        if isinstance(item, tuple):
            kwargs.append(item)
            seen_kw = True
        else:
            if seen_kw:
                raise error("syntax", "positional argument after keyword argument", item.span)
            args.append(item)
    names = [k[0] for k in kwargs]
    for i, (kname, _, span) in enumerate(kwargs):
        if kname in names[:i]:
            raise error("duplicate-argument", f"argument '{kname}' given twice", span)
    return tuple(args), tuple(kwargs)


class _ToAst(Transformer):
    """Rule-named methods turn the Lark tree into `ast` nodes (expression rules carry an `expr__` prefix)."""

    def __init__(self, filename: str):
        super().__init__()
        self.filename = filename

    def _span(self, meta) -> Span:
        return Span(self.filename, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok_span(self, tok: Token) -> Span:
        return Span(self.filename, tok.line, tok.column, tok.end_line, tok.end_column)

    def __default__(self, data, children, meta):
        name = data.split("__")[-1] if isinstance(data, str) else data
        method = getattr(self, "_" + name, None)
        if method is None:
            return Tree(name, children, meta)
        return method(children, meta)

    # ---- expressions
    def _int_lit(self, c, meta):
        return ast.Literal(int(str(c[0]).replace("_", "")), self._span(meta))

    def _float_lit(self, c, meta):
        return ast.Literal(float(str(c[0]).replace("_", "")), self._span(meta))

    def _str_lit(self, c, meta):
        return ast.Literal(str(c[0])[1:-1], self._span(meta))

    def _none_lit(self, c, meta):
        return ast.Literal(None, self._span(meta))

    def _true_lit(self, c, meta):
        return ast.Literal(True, self._span(meta))

    def _false_lit(self, c, meta):
        return ast.Literal(False, self._span(meta))

    def _name(self, c, meta):
        return ast.Name(str(c[0]), self._span(meta))

    def _list_lit(self, c, meta):
        return ast.ListExpr(tuple(x for x in c if x is not None), self._span(meta))

    def _list_comp(self, c, meta):
        return ast.ListComp(c[0], str(c[1]), c[2], self._span(meta))

    def _index(self, c, meta):
        return ast.Index(c[0], c[1], self._span(meta))

    def _call(self, c, meta):
        args, kwargs = _flatten_args(c[1])
        return ast.Call(c[0], args, kwargs, self._span(meta))

    def _kwarg(self, c, meta):
        return (str(c[0]), c[1], self._tok_span(c[0]))

    def _binop(self, c, meta):
        return ast.BinOp(str(c[1]), c[0], c[2], self._span(meta))

    def _neg(self, c, meta):
        if str(c[0]) == "+":
            return c[1]
        return ast.UnaryOp("-", c[1], self._span(meta))

    def _not_op(self, c, meta):
        return ast.UnaryOp("not", c[0], self._span(meta))

    def _and_op(self, c, meta):
        return ast.BinOp("and", c[0], c[1], self._span(meta))

    def _or_op(self, c, meta):
        return ast.BinOp("or", c[0], c[1], self._span(meta))

    def _conditional(self, c, meta):
        return ast.Conditional(c[0], c[1], c[2], self._span(meta))

    # ---- statements
    def _empty(self, c, meta):
        return None

    def _save_stmt(self, c, meta):
        return ast.Save(str(c[0]), self._span(meta))

    def _from_stmt(self, c, meta):
        return ast.Load(str(c[0]), self._span(meta))

    def _let_stmt(self, c, meta):
        return ast.Let(str(c[0]), c[1], self._span(meta))

    def _assign_stmt(self, c, meta):
        return ast.Assign(str(c[0]), c[1], self._span(meta))

    def _apply_stmt(self, c, meta):
        return ast.Apply(c[0], str(c[1]) if c[1] is not None else None, self._span(meta))

    def _seq(self, c, meta):
        return tuple(x for x in c if x is not None)

    def _residual_stmt(self, c, meta):
        args, kwargs = _flatten_args(c[0])
        return ast.Residual(args, kwargs, tuple(x for x in c[1:] if x is not None), self._span(meta))

    def _parallel_stmt(self, c, meta):
        args, kwargs = _flatten_args(c[1])
        branches = tuple(b if isinstance(b, tuple) else (b,) for b in c[2:] if b is not None)
        return ast.Parallel(str(c[0]), args, kwargs, branches, self._span(meta))

    def _section(self, kind, c, meta):
        body = c[0] if isinstance(c[0], tuple) else (c[0],)
        return ast.Section(kind, body, self._span(meta))

    def _stem_stmt(self, c, meta):
        return self._section("stem", c, meta)

    def _head_stmt(self, c, meta):
        return self._section("head", c, meta)

    def _downsample_stmt(self, c, meta):
        return self._section("downsample", c, meta)

    def _stage_norm_stmt(self, c, meta):
        return self._section("norm", c, meta)

    def _repeat_stmt(self, c, meta):
        return ast.Repeat(c[0], str(c[1]) if c[1] is not None else None, c[2], self._span(meta))

    def _single_block(self, c, meta):
        return ast.Repeat(None, None, c[0], self._span(meta))

    def _stages_stmt(self, c, meta):
        items = tuple(x for x in c[3:] if x is not None)
        return ast.Stage(items, self._span(meta), str(c[0]), c[1], c[2])

    def _stage_stmt(self, c, meta):
        return ast.Stage(tuple(x for x in c if x is not None), self._span(meta))

    def _input_stmt(self, c, meta):
        return ast.Input(c[0], self._span(meta))

    def _param(self, c, meta):
        return ast.Param(str(c[0]), c[1], self._span(meta))

    def _params(self, c, meta):
        params = tuple(p for p in c if p is not None)
        names = [p.name for p in params]
        for i, p in enumerate(params):
            if p.name in names[:i]:
                raise error("duplicate-parameter", f"parameter '{p.name}' declared twice", p.span)
        return params

    def _model_def(self, c, meta):
        name, params, base = str(c[0]), c[1] or (), c[2]
        body = tuple(x for x in c[3:] if x is not None)
        return ast.ModelDef(name, params, str(base) if base is not None else None, body, self._span(meta), self.filename)

    def _composite_def(self, c, meta):
        kind, name, params = str(c[0]), str(c[1]), c[2] or ()
        body = tuple(x for x in c[3:] if x is not None)
        return ast.CompositeDef(kind, name, params, body, self._span(meta), self.filename)

    def _import_stmt(self, c, meta):
        return ast.Import(str(c[0])[1:-1], self._span(meta))

    def _start(self, c, meta):
        file = ast.File(self.filename)
        for item in c:
            if isinstance(item, ast.Import):
                file.imports.append(item)
            elif isinstance(item, ast.ModelDef):
                file.models.append(item)
            elif isinstance(item, ast.CompositeDef):
                file.composites.append(item)
        return file
