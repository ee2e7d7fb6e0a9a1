"""The parsed-file cache: a blueprint file's AST kept on disk between processes, as Python keeps a
module's bytecode in a .pyc, so a `composer check` does not parse an unchanged file again.

One entry per file and name (named by the hash of its resolved path and of the name its spans
carry: a library file checked as `blueprints/lib/x.arch` and imported as its absolute path has an
entry for each, instead of the two overwriting each other at every check) under the user's cache folder
(`$COMPOSER_CACHE_DIR`, else `$XDG_CACHE_HOME/composer`, else `~/.cache/composer`; folder
`parse/`). An entry holds a key and the pickled `ast.File`; the key is a hash of the file's text,
the name its spans carry, the front end (grammar, composer's parsing modules, Lark's version) and
Python's version, so an edit of any of them is a miss. Only .arch files read from disk use it;
`COMPOSER_NO_CACHE=1` switches it off. A missing, stale, unreadable or corrupt entry is ignored
(the file is parsed and the entry written again); a folder that cannot be written (read-only,
full) costs the write, never the check. Entries are read with an unpickler that makes only the
AST's own classes, so a planted entry cannot run code. Only successful parses are kept: a
syntax error is found (and reported) by parsing each time. Resolving and lowering are never
cached: every check still resolves every model and infers every shape.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
from pathlib import Path

from . import ast
from .disk_cache import folder, hash_files, real_path, write_entry
from .locate import GRAMMAR_DIR
from .source import Span, register

FORMAT = b"composer-parse-1\n"
MAX_ENTRY_BYTES = 64 * 1024 * 1024  # a 4 MB blueprint (files.MAX_SOURCE_BYTES) pickles to far less
# Composer's modules whose code decides the AST of a file (tests/test_parse_cache.py: every module
# composer/parse.py imports, directly or not).
FRONT_END = ("parse", "parse_callbacks", "lalr", "ast", "comments", "source", "budget", "diagnostics", "locate", "parse_errors")
_CLASSES = {("composer.source", "Span"): Span} | {
    ("composer.ast", name): cls for name, cls in vars(ast).items()
    if isinstance(cls, type) and cls.__module__ == "composer.ast" and "__dataclass_fields__" in vars(cls)
}
_state: dict = {}  # "front": the front end's hash


def _front_end() -> bytes:
    """The hash of everything besides the text that decides the AST (once per process)."""
    known = _state.get("front")
    if known is None:
        from . import __version__  # here: this module is imported while composer/__init__.py runs

        h = hashlib.sha256(FORMAT)
        h.update(f"{__version__}\0{sys.version}\0{pickle.HIGHEST_PROTOCOL}\0".encode())
        here = Path(__file__).parent
        files = [here / f"{name}.py" for name in FRONT_END] + sorted(GRAMMAR_DIR.glob("*.lark"))
        try:
            import importlib.util

            spec = importlib.util.find_spec("lark")  # its version, without importing it
            files.append(Path(spec.origin))
        except (ImportError, AttributeError, TypeError, ValueError):
            pass
        hash_files(h, files, lambda f: f.name)
        known = _state["front"] = h.digest()
    return known


def _key(text: str, name: str) -> bytes:
    h = hashlib.sha256(_front_end())
    h.update(name.encode("utf-8", "surrogatepass") + b"\0")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.digest()


def _entry(where: Path, path: str | Path) -> Path:
    named = f"{real_path(path)}\0{path}".encode("utf-8", "surrogatepass")
    return where / (hashlib.sha256(named).hexdigest()[:40] + ".pickle")


class _Unpickler(pickle.Unpickler):
    """Makes the AST's dataclasses and the built-in containers and scalars, nothing else."""

    def find_class(self, module, name):
        cls = _CLASSES.get((module, name))
        if cls is None:
            raise pickle.UnpicklingError(f"not an AST class: {module}.{name}")
        return cls


def parse_file(text: str, path: str | Path, parse) -> ast.File:
    """The AST of the .arch file `path` whose text is `text`: from the cache when an entry for this
    text (and front end) is there, else `parse(text, str(path))`, whose result is then kept."""
    where = folder()
    if where is None:
        return parse(text, str(path))
    name = str(path)
    key = _key(text, name)
    entry = _entry(where, path)
    found = _read(entry, key)
    if found is not None:
        register(name, text)  # as parsing does: diagnostics quote the file's lines
        return found
    file = parse(text, name)
    _write(where, entry, key, file)
    return file


def _read(entry: Path, key: bytes) -> ast.File | None:
    try:
        with open(entry, "rb") as fh:
            head = fh.read(len(FORMAT) + len(key))
            if head != FORMAT + key:
                return None
            data = fh.read(MAX_ENTRY_BYTES + 1)
        if len(data) > MAX_ENTRY_BYTES:
            return None
        file = _Unpickler(io.BytesIO(data)).load()
    except Exception:  # noqa: BLE001 - missing, unreadable, truncated or corrupt: parsed again
        return None
    return file if isinstance(file, ast.File) else None


def _write(where: Path, entry: Path, key: bytes, file: ast.File) -> None:
    try:
        data = pickle.dumps(file, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - the cache is an optimisation
        return
    if len(data) <= MAX_ENTRY_BYTES:
        write_entry(where, entry, FORMAT + key + data)
