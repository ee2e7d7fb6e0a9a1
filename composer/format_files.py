"""`composer fmt PATH...`: the .arch files under the paths given (`arch_files`) and the canonical
text of each one that changes (`format_paths`); the formatting itself is composer/format.py's."""

from __future__ import annotations

from pathlib import Path

from .diagnostics import error
from .files import read_source
from .format import format_text


def arch_files(paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*.arch") if q.is_file())
        elif p.is_file():
            if p.suffix != ".arch":
                raise error("io", f"{p} is not a .arch file", None,
                            "fmt formats .arch files; `composer convert FILE --to arch` turns YAML into .arch")
            out.append(p)
        else:
            raise error("io", f"no such file or directory: {p}")
    return list(dict.fromkeys(out))


def format_paths(paths) -> tuple[list[Path], list[tuple[Path, str, str]]]:
    """The .arch files under `paths` and, for each one whose canonical text differs, (path, text,
    canonical text). Writes nothing: the caller shows the change or writes it."""
    files = arch_files(paths)
    changed = []
    for path in files:
        text = read_source(path)
        new = format_text(text, str(path))
        if new != text:
            changed.append((path, text, new))
    return files, changed
