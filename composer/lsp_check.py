"""Checking editor buffers for the language server (composer/lsp.py): the errors `composer check`
gives for a file, taken from the text being edited rather than the file on disk, as problems with
0-based ranges, and the plans of its models (for hovers). No pygls and no torch here.

A buffer is parsed from its text; its imports come from the other open buffers, or from disk
through `loader.load` (cached while the files keep their stamps, so an unchanged library file is
never parsed again). Every model of the file is resolved and planned on its own, as `composer
check FILE` does, so each model that fails gives its own problem."""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import ast
from .diagnostics import ComposerError, ComposerWarning, Diagnostic
from .files import read_source
from .loader import Unit, find_import, import_closure, load, make_unit, parse_blueprint
from .lower import plan
from .resolve import resolve_model
from .source import Span, register

ERROR, WARNING = "error", "warning"
_USED_AT = re.compile(r" used at (.+):(\d+):(\d+)$")  # resolve's note on an error inside a composite


@dataclass(frozen=True)
class Problem:
    """A diagnostic placed in the checked file: 0-based lines, characters counted in code points
    (the end exclusive), as the Language Server Protocol counts them before UTF-16."""

    line: int
    character: int
    end_line: int
    end_character: int
    message: str
    severity: str = ERROR
    code: str = ""


@dataclass
class Analysis:
    """What checking one buffer found: its AST (None when it does not parse), its unit (None when
    its imports or definitions fail), its problems and the plan of every model that checks."""

    path: str
    text: str
    file: ast.File | None = None
    unit: Unit | None = None
    problems: list = field(default_factory=list)
    plans: dict = field(default_factory=dict)  # model name -> Plan, in the file's order
    imports: list = field(default_factory=list)  # the resolved paths of the files it imports
    reaches: set = field(default_factory=set)  # the resolved paths of every file it imports, at any depth


def span_range(span: Span) -> tuple[int, int, int, int]:
    """A span (1-based, end column exclusive) as a 0-based range."""
    return span.line - 1, span.column - 1, span.end_line - 1, span.end_column - 1


def same_file(a: str, b: str) -> bool:
    return a == b or Path(a).resolve() == Path(b).resolve()


class Checker:
    """Checks buffers; holds the open buffers (path -> text) that imports read before the disk."""

    def __init__(self):
        self.buffers: dict[str, str] = {}  # resolved path -> text of an open document
        self._units: dict[str, tuple] = {}  # resolved path -> (text, imported units, unit) of a buffer
        # resolved path -> (imported units, composites, {model: (its chain, plan or None, problems)}) of
        # the last check: a model whose definitions are all equal (spans included) is not planned again
        self._models: dict[str, tuple] = {}

    def open(self, path: str, text: str) -> None:
        self.buffers[str(Path(path).resolve())] = _newlines(text)

    def close(self, path: str) -> None:
        key = str(Path(path).resolve())
        self.buffers.pop(key, None)
        self._units.pop(key, None)
        self._models.pop(key, None)

    def check(self, path: str, text: str) -> Analysis:
        """Check `text` as the contents of file `path` (an absolute path)."""
        out = Analysis(path, _newlines(text))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ComposerWarning)
            try:
                self._check(out, caught)
            except ComposerError as exc:
                out.problems += self._place(exc.diagnostics, out, None)
                if out.file is None and exc.diagnostics and exc.diagnostics[0].code == "syntax":
                    out.problems += self._place(later_syntax_errors(out.text, out.path, exc.diagnostics[0]), out, None)
            except RecursionError:  # hostile nesting the parser's limits missed: one problem, never a crash
                out.problems.append(Problem(0, 0, 0, 0, "the file nests too deeply to check"))
            out.problems += self._warnings(caught, out)
        seen, unique = set(), []
        for p in out.problems:  # an error inside a composite that several models use: once
            if p not in seen:
                seen.add(p)
                unique.append(p)
        out.problems = unique
        return out

    def _warnings(self, caught: list, out: Analysis, fallback: Span | None = None) -> list:
        """The located ComposerWarnings among `caught`, as warning problems; `caught` is emptied."""
        found = []
        for w in caught:
            diag = getattr(w.message, "diagnostic", None)
            if isinstance(w.message, ComposerWarning) and diag is not None:
                found += self._place([diag], out, fallback, WARNING)
        del caught[:]
        return found

    def _check(self, out: Analysis, caught: list) -> None:
        out.file = parse_blueprint(out.text, out.path)
        key = str(Path(out.path).resolve())
        imported, failed = [], False
        for imp in out.file.imports:
            try:
                with contextlib.suppress(ComposerError):
                    out.imports.append(str(find_import(imp, Path(out.path).parent).resolve()))
                imported.append(self._import(imp, Path(out.path).parent, (key,), out.reaches))
            except ComposerError as exc:
                failed = True
                out.problems += self._place(exc.diagnostics, out, imp.span)
        if failed:  # the definitions an import would give are missing: checking the models only cascades
            return
        out.unit = make_unit(out.file, imported)
        prev = self._models.get(key)
        same = prev is not None and len(prev[0]) == len(imported) and all(a is b for a, b in zip(prev[0], imported)) \
            and prev[1] == out.file.composites
        done = {}
        out.problems += self._warnings(caught, out)  # so that those caught below are the model's
        for m in out.file.models:
            chain = _chain(out.unit, m)
            old = prev[2].get(m.name) if same else None
            if old is not None and chain is not None and old[0] == chain:
                _, found, problems = old  # nothing it is made of changed
            else:
                found = None
                try:
                    found = plan(resolve_model(out.unit, m.name))
                    problems = []
                except ComposerError as exc:
                    problems = self._place(exc.diagnostics, out, m.span)
                problems += self._warnings(caught, out, m.span)
            done[m.name] = (chain, found, problems)
            out.problems += problems
            if found is not None:
                out.plans[m.name] = found
        self._models[key] = (tuple(imported), list(out.file.composites), done)

    def _import(self, imp: ast.Import, here: Path, stack: tuple, reaches: set) -> Unit:
        """The unit an import gives: an open buffer's (its text), else the file's on disk, whose own
        imports again come from the open buffers (an edit two imports away is seen). `reaches`
        gets every file read."""
        target = find_import(imp, here)
        key = str(target.resolve())
        if key in stack:
            raise ComposerError(Diagnostic("cyclic-import", f"import cycle: '{imp.path}' imports this file again",
                                           imp.span, "move the shared definitions into a third file"))
        reaches.add(key)
        if key in self.buffers:
            text = self.buffers[key]
        else:
            below = [real for _, real in import_closure(target)[0][1:]]
            if not any(b in self.buffers for b in below):
                reaches.update(below)
                return load(target)
            text = read_source(target)
        file = None
        cached = self._units.get(key)
        if cached is not None and cached[0] == text:
            file = cached[2].file
        file = file or parse_blueprint(text, str(target))
        imported = tuple(self._import(i, target.parent, stack + (key,), reaches) for i in file.imports)
        if cached is not None and cached[2].file is file and len(imported) == len(cached[1]) \
                and all(a is b for a, b in zip(imported, cached[1])):
            return cached[2]
        unit = make_unit(file, list(imported))
        self._units[key] = (text, imported, unit)
        return unit

    def _place(self, diagnostics: list, out: Analysis, fallback: Span | None, severity: str = ERROR) -> list:
        """Problems in the checked file: a diagnostic located elsewhere (in an imported file, in a
        composite of another file) is placed where this file uses it, its own place in the text."""
        found = []
        for d in diagnostics:
            text = d.message
            if d.hint:
                text += f"\nhint: {d.hint}"
            for note in d.notes:
                text += f"\nnote: {note}"
            span = d.span
            if span is not None and not same_file(span.file, out.path):
                text = f"{span}: {text}"
                span = self._use_in(d, out.path) or fallback
            span = span or fallback
            if span is None:
                found.append(Problem(0, 0, 0, 0, text, severity, d.code))
                continue
            line, col, end_line, end_col = _narrow(span, out)
            found.append(Problem(line, col, end_line, end_col, text, severity, d.code))
        return found

    @staticmethod
    def _use_in(d: Diagnostic, path: str) -> Span | None:
        """The first use in `path` of the composite an error is inside (resolve's `used at` notes)."""
        for note in d.notes:
            m = _USED_AT.search(note)
            if m and same_file(m.group(1), path):
                line, col = int(m.group(2)), int(m.group(3))
                return Span(path, line, col, line, col)
        return None


TOP_LEVEL = re.compile(r"(model|block|mixer|import)\b")


def later_syntax_errors(text: str, path: str, first: Diagnostic) -> list[Diagnostic]:
    """The syntax errors after `first`, one per top-level definition at most: the parser does not
    recover, so the text is parsed again from the line that starts the next definition (`model`,
    `block`, `mixer`, `import` at the start of a line) at or after the error, the lines before it
    blanked (so that lines and columns stay those of the file), until a parse gets to the end.
    .arch only."""
    if Path(path).suffix in (".yaml", ".yml") or first.span is None:
        return []
    lines = text.split("\n")
    tops = [i for i, line in enumerate(lines) if TOP_LEVEL.match(line)]
    found, start, at = [], 0, first.span
    try:
        for _ in range(len(tops)):
            # from the definition the error is in, or the next: an error on a definition's first line
            # may be its predecessor's (a missing '}'), so that line is parsed again on its own
            nxt = next((i for i in tops if i > start and i >= at.line - 1), None)
            if nxt is None:
                break
            start = nxt
            try:
                parse_blueprint("\n" * start + "\n".join(lines[start:]), path)
                break
            except ComposerError as exc:
                d = exc.diagnostics[0] if exc.diagnostics else None
                if d is None or d.code != "syntax" or d.span is None or d.span.line - 1 < start:
                    break
                if (d.span.line, d.span.column) != (at.line, at.column):  # the same error again: not twice
                    found.append(d)
                    at = d.span
    finally:
        register(path, text)  # the file's text, not the last part parsed, for the quoted lines
    return found


def _chain(unit: Unit, model: ast.ModelDef) -> tuple | None:
    """The definitions a model is made of: itself and its bases (as resolve_model finds them), or
    None when the chain is broken (an unknown base, a cycle: never reused)."""
    chain, cur = [], model
    while cur is not None and cur.base is not None:
        chain.append(cur)
        cur = unit.homes.get(id(cur), unit.models).get(cur.base)
        if any(c is cur for c in chain):
            return None
    return tuple(chain + [cur]) if cur is not None else None


def _newlines(text: str) -> str:
    """Line ends as a file read from disk has them (composer.files.read_source), lines unchanged."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _narrow(span: Span, out: Analysis) -> tuple[int, int, int, int]:
    """The range to mark for `span`: a whole definition is marked at its name, an empty span (a
    use found in a note) over the name that starts there."""
    for d in (out.file.models + out.file.composites) if out.file is not None else ():
        if d.span == span:
            return name_range(out.text, span, d.name)
    line, col, end_line, end_col = span_range(span)
    if (end_line, end_col) <= (line, col):
        rows = out.text.split("\n")
        row = rows[line] if 0 <= line < len(rows) else ""
        m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", row[col:])
        end_line, end_col = line, col + (len(m.group()) if m else 1)
    return line, col, end_line, end_col


def name_range(text: str, span: Span, name: str) -> tuple[int, int, int, int]:
    """The 0-based range of `name` on the first line of the definition at `span` in `text` (the
    span's start when it is not found there)."""
    rows = text.split("\n")
    row = rows[span.line - 1] if 0 < span.line <= len(rows) else ""
    m = re.compile(rf"\b{re.escape(name)}\b").search(row, span.column - 1)
    if m is None:
        return span.line - 1, span.column - 1, span.line - 1, span.column - 1
    return span.line - 1, m.start(), span.line - 1, m.end()
