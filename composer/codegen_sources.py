"""The parts of a standalone Python file (composer/codegen.py) that are not the model's own code:

* `recording(...)`: a build under which every module (and every attention piece) remembers the
  arguments it was constructed with, so the file can construct it the same way;
* `Sources`: the source of composer's own layer classes a model uses, with the module-level helpers
  they need (a closure over the names their code reads), stripped of composer's imports; the
  imports of torch and of the standard library they need; and `render(value)`, a constructor
  argument as Python source.

Only `composer.layers` code is copied (it imports nothing of composer outside itself); anything
else of composer a module needs is refused with a located error by the caller."""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import math
import sys
import textwrap

import torch
from torch import nn

LAYERS = "composer.layers"


@functools.lru_cache(maxsize=None)
def _source(obj) -> str:
    """The source of a class, function or module (cached: inspect's class finder parses the module)."""
    return inspect.getsource(obj)


@functools.lru_cache(maxsize=None)
def _line(obj) -> int:
    try:
        return inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return 0


@functools.lru_cache(maxsize=None)
def _parse(text: str):
    return ast.parse(text)


def _layer_modules() -> list:
    """The composer.layers modules imported so far (a build imports those it needs: the caller
    builds again when the first build imported a class after recording began)."""
    return [m for name, m in list(sys.modules.items()) if name.startswith(LAYERS) and m is not None]


@contextlib.contextmanager
def recording():
    """While active: `records[id(obj)] = (obj, class, args, kwargs)` for every nn.Module and every
    plain object of a composer.layers class constructed (the outermost constructor call)."""
    records: dict = {}

    def remember(obj, args, kwargs):
        if id(obj) not in records:
            records[id(obj)] = (obj, type(obj), _copy(args), _copy(kwargs))

    patched = []
    for cls in _classes():
        if "__init__" in vars(cls):
            patched.append((cls, cls.__init__))
            cls.__init__ = _wrap_init(cls, cls.__init__, remember)
    try:
        yield records
    finally:
        for cls, init in patched:
            cls.__init__ = init


def _classes() -> list:
    """The classes whose construction is recorded: torch's modules and composer's layer classes."""
    modules = _layer_modules()
    out, todo, seen = [], [nn.Module], set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo += cls.__subclasses__()
        if cls.__module__.startswith(("torch.nn", LAYERS)):
            out.append(cls)
    for mod in modules:
        for value in list(vars(mod).values()):
            if inspect.isclass(value) and value.__module__ == mod.__name__ and not issubclass(value, nn.Module) \
                    and not issubclass(value, BaseException):
                out.append(value)
    return out


def _wrap_init(cls, init, remember):
    def wrapper(self, *args, **kwargs):
        # the arguments of the object's own class's constructor (a class imported after recording
        # began is not wrapped: its object gets no record, and the caller builds again)
        if next(c for c in type(self).__mro__ if "__init__" in vars(c)) is cls:
            remember(self, args, kwargs)
        init(self, *args, **kwargs)

    return wrapper


def _copy(value):
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def _allowed(module: str) -> bool:
    """torch and the standard library: what a standalone file may import."""
    top = module.split(".")[0]
    return top == "torch" or top in sys.stdlib_module_names


class Unsupported(Exception):
    """A value the file cannot write (its message says which)."""


class Sources:
    """The composer.layers classes and helpers a file needs, in an order Python can run."""

    def __init__(self):
        self.objects: dict = {}  # id -> (object, name in the file)
        self.names: dict = {}  # name in the file -> object
        self.imports: dict = {}  # import line -> None (ordered)
        self._module_ast: dict = {}

    # ------------------------------------------------------------------ values as source
    def ref(self, obj) -> str:
        """The name of a class or function in the file (composer's own: its source is included)."""
        mod = getattr(obj, "__module__", "") or ""
        if mod.startswith(LAYERS):
            return self.need(obj)
        if mod.startswith("composer"):
            raise Unsupported(f"{mod}.{obj.__qualname__} is composer code outside composer.layers")
        name = getattr(obj, "__name__", None)
        if name and getattr(nn, name, None) is obj:
            return f"nn.{name}"
        if name and getattr(torch.nn.functional, name, None) is obj:
            return f"F.{name}"
        if name and getattr(torch, name, None) is obj:
            return f"torch.{name}"
        if name and getattr(math, name, None) is obj:
            self.imports["import math"] = None
            return f"math.{name}"
        if name and mod and _allowed(mod) and getattr(sys.modules.get(mod), name, None) is obj:
            self.imports[f"import {mod}"] = None
            return f"{mod}.{name}"
        raise Unsupported(f"{mod}.{getattr(obj, '__qualname__', obj)} is neither torch, the standard library nor "
                          "composer's layer code")

    def literal(self, value) -> str:
        if value is None or isinstance(value, (bool, str, int)):
            return repr(value)
        if isinstance(value, float):
            return repr(value) if math.isfinite(value) else f"float('{value}')"
        if isinstance(value, torch.dtype):
            return str(value)
        if isinstance(value, torch.Size):
            value = tuple(value)
        if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
            items = ", ".join(self.literal(v) for v in value)
            return f"({items},)" if type(value) is tuple and len(value) == 1 else \
                (f"({items})" if type(value) is tuple else f"[{items}]")
        if isinstance(value, dict):
            return "{" + ", ".join(f"{self.literal(k)}: {self.literal(v)}" for k, v in value.items()) + "}"
        if inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value):
            return self.ref(value)
        raise Unsupported(f"cannot write a {type(value).__name__} as a constructor argument")

    # ------------------------------------------------------------------ the closure
    def need(self, obj) -> str:
        """Include `obj` (a composer.layers class or function) and what its code reads; its name."""
        if id(obj) in self.objects:
            return self.objects[id(obj)][1]
        name = obj.__name__
        if name in self.names and self.names[name] is not obj:  # the same name in two layer modules
            name = f"{name}_{obj.__module__.rsplit('.', 1)[-1]}"
        self.objects[id(obj)] = (obj, name, None)
        self.names[name] = obj
        source = textwrap.dedent(_source(obj))
        self.objects[id(obj)] = (obj, name, self._rewrite(source, sys.modules[obj.__module__], name, obj.__name__))
        return name

    def _constant(self, module, name: str) -> str:
        """A module-level assignment of a layers module (a table, a thread-local), included."""
        key = (module.__name__, name)
        if key in self.objects:
            return self.objects[key][1]
        tree = self._tree(module)
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                self.objects[key] = (None, name, None)
                self.names.setdefault(name, key)
                text = ast.get_source_segment(_source(module), node)
                self.objects[key] = (None, name, self._rewrite(text, module, name, name))
                return name
        raise Unsupported(f"{module.__name__}.{name} is not a definition the file can copy")

    def _tree(self, module):
        return _parse(_source(module))

    def _rewrite(self, source: str, module, own: str, new_own: str) -> str:
        """`source` with every name it reads resolved: layer code included (and renamed where the
        file names it differently), imports of other packages collected, composer imports dropped."""
        tree = _parse(source)
        edits = []  # (line, col, end line, end col, text)
        lines = source.splitlines(keepends=True)
        scope = vars(module)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:  # a function-local import of a sibling
                target = sys.modules.get(_absolute(module.__name__, node))
                if target is None:
                    raise Unsupported(f"{module.__name__} imports {_absolute(module.__name__, node)}, not loaded")
                for alias in node.names:
                    value = getattr(target, alias.name)
                    self._bind(alias.asname or alias.name, value, target, edits=None)
                edits.append((node.lineno, 0, node.end_lineno + 1, 0, " " * node.col_offset + "pass\n"))
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and inspect.ismodule(scope.get(node.value.id)) \
                    and scope[node.value.id].__name__.startswith(LAYERS):  # `tables.continuous_table`
                sub = scope[node.value.id]
                name = self._bind(node.attr, getattr(sub, node.attr), sub)
                edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, name))
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id != own \
                    and node.id in scope:  # else a builtin or a local name of a function
                name = self._bind(node.id, scope[node.id], module)
                if name != node.id:
                    edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, name))
        if new_own != own:
            head = tree.body[0]
            edits.append((head.lineno, 0, head.lineno, len(lines[head.lineno - 1].rstrip("\n")),
                          lines[head.lineno - 1].rstrip("\n").replace(own, new_own, 1)))
        return _apply(lines, edits)

    def _bind(self, local: str, value, module, edits=()) -> str:
        """The file's name for `local` as `module` sees it (`value`); includes or imports it."""
        if inspect.ismodule(value):
            if value.__name__.startswith("composer"):
                return local  # its attributes are resolved one by one (`tables.x`)
            self.imports[_import_line(local, value)] = None
            return local
        vmod = getattr(value, "__module__", None) if (inspect.isclass(value) or callable(value)) else None
        if vmod and vmod.startswith(LAYERS) and (inspect.isclass(value) or inspect.isfunction(value)):
            return self.need(value)
        if vmod and vmod.startswith("composer"):
            raise Unsupported(f"layer code reads {vmod}.{local}, which is composer code outside composer.layers")
        if vmod and (inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value)):
            if not _allowed(vmod):
                raise Unsupported(f"layer code reads {vmod}.{local}, which is neither torch nor the standard library")
            line = self._import_of(module, local)
            if line:
                self.imports[line] = None
                return local
        if module.__name__.startswith(LAYERS) and any(
                isinstance(n, (ast.Assign, ast.AnnAssign)) for n in self._tree(module).body):
            try:
                return self._constant(module, local)
            except Unsupported:
                pass
        line = self._import_of(module, local)
        if line:
            self.imports[line] = None
        return local

    def _import_of(self, module, name: str) -> str | None:
        for node in self._tree(module).body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    if (a.asname or a.name.split(".")[0]) == name:
                        return f"import {a.name}" + (f" as {a.asname}" if a.asname else "")
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module != "__future__":
                for a in node.names:
                    if (a.asname or a.name) == name:
                        return f"from {node.module} import {a.name}" + (f" as {a.asname}" if a.asname else "")
        return None

    def render_definitions(self) -> str:
        """Every included definition, dependencies first (base classes, decorators, constants)."""
        order = [k for k, (_, _, text) in self.objects.items() if text is not None]
        texts = {k: self.objects[k][2] for k in order}
        names = {self.objects[k][1]: k for k in order}
        done, out = set(), []

        def visit(k, stack):
            if k in done or k in stack:
                return
            stack.add(k)
            for dep in _eager_names(texts[k]):
                if dep in names:
                    visit(names[dep], stack)
            done.add(k)
            out.append(texts[k].rstrip() + "\n")

        for k in sorted(order, key=self._position):
            visit(k, set())
        return "\n\n".join(out)

    def _position(self, key):
        obj = self.objects[key][0]
        if obj is None:
            return (key[0], 0)
        return (obj.__module__, _line(obj))


def _absolute(package: str, node: ast.ImportFrom) -> str:
    base = package.rsplit(".", node.level)[0] if node.level else ""
    return f"{base}.{node.module}" if node.module else base


def _import_line(local: str, module) -> str:
    name = module.__name__
    if local == name:
        return f"import {name}"
    parent, _, leaf = name.rpartition(".")
    return f"from {parent} import {leaf}" if leaf == local and parent else f"import {name} as {local}"


def _apply(lines: list, edits: list) -> str:
    """Replace (line, col, end line, end col) spans (1-based lines, UTF-8 byte columns)."""
    data = [ln.encode() for ln in lines]
    for line, col, end_line, end_col, text in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        if end_line > len(data):  # a whole-line edit at the end
            end_line, end_col = len(data), len(data[-1])
        start = b"".join(data[:line - 1]) + data[line - 1][:col]
        rest = data[end_line - 1][end_col:] + b"".join(data[end_line:])
        merged = (start + text.encode() + rest).decode()
        data = [ln.encode() for ln in merged.splitlines(keepends=True)]
    return b"".join(data).decode()


def _eager_names(text: str) -> set:
    """The names a definition reads when it runs (bases, decorators, class bodies, defaults), not
    inside function bodies."""
    tree = _parse(text)
    names = set()

    def walk(node, lazy):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in node.decorator_list:
                walk(d, lazy)
            for d in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                walk(d, lazy)
            for stmt in node.body:
                walk(stmt, True)
            return
        if isinstance(node, ast.Lambda):
            return
        if isinstance(node, ast.Name) and not lazy:
            names.add(node.id)
        for child in ast.iter_child_nodes(node):
            walk(child, lazy)

    walk(tree, False)
    return names
