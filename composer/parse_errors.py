"""Lark's syntax errors as composer diagnostics: what `parse` raises when .arch text does not
parse (the token that was unexpected, in words, and what could stand there instead)."""

from __future__ import annotations

import re

from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken

from .diagnostics import ComposerError, error
from .source import Span

_TOKEN_WORDS = {
    "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'",
    "COMMA": "','", "COLON": "':'", "SEMICOLON": "';'", "EQUAL": "'='", "QMARK": "'?'",
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "STRING": "a string",
    "KIND": "'block' or 'mixer'", "ADD": "'+' or '-'", "MUL": "'*', '/', '//' or '%'",
    "COMPARE": "a comparison", "POW": "'**'", "MINUS": "'-'", "$END": "the end of the file",
    "MODULE_PATH": "a module path (e.g. stages.0)",
}

SYNTAX_ERRORS = (UnexpectedEOF, UnexpectedCharacters, UnexpectedToken)  # what `syntax_error` takes


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


def _end_of_file(text: str, name: str) -> Span:
    lines = text.splitlines() or [""]
    return Span(name, len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)


def _line_before(text: str, tok) -> str:
    """The text of the token's line before it."""
    start = text.rfind("\n", 0, tok.start_pos) + 1 if tok.start_pos is not None else 0
    return text[start:tok.start_pos] if tok.start_pos is not None else ""


def syntax_error(exc: Exception, text: str, name: str) -> ComposerError:
    """The diagnostic for Lark's `exc` (one of `SYNTAX_ERRORS`), raised parsing `text` of file `name`."""
    if isinstance(exc, UnexpectedEOF):
        return error("syntax", "unexpected end of file", _end_of_file(text, name), "a '}' or ')' may be missing")
    if isinstance(exc, UnexpectedCharacters):
        span = Span(name, exc.line, exc.column, exc.line, exc.column + 1)
        if text[exc.pos_in_stream] == '"':
            return error("syntax", "unterminated string", span, 'a string ends with " on the same line')
        return error("syntax", f"unexpected character {text[exc.pos_in_stream]!r}", span)
    tok = exc.token
    if tok.type == "$END":
        return error("syntax", "unexpected end of file", _end_of_file(text, name), _eof_hint(text))
    want = {t.split("__")[-1] for t in exc.expected if not t.startswith("_")}
    if "RSQB" in want:  # a list element may end in `as NAME`, but only where it names a layer: not a hint
        want.discard("AS")
    starts = {"LPAR", "LSQB", "ADD", "MINUS", "NAME", "INT", "FLOAT", "STRING", "NONE", "TRUE", "FALSE", "NOT"}
    if {"NAME", "INT", "LPAR"} <= want:  # an expression may start here: say so once
        want = (want - starts) | {"an expression"}
    expected = sorted({_describe(t) if t != "an expression" else t for t in want})
    span = Span(name, tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1)
    hint = "expected " + (", ".join(expected[:-1]) + " or " if len(expected) > 1 else "") + expected[-1] \
        if expected else None
    kind = tok.type.split("__")[-1]
    if kind == "MODULE_PATH" and "." not in tok:  # a name, lexed where no name can stand
        kind = "NAME"
    is_value = kind in ("NAME", "INT", "FLOAT", "STRING")
    closer = next((c for c in ("RPAR", "RSQB", "RBRACE") if c in want), None)
    before = _line_before(text, tok)
    block_of = re.search(r"\b(block|repeat\b.*?)\s+(parallel|residual)\s*$", before)
    if block_of and kind in ("NAME", "LPAR", "LBRACE"):  # `block parallel concat {...}`: a statement, not a value
        word = block_of.group(2)
        hint = f"a block is a value or a body in braces: write `{block_of.group(1).split()[0]} {{ {word} ... }}`" \
            if block_of.group(1) == "block" else f"write the {word} in braces: `repeat N {{ {word} ... }}`"
    elif kind in ("PARALLEL", "RESIDUAL") and re.search(r"\b(block|repeat\b.*)\s*$", before):
        hint = f"a block is a value or a body in braces: write {{ {kind.lower()} ... }} after `{before.split()[0]}`"
    elif kind == "COMMA" and "RSQB" in want and re.match(r"\s*repeat\s[^\[]*\[", before) \
            and before.count("[") == before.count("]") + 1:
        hint = "`repeat N [a, b]` reads as indexing `N[...]`: write `repeat N: [a, b]`"
    elif closer and kind.isalpha() and kind.isupper() and not is_value:  # a keyword: a bracket left open
        hint = f"is a {_TOKEN_WORDS[closer]} missing before it? ({hint})"
    elif "REPEAT" in want and kind == "NAME":
        hint = f"write `block {tok}` or `repeat N {tok}`: a stage holds blocks, `downsample`, `after` and `let`"
    elif "COMMA" in want and is_value:
        hint = f"is a ',' missing before it? ({hint})"
    what = repr(str(tok)) if is_value else _describe(tok.type)
    return error("syntax", f"unexpected {what}", span, hint)
