"""Reading blueprint files: the front end by suffix (.arch: composer/parse.py, .yaml/.yml:
composer/yaml_read.py), and a file with its imports (`load`, cached per path) as a `Unit`:
its own definitions and those it can see, for `resolve` to expand."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import ast
from .diagnostics import did_you_mean, error
from .expr import Namespace
from .files import read_source
from .locate import BLUEPRINTS_DIR
from .ops import OPS
from .parse import parse_text
from .speed import gc_paused


def read_blueprint(path: str | Path) -> ast.File:
    """Parse one blueprint file with the front end its suffix names (.yaml, .yml; else .arch)."""
    path = Path(path)
    text = read_source(path)
    if path.suffix in (".yaml", ".yml"):
        from .yaml_read import parse_yaml  # here: checking .arch files never pays for PyYAML

        return parse_yaml(text, str(path))
    return parse_text(text, str(path))


@dataclass
class Unit:
    """A file with everything it can see: its own definitions and those of its imports."""

    file: ast.File
    names: Namespace
    # composite instances by (definition, typed arguments, depth): see `_Resolver._instantiate`
    instances: dict = field(default_factory=dict, repr=False, compare=False)


_CACHE: dict[str, Unit] = {}


def load(path: str | Path, _stack: tuple = ()) -> Unit:
    """Parse a file and its imports (cached per path)."""
    with gc_paused():
        return _load(path, _stack)


def _load(path: str | Path, _stack: tuple) -> Unit:
    key = str(Path(path).resolve())
    if key in _CACHE:
        return _CACHE[key]
    file = read_blueprint(path)
    names = Namespace(ops=dict(OPS))
    for imp in file.imports:
        target = find_import(imp, Path(path).parent)
        tkey = str(target.resolve())
        if tkey in _stack or tkey == key:
            raise error("cyclic-import", f"import cycle: '{imp.path}' imports this file again", imp.span,
                        "move the shared definitions into a third file")
        unit = _load(target, _stack + (key,))
        names.composites.update(unit.names.composites)
    local: set[str] = set()  # names seen so far in this file: one pass, linear in the definitions
    for comp in file.composites:
        if comp.name in names.ops:
            raise error("redefinition", f"'{comp.name}' is already an op of the library", comp.span,
                        "choose another name for the definition")
        if comp.name in local:
            raise error("redefinition", f"'{comp.name}' is defined twice in this file", comp.span)
        local.add(comp.name)
        names.composites[comp.name] = comp
    models: set[str] = set()
    for m in file.models:
        if m.name in models:
            raise error("redefinition", f"model '{m.name}' is defined twice in this file", m.span)
        models.add(m.name)
    unit = Unit(file, names)
    _CACHE[key] = unit
    return unit


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
    rel = import_file_name(imp)
    parts = Path(rel).parts
    if len(imp.path) > MAX_IMPORT_PATH or not parts or Path(rel).is_absolute() or ".." in parts \
            or "\\" in rel or "\0" in rel:
        raise error("bad-import", f"cannot import '{_short(imp.path)}': an import names a file relative to "
                    "the importing file's folder, inside it", imp.span,
                    'e.g. import "blocks" (blocks.arch beside this file) or import "lib/metaformer"')
    for base in (here, BLUEPRINTS_DIR):
        target = base / rel
        if target.is_file():
            root, real = base.resolve(), target.resolve()
            if root != real and root not in real.parents:
                raise error("bad-import", f"cannot import '{imp.path}': it leads out of {base} (a symlink)",
                            imp.span, "copy the file beside the blueprint instead of linking to it")
            return target
    lib = [f"lib/{p.stem}" for p in (BLUEPRINTS_DIR / "lib").glob("*.arch")]
    raise error("bad-import", f"cannot find '{imp.path}' (looked in {here} and the standard library)", imp.span,
                did_you_mean(imp.path, lib) or "standard library files: " + ", ".join(sorted(lib)))


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width] + "..."
