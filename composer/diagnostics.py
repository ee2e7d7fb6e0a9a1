"""Diagnostics: located errors with the source line, a caret and a hint.

Every stage raises ``ComposerError``; the CLI renders it and exits with status 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .source import SOURCES, Span


@dataclass
class Diagnostic:
    code: str
    message: str
    span: Span | None = None
    hint: str | None = None
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        where = f"{self.span}: " if self.span else ""
        out = [f"{where}error: {self.message}"]
        if self.span and self.span.file in SOURCES:
            text = SOURCES[self.span.file].line(self.span.line).rstrip()
            if text:
                width = (
                    self.span.end_column - self.span.column
                    if self.span.end_line == self.span.line
                    else len(text) - self.span.column + 1
                )
                text, column, width = _cut(text, self.span.column, max(1, width))
                gutter = f"{self.span.line:>4} | "
                out.append(gutter + text)
                out.append(" " * (len(gutter) + column - 1) + "^" * width)
        for note in self.notes:
            out.append(f"  note: {note}")
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)


QUOTE_WIDTH = 120  # the most characters of a source line a diagnostic quotes


def _cut(text: str, column: int, width: int) -> tuple[str, int, int]:
    """A long source line cut to about QUOTE_WIDTH characters around the caret, `...` marking
    each cut; returns the text to quote, the caret's column in it and the caret's width."""
    if len(text) <= QUOTE_WIDTH:
        return text, column, width
    start = max(0, min(column - 1 - QUOTE_WIDTH // 3, len(text) - QUOTE_WIDTH))
    end = start + QUOTE_WIDTH
    head, tail = ("..." if start else ""), ("..." if end < len(text) else "")
    column = column - start + len(head)
    width = max(1, min(width, QUOTE_WIDTH - (column - len(head) - 1)))
    return head + text[start:end] + tail, column, width


class ComposerError(Exception):
    """A user mistake, with one or more located diagnostics."""

    def __init__(self, diagnostics: Diagnostic | list[Diagnostic]):
        self.diagnostics = diagnostics if isinstance(diagnostics, list) else [diagnostics]
        # rendered when shown, not here: composer.sizes learns from hundreds of errors per model
        # whether a size is admitted, and a later note (`applied by reuse ...`) is shown too
        super().__init__(self.diagnostics)

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)

    @property
    def code(self) -> str:
        return self.diagnostics[0].code


def error(code: str, message: str, span: Span | None = None, hint: str | None = None) -> ComposerError:
    return ComposerError(Diagnostic(code, message, span, hint))


def _edits(a: str, b: str) -> int:
    """Optimal string alignment distance: a swapped pair of letters (`gleu`) counts as one edit."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    import difflib  # only on an error: not among every command's imports

    close = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)
    if not close:
        return None
    close.sort(key=lambda c: (_edits(name, c), abs(len(c) - len(name))))  # fewest edits, then same length
    return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


class ComposerWarning(UserWarning):
    """A located warning about a blueprint that still works (a deprecated spelling): its text is
    the rendered diagnostic, `file:line:col: warning: ...` with the source line and the new spelling."""


_issued = [0]  # warnings `deprecated` issued in this process


def warnings_issued() -> int:
    """How many warnings `deprecated` has issued in this process, shown or not: Python shows one
    once per place and text (and none under `-W ignore`), so a check that issued one prints what
    it printed only in this process (the check-result cache keeps no such check)."""
    return _issued[0]


def deprecated(message: str, span: Span | None, hint: str) -> None:
    """Warn that a spelling is deprecated (it keeps working); `hint` gives the new one."""
    import warnings

    _issued[0] += 1

    text = Diagnostic("deprecated", message, span, hint).render().replace(": error: ", ": warning: ", 1)
    if span is None:
        text = text.replace("error: ", "warning: ", 1)
    warning = ComposerWarning(text)
    warning.diagnostic = Diagnostic("deprecated", message, span, hint)  # located for the language server
    warnings.warn(warning, stacklevel=2)
