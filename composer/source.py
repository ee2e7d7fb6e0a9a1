"""Source text and spans: where every construct of a blueprint came from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A region of a source file, 1-based line and column at both ends."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Source:
    """A file's name and text, kept so diagnostics can quote the offending line."""

    name: str
    text: str

    def line(self, number: int) -> str:
        """Line `number` (1-based) as the parser counts lines: split at newlines only. A form feed
        or another separator `str.splitlines` would also split at is part of its line."""
        lines = self.text.split("\n")
        return lines[number - 1].rstrip("\r") if 0 < number <= len(lines) else ""


# Every source read in this process, by name: diagnostics quote lines from it.
SOURCES: dict[str, Source] = {}


def register(name: str, text: str) -> Source:
    source = Source(name, text)
    SOURCES[name] = source
    return source
