"""Parse .arch text (Lark, LALR) into the `ast` of one file: the grammar's callbacks
(composer/parse_callbacks.py) build the AST while Lark reduces (composer/lalr.py runs Lark's loop
faster). A syntax error is described by
composer/parse_errors.py. YAML is composer/yaml_read.py's; choosing between them by a file's
suffix is composer/loader.py's."""

from __future__ import annotations

import functools
import threading

from lark import Lark

from . import ast, lalr
from .comments import comment_block
from .diagnostics import ComposerError, error
from .locate import GRAMMAR_DIR
from .parse_callbacks import Callbacks, unwrapped
from .parse_errors import SYNTAX_ERRORS, syntax_error
from .source import Span, register

# Newlines end statements, except inside () or [], after a token that cannot end a statement, or
# before one that cannot start one: `let x = a +` / `    b` is one statement.
_OPEN, _CLOSE = {"LPAR", "LSQB"}, {"RPAR", "RSQB"}
_CONTINUES = {
    "ADD", "MUL", "POW", "COMPARE", "COMMA", "EQUAL", "QMARK", "COLON", "AND", "OR", "NOT", "LBRACE", "__ANON_0",
    "AFTER", "AS", "BLOCK", "DOWNSAMPLE", "FOR", "HEAD", "IMPORT", "IN", "INPUT", "KIND", "LET", "MODEL",
    "PARALLEL", "REPEAT", "RESIDUAL", "REUSE", "STAGE", "STAGES", "STEM",
}
_JOINS = {"LBRACE", "QMARK", "COLON"}
_KINDS: dict = {}  # terminal name -> its name without the grammar prefix (`expr__ADD` -> `ADD`)


class _Newlines:
    """Post-lexer: drop the newline tokens that do not end a statement."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth, held, last = 0, None, None
        kinds = _KINDS
        runs, nesting = [0], 0  # see `_nested`
        for count, tok in enumerate(stream):
            if count == MAX_TOKENS:
                raise _too_long(tok)
            kind = kinds.get(tok.type)
            if kind is None:
                kind = kinds[tok.type] = tok.type.split("__")[-1]
            if kind == "_NL":
                if depth == 0 and last not in _CONTINUES and last is not None:
                    held = held or tok
                continue
            if held is not None and kind not in _JOINS:
                yield held
                nesting -= runs[-1]
                runs[-1] = 0
            held = None
            depth += kind in _OPEN
            depth -= kind in _CLOSE and depth > 0
            last = kind
            if kind in _NESTING:  # how deep the tree of what is open here can be
                step = _NESTING[kind]
                if step > 0:
                    runs[-1] += 1
                    nesting += 1
                    if step == 2:
                        runs.append(0)
                        nesting += 1
                    if nesting > MAX_NESTING:
                        raise _nested(tok)
                elif step < 0 and len(runs) > 1:
                    nesting -= runs.pop() + 1
                elif step == 0:
                    nesting -= runs[-1]
                    runs[-1] = 0
            yield tok
        if held is not None:
            yield held


# Nesting: every walker of the tree (the evaluator, the formatter, lowering) recurses once or a few
# times a level, so the parser refuses a tree deeper than MAX_NESTING, counted on the tokens: an
# opening bracket or brace (2: a level of its own and a step of the run it is in), an operator (1:
# `1 + 1 + ... + 1` and `- - 1` are as deep as they are long), a separator (0: a new run at the
# same level), a closing bracket (-1: back to the level it opened from).
MAX_NESTING = 100
_NESTING = {"LPAR": 2, "LSQB": 2, "LBRACE": 2, "RPAR": -1, "RSQB": -1, "RBRACE": -1, "COMMA": 0, "SEMICOLON": 0,
            "ADD": 1, "MUL": 1, "POW": 1, "COMPARE": 1, "AND": 1, "OR": 1, "NOT": 1, "QMARK": 1}


# Length: parsing costs about 10 us a token, so a file is limited to MAX_TOKENS (about half a second;
# the zoo's longest file has about 2,200).
MAX_TOKENS = 50_000


def _too_long(tok) -> ComposerError:
    span = Span(_CALLBACKS.file if _CALLBACKS else "<string>", tok.line, tok.column, tok.end_line, tok.end_column)
    return error("too-large", f"too large: a blueprint file is limited to {MAX_TOKENS:,} tokens (words, numbers "
                 "and symbols)", span, "split it into files that import each other")


def _nested(tok) -> ComposerError:
    span = Span(_CALLBACKS.file if _CALLBACKS else "<string>", tok.line, tok.column, tok.end_line, tok.end_column)
    return error("too-deep", f"too deeply nested: more than {MAX_NESTING} levels of brackets, blocks or operators",
                 span, "split the expression with `let`, or the body into blocks")


_CALLBACKS = None  # the `Callbacks` the cached parser was made with
_LOCK = threading.Lock()  # one parse at a time: the callbacks hold the file name and first error


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    global _CALLBACKS
    callbacks = Callbacks()
    parser = Lark.open(
        str(GRAMMAR_DIR / "arch.lark"), parser="lalr", maybe_placeholders=True, keep_all_tokens=True,
        start=["start", "expr"], postlex=_Newlines(), transformer=callbacks,
        cache=True,  # LALR tables cached in the temp dir
    )
    _CALLBACKS = callbacks
    return parser


def _run(text: str, start: str):
    driver = lalr.driver(_parser())
    if driver is not None:
        try:
            return driver.parse(text, start)
        except (AttributeError, TypeError):  # Lark's internals differ after all: its own loop, from the start
            _CALLBACKS.error = None
    return _parser().parse(text, start=start)


def parse_text(text: str, name: str = "<string>") -> ast.File:
    """Parse .arch text into an `ast.File`; raise `ComposerError` on a syntax error."""
    return _parse(text, name, "start")


def parse_expr(text: str, name: str = "<expr>", statement: bool = False) -> ast.Expr:
    """Parse one expression (a `--set` value, a YAML string) with the same grammar. `statement`:
    it is a statement's or a block's value, so the elements of its lists may name their layers."""
    return _parse(text, name, "expr", statement)


def _parse(text: str, name: str, start: str, statement: bool = False):
    register(name, text)
    _parser()  # made (and `_CALLBACKS` set) before the lock is taken
    try:
        with _LOCK:
            _CALLBACKS.file, _CALLBACKS.error = name, None
            _CALLBACKS.named, _CALLBACKS.placed = [], set()
            try:
                result = _run(text, start)
            finally:
                found, _CALLBACKS.error = _CALLBACKS.error, None
                named, placed = _CALLBACKS.named, _CALLBACKS.placed
                _CALLBACKS.named, _CALLBACKS.placed = [], set()
    except SYNTAX_ERRORS as exc:
        raise syntax_error(exc, text, name) from None
    if found is not None:
        raise found
    result = unwrapped(result)
    if named:  # `x as name` in a list: only where the list is a statement's value
        if statement:
            placed.update(map(id, ast.layer_names(result)))
        stray = [n for n in named if id(n) not in placed]
        if stray:
            raise error("misplaced-name", "names are for layers: `as NAME` names an element of a list that is a "
                        "statement's value", stray[0].span,
                        "write the list as the statement (`[conv(8, 3) as proj, relu]`, `repeat 2: [...]`, "
                        "`downsample c ? [...] : none`), or drop `as`") from None
    if isinstance(result, ast.File):
        _attach_docs(result, text)
    return result


def _attach_docs(file: ast.File, text: str) -> None:
    lines = text.splitlines()
    head = []
    for line in lines:
        if not line.lstrip().startswith("#"):
            break
        head.append(line.lstrip()[1:].strip())
    file.doc = "\n".join(head)
    file.composites = [
        ast.CompositeDef(c.kind, c.name, c.params, c.body, c.span, c.file, comment_block(lines, c.span.line))
        for c in file.composites
    ]
