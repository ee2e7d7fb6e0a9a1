"""Completion for the language server (composer/lsp.py): what may be typed at a position of an
.arch buffer, read from the text before it (which need not parse): an import path inside
`import "...`, a base model after `model NAME :`, the parameters of the op or composite whose call
is open, else op and composite names. Positions are 0-based lines and code points; no pygls."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from .locate import BLUEPRINTS_DIR
from .lsp_facts import Item, composite_doc, op_doc, source_of
from .ops import OPS

_IMPORT = re.compile(r'^\s*import\s+"([^"]*)$')
_BASE = re.compile(r"^\s*model\s+\w+\s*(\(.*\))?\s*:\s*(\w*)$")
_CALLEE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*$")
# keyword statements that take arguments, and theirs
_STATEMENT_ARGS = {"residual": ("shortcut", "when"), "parallel": ("split",)}
MAX_LOOKBACK = 4000  # characters before the cursor searched for an open call


def complete(text: str, line: int, character: int, path: str, unit=None) -> list[Item]:
    """The completion items at a position of the buffer `text` of file `path`; `unit` is the last
    unit of the buffer that loaded (its composites and models), or None."""
    rows = text.split("\n")
    before = rows[line][:character] if 0 <= line < len(rows) else ""
    m = _IMPORT.match(before)
    if m:
        start = character - len(m.group(1))
        return [Item(p, "file", where, replace_from=start) for p, where in import_paths(path)]
    m = _BASE.match(before)
    if m:
        own = re.match(r"^\s*model\s+(\w+)", before).group(1)
        models = unit.models if unit is not None else {}
        return [Item(n, "model", f"model in {Path(d.file).name}") for n, d in models.items() if n != own]
    prefix = "\n".join(rows[:line] + [before])[-MAX_LOOKBACK:]
    callee = open_call(prefix)
    items = []
    if callee is not None:
        items += parameters(callee, unit)
    return items + names(unit)


def names(unit) -> list[Item]:
    """Every op of the library and composite in sight."""
    items = [_op_item(n) for n in sorted(OPS)]
    if unit is not None:
        for name, c in sorted(unit.names.composites.items()):
            items.append(Item(name, c.kind, f"{c.kind} {name}({', '.join(p.name for p in c.params)})",
                              composite_doc(c)))
    return items


@functools.lru_cache(maxsize=None)
def _op_item(name: str) -> Item:
    cls = OPS[name]
    params = ", ".join(k for k, f in cls.model_fields.items() if f.is_required())
    return Item(name, cls.kind, f"{cls.kind} {name}({params})", op_doc(name))


def parameters(callee: str, unit) -> list[Item]:
    """`name = ` items for the parameters of the op or composite called `callee`."""
    if callee in _STATEMENT_ARGS:
        return [Item(p, "parameter", f"{callee} argument", insert=f"{p} = ") for p in _STATEMENT_ARGS[callee]]
    if unit is not None and callee in unit.names.composites:
        c = unit.names.composites[callee]
        return [Item(p.name, "parameter", f"{c.kind} {callee}: " + (f"{p.name} = {source_of(p.default)}"
                     if p.default is not None else f"{p.name} (required)"), insert=f"{p.name} = ")
                for p in c.params]
    if callee in OPS:
        out = []
        for k, f in OPS[callee].model_fields.items():
            detail = f"{callee}: {k} (required)" if f.is_required() else f"{callee}: {k} = {_default(f.default)}"
            out.append(Item(k, "parameter", detail, insert=f"{k} = "))
        return out
    return []


def _default(value) -> str:
    from .ops.registry import show_value

    return show_value(value)


def open_call(prefix: str) -> str | None:
    """The name whose call is open at the end of `prefix`, or None: the innermost `(` not yet
    closed (strings and comments skipped), when a name stands right before it."""
    depth = 0
    i = len(prefix) - 1
    text = _blank_strings_and_comments(prefix)
    while i >= 0:
        ch = text[i]
        if ch in ")]}":
            depth += 1
        elif ch in "([{":
            if depth == 0:
                if ch != "(":
                    return None if ch == "{" else _list_call(text, i)
                m = _CALLEE.search(text, 0, i)
                return m.group(1) if m else None
            depth -= 1
        i -= 1
    return None


def _list_call(text: str, i: int) -> str | None:
    """A `[` open at i: the call around the list, if any (`split = [1, 2` is in parallel's call)."""
    return open_call(text[:i])


def _blank_strings_and_comments(text: str) -> str:
    """`text` with the inside of strings and comments replaced by spaces (positions kept)."""
    return re.sub(r'"[^"\n]*"?|#[^\n]*', lambda m: " " * len(m.group()), text)


def import_paths(path: str) -> list[tuple[str, str]]:
    """The paths an `import` in file `path` can name: files beside it (and in its sub-folders),
    and the zoo's (family files and `lib/...`)."""
    out, seen = [], set()
    here = Path(path).parent
    own = Path(path).resolve()
    for folder, rel in ((here, ""), *((d, d.name + "/") for d in _subfolders(here))):
        for f in sorted(folder.glob("*")):
            if f.suffix not in (".arch", ".yaml", ".yml") or f.name.endswith(".port.yaml") or f.resolve() == own:
                continue
            name = rel + (f.stem if f.suffix == ".arch" else f.name)
            if name not in seen:
                seen.add(name)
                out.append((name, "beside this file"))
    for name in _zoo_imports():
        if name not in seen:
            seen.add(name)
            out.append((name, "standard library" if name.startswith("lib/") else "zoo"))
    return out


def _subfolders(here: Path) -> list[Path]:
    try:
        return sorted(d for d in here.iterdir() if d.is_dir() and not d.name.startswith("."))[:50]
    except OSError:
        return []


@functools.lru_cache(maxsize=1)
def _zoo_imports() -> tuple:
    lib = [f"lib/{p.stem}" for p in sorted((BLUEPRINTS_DIR / "lib").glob("*.arch"))]
    return tuple(lib + [p.stem for p in sorted(BLUEPRINTS_DIR.glob("*.arch"))])
