"""Reading blueprint files: the front end by suffix (.arch: composer/parse.py, .yaml/.yml:
composer/yaml_read.py), and a file with its imports (`load`, cached per path) as a `Unit`:
its own definitions and those it can see, for `resolve` to expand."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import ast
from .diagnostics import did_you_mean, error
from .disk_cache import RACY_NS
from .expr import Namespace
from .files import read_source, zoo_file_of
from .locate import BLUEPRINTS_DIR
from .ops import OPS
from .parse_cache import parse_file
from .speed import gc_paused


def read_blueprint(path: str | Path) -> ast.File:
    """Parse one blueprint file with the front end its suffix names (.yaml, .yml; else .arch)."""
    return parse_read(read_source(path), path)


def parse_read(text: str, path: str | Path) -> ast.File:
    """`parse_blueprint` for the text just read from file `path`: an .arch file's AST may come from
    the parsed-file cache (composer/parse_cache.py)."""
    if Path(path).suffix in (".yaml", ".yml"):
        return parse_blueprint(text, path)
    return parse_file(text, path, _parse_text)


def _parse_text(text: str, name: str) -> ast.File:
    from .parse import parse_text  # here: a check whose files all come from the cache never imports Lark

    return parse_text(text, name)


def parse_blueprint(text: str, path: str | Path) -> ast.File:
    """Parse the text of blueprint file `path` with the front end its suffix names."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        from .yaml_read import parse_yaml  # here: checking .arch files never pays for PyYAML

        return parse_yaml(text, str(path))
    return _parse_text(text, str(path))


@dataclass
class Unit:
    """A file with everything it can see: its own definitions and those of its imports (composites
    in `names`, models in `models`: a model can inherit from one defined in an imported file)."""

    file: ast.File
    names: Namespace
    models: dict = field(default_factory=dict, repr=False, compare=False)  # name -> ast.ModelDef
    # id of each model in `models` -> the models its own file sees (where its base is looked up)
    homes: dict = field(default_factory=dict, repr=False, compare=False)
    # id of each composite in `names` -> the names its own file sees (what its body calls)
    scopes: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class _Entry:
    """A cached unit, valid while its file has the same stamp (or, changed lately, the same text)
    and its imports give the same units."""

    stamp: tuple | None
    imports: tuple  # the units of its imports it was made from
    unit: Unit
    text: str | None = None  # kept for a file changed lately, whose stamp is not trusted
    # the path it was last loaded under, where its imports were found then ((the path as the
    # import names it, its resolved path) each) and the paths looked in first, found empty
    # (`import_closure`)
    name: str = ""
    found: tuple = ()
    absent: tuple = ()


_CACHE: dict[str, _Entry] = {}


def forget(prefix: str) -> None:
    """Drop the cached units of the files under `prefix` (a long-running caller's finished folder)."""
    for key in [k for k in _CACHE if k.startswith(prefix)]:
        del _CACHE[key]


def load(path: str | Path, _stack: tuple = ()) -> Unit:
    """Parse a file and its imports. Cached per path; an edited file (or one whose imports were
    edited) is read again, so a notebook that edits a blueprint builds the new model."""
    with gc_paused():
        return _load(path, _stack)


def _load(path: str | Path, _stack: tuple, key: str | None = None) -> Unit:
    """A file's stamp (modification time, size, inode, change time) tells an edit; a file changed in
    the last RACY_NS is compared by its text instead (an edit of the same size within one tick of
    the file system's clock keeps the stamp). `key`: its resolved path, when known."""
    key = key or str(Path(path).resolve())
    try:
        st = os.stat(key)
    except OSError:
        st = None
    racy = st is not None and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS
    stamp = None if st is None or racy else (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
    entry = _CACHE.get(key)
    text = read_source(path) if racy else None
    if entry is not None and ((stamp is not None and entry.stamp == stamp) or
                              (text is not None and entry.text == text)):
        file = entry.unit.file
    else:
        file = parse_read(text, path) if racy else read_blueprint(path)
    imported, found, absent = [], [], []
    here = _Folder(Path(path).parent)
    for imp in file.imports:
        target, tkey = _find(imp, here, absent)
        if tkey in _stack or tkey == key:
            raise error("cyclic-import", f"import cycle: '{imp.path}' imports this file again", imp.span,
                        "move the shared definitions into a third file")
        imported.append(_load(target, _stack + (key,), tkey))
        found.append((target, tkey))
    found, absent = tuple(found), tuple(absent)
    if entry is not None and file is entry.unit.file and len(imported) == len(entry.imports) \
            and all(a is b for a, b in zip(imported, entry.imports)):
        if entry.stamp != stamp or entry.text != text or entry.name != str(path) or entry.found != found \
                or entry.absent != absent:
            _CACHE[key] = _Entry(stamp, entry.imports, entry.unit, text, str(path), found, absent)
        return entry.unit
    unit = _unit(file, imported)
    _CACHE[key] = _Entry(stamp, tuple(imported), unit, text, str(path), found, absent)
    return unit


def _unit(file: ast.File, imported: list) -> Unit:
    """The unit of `file`: its definitions over those of its imports (a later import over an earlier)."""
    names = Namespace(ops=dict(OPS))
    models: dict = {}
    homes: dict = {}
    scopes: dict = {}
    for unit in imported:
        names.composites.update(unit.names.composites)
        models.update(unit.models)
        homes.update(unit.homes)
        scopes.update(unit.scopes)
    local: set[str] = set()  # names seen so far in this file: one pass, linear in the definitions
    for comp in file.composites:
        if comp.name in names.ops:
            raise error("redefinition", f"'{comp.name}' is already an op of the library", comp.span,
                        "choose another name for the definition")
        if comp.name in local:
            raise error("redefinition", f"'{comp.name}' is defined twice in this file", comp.span)
        local.add(comp.name)
        names.composites[comp.name] = comp
        scopes[id(comp)] = names
    own: set[str] = set()
    for m in file.models:
        if m.name in own:
            raise error("redefinition", f"model '{m.name}' is defined twice in this file", m.span)
        own.add(m.name)
        models[m.name] = m
        homes[id(m)] = models
    return Unit(file, names, models=models, homes=homes, scopes=scopes)


def make_unit(file: ast.File, imported: list) -> Unit:
    """The unit of a file parsed from text that is not on disk (an editor's unsaved buffer, the
    language server's) over the units of its imports: what `load` makes of a file it reads."""
    return _unit(file, imported)


MAX_IMPORT_PATH = 256


def import_file_name(imp: ast.Import) -> str:
    """The file name an `import` names, relative to the folder it is looked up in (`.arch` added
    when it names no suffix)."""
    return imp.path if imp.path.endswith((".arch", ".yaml", ".yml")) else imp.path + ".arch"


def find_import(imp: ast.Import, here: Path) -> Path:
    """The file an `import` names: relative to the importing file's folder, or to the standard
    library (the zoo's folder). It must stay inside that folder's tree (no absolute path, no `..`
    out of it, no symlink leading out) and be a regular file: a blueprint never reads a file its
    user did not name or put beside it."""
    return _find(imp, _Folder(here), [])[0]


class _Folder:
    """A folder imports are looked up in, resolved when first needed (once for all of a file's imports)."""

    def __init__(self, path: Path):
        self.path = path
        self._real = None

    def real(self) -> Path:
        if self._real is None:
            self._real = self.path.resolve()
        return self._real


_LIBRARY = _Folder(BLUEPRINTS_DIR)  # composer's own folder: resolved once per process


def _find(imp: ast.Import, here: _Folder, absent: list) -> tuple[Path, str]:
    """`find_import`, and the file's resolved path; the paths looked in first are added to `absent`."""
    rel = import_file_name(imp)
    parts = Path(rel).parts
    if len(imp.path) > MAX_IMPORT_PATH or not parts or Path(rel).is_absolute() or ".." in parts \
            or "\\" in rel or "\0" in rel:
        raise error("bad-import", f"cannot import '{_short(imp.path)}': an import names a file relative to "
                    "the importing file's folder, inside it", imp.span,
                    'e.g. import "blocks" (blocks.arch beside this file) or import "lib/metaformer"')
    for base in (here, _LIBRARY):
        target = base.path / rel
        if target.is_file():
            root, real = base.real(), target.resolve()
            if root != real and root not in real.parents:
                raise error("bad-import", f"cannot import '{imp.path}': it leads out of {base.path} (a symlink)",
                            imp.span, "copy the file beside the blueprint instead of linking to it")
            return target, str(real)
        absent.append(target)
    lib = [f"lib/{p.stem}" for p in (BLUEPRINTS_DIR / "lib").glob("*.arch")]
    raise error("bad-import", f"cannot find '{imp.path}' (looked in {here.path} and the standard library)", imp.span,
                did_you_mean(imp.path, lib) or "standard library files: " + ", ".join(sorted(lib)))


def import_closure(path: str | Path) -> tuple[list[tuple[Path, str]], list[Path]]:
    """The files a check of `path` reads, with their resolved paths, through the paths its imports
    name (it first, then its imports depth first, each path once: a file reached under two names,
    through a symlinked folder, is listed under both), and the paths an import looked in before
    the file it found (empty then; a file put there later would be imported instead). The files
    are loaded (read again where changed): each file's own imports are then read from its entry."""
    path = Path(path)
    key = str(path.resolve())
    _load(path, (), key)
    files: list[tuple[Path, str]] = []
    absent: list[Path] = []
    seen: set[str] = set()

    def visit(p: Path, real: str) -> None:
        if str(p) in seen:  # listed already, with everything below it
            return
        seen.add(str(p))
        files.append((p, real))
        entry = _CACHE.get(real)
        if entry is not None and entry.name == str(p):
            found, missed = entry.found, entry.absent
        else:  # loaded under another name (a symlink): its imports looked up from this one's folder
            unit, missed = _load(p, (), real), []
            found = [_find(imp, _Folder(p.parent), missed) for imp in unit.file.imports]
        absent.extend(missed)
        for target, tkey in found:
            visit(target, tkey)

    visit(path, key)
    return files, absent


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width] + "..."


def base_hint(base: str, visible) -> str:
    """The hint of an unknown base model: the zoo file to import, a near name, or the models in sight."""
    home = zoo_file_of(base) if base.isidentifier() else None
    if home is not None:
        return f'\'{base}\' is a zoo model: add `import "{home.stem}"` to inherit from it'
    return did_you_mean(base, visible) or f"models visible here: {', '.join(visible) or '(none)'}"


def zoo_source(name: str) -> Path:
    """The zoo file that `composer show NAME` prints: the family file defining model NAME
    (`swin_t` -> swin.arch), or the zoo file NAME itself (`swin`, `lib/metaformer`)."""
    home = zoo_file_of(name) if name.isidentifier() else None
    if home is not None:
        return home
    rel = name if name.endswith(".arch") else name + ".arch"
    if len(name) <= MAX_IMPORT_PATH and "\0" not in rel and not Path(rel).is_absolute() and ".." not in Path(rel).parts:
        candidate = BLUEPRINTS_DIR / rel
        root = BLUEPRINTS_DIR.resolve()
        if candidate.is_file() and root in candidate.resolve().parents:
            return candidate
    files = sorted(BLUEPRINTS_DIR.glob("*.arch"))
    known = [m for p in files for m in re.findall(r"^[ \t]*model[ \t]+(\w+)", read_source(p), re.M)]
    known += [p.stem for p in files] + [f"lib/{p.stem}" for p in sorted((BLUEPRINTS_DIR / "lib").glob("*.arch"))]
    raise error("unknown-model", f"no zoo model or zoo file '{_short(name)}'", None,
                did_you_mean(name, known) or "`composer list models` shows the zoo's models")
