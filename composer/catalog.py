"""What exists: the op registry, the composites of the standard library and the zoo (no torch)."""

from __future__ import annotations

import inspect

from . import api
from .ops import OPS
from .resolve import load


def _show_default(field) -> str | None:
    if field.is_required():
        return None
    from .ops.registry import _show

    return _show(field.default)


def _ops(kind_filter=None) -> list[dict]:
    out = []
    for name, cls in sorted(OPS.items()):
        out.append({
            "name": name,
            "kind": cls.kind,
            "category": cls.category,
            "layout": cls.layout,
            "params": [
                {"name": k, "type": _type(f.annotation), "default": _show_default(f), "required": f.is_required()}
                for k, f in cls.model_fields.items()
            ],
            "doc": inspect.cleandoc(cls.__doc__ or ""),
        })
    return out


def _type(annotation) -> str:
    text = str(annotation)
    for junk in ("typing.", "composer.ops.registry.", "composer.ops.attention.", "<class '", "'>"):
        text = text.replace(junk, "")
    return text


def _composites(kind: str) -> list[dict]:
    from .expr import Scope
    from .parse import parse_file  # noqa: F401  (keeps the check path explicit)

    seen, out = set(), []
    files = sorted((api.BLUEPRINTS_DIR / "lib").glob("*.arch")) + api.zoo_files()
    for path in files:
        unit = load(path)
        for c in unit.file.composites:
            if c.kind != kind or c.name in seen:
                continue
            seen.add(c.name)
            out.append({
                "name": c.name,
                "file": str(path.relative_to(api.BLUEPRINTS_DIR)),
                "params": [{"name": p.name, "default": _src(p.default)} for p in c.params],
                "doc": c.doc,
            })
    return out


def _src(expr) -> str | None:
    if expr is None:
        return None
    from .source import SOURCES

    s = expr.span
    src = SOURCES.get(s.file)
    if src is None or s.line != s.end_line:
        return "..."
    return src.line(s.line)[s.column - 1 : s.end_column - 1]


def _models() -> list[dict]:
    out = []
    for name, path in api.zoo_index().items():
        plan = api.load(f"{path}:{name}")
        m = plan.model
        out.append({
            "name": name,
            "file": str(path.relative_to(api.BLUEPRINTS_DIR)),
            "paper": m.paper,
            "reference": m.reference,
            "input": f"{m.input.kind}({m.input.channels}, {'x'.join(map(str, m.input.size))})",
            "params": plan.params,
            "macs": plan.macs,
        })
    return out


def listing(what: str) -> list[dict]:
    if what == "ops":
        return _ops()
    if what in ("mixers", "blocks"):
        return _composites(what[:-1])
    return _models()


def render_listing(what: str, items: list[dict]) -> str:
    lines = []
    if what == "models":
        lines.append(f"{'model':<18} {'params':>12} {'GMACs':>7}  {'reference':<38} file")
        for m in items:
            lines.append(f"{m['name']:<18} {m['params']:>12,} {m['macs'] / 1e9:>7.2f}  {m['reference'] or '-':<38} "
                         f"{m['file']}")
        return "\n".join(lines)
    for it in items:
        params = ", ".join(p["name"] + (f" = {p['default']}" if p.get("default") is not None else "")
                           for p in it["params"])
        tag = f"  [{it['kind']}: {it['category']}, input {it['layout']}]" if what == "ops" else f"  ({it['file']})"
        lines.append(f"{it['name']}({params}){tag}")
        for doc_line in (it["doc"] or "(undocumented)").splitlines():
            lines.append(f"    {doc_line}")
        lines.append("")
    return "\n".join(lines).rstrip()
