"""A small YAML writer that keeps comments: a tree of `Y` nodes (scalars, `|-` blocks holding a
pretty-printed document, sequences, mappings) whose `Entry`s carry the comment lines above them
and at the end of their line; `write_yaml` writes it in block style, or in flow style where a
collection is short and has no comment. `composer convert` writes .arch as YAML with it;
composer/yaml_read.py reads YAML blueprints."""

from __future__ import annotations

from dataclasses import dataclass, field

from .pretty import render

WIDTH = 100


@dataclass
class Y:
    kind: str  # "scalar" (text), "block" (a document rendered as a |- block), "seq", "map"
    value: object = None  # scalar text, block doc, or a list of Entry
    dangling: list = field(default_factory=list)  # comment lines after the last item
    after_open: list = field(default_factory=list)  # comments on the line that opens it (.arch `{`)
    block_style: bool = False  # never written as a flow collection

    def depth(self) -> int:
        if self.kind in ("scalar", "block"):
            return 0
        return 1 + max((e.node.depth() for e in self.value), default=0)

    def flow(self) -> str | None:
        """The flow form (one line), or None when it has comments or multi-line parts."""
        if self.kind == "scalar":
            return self.value
        if self.kind == "block" or self.dangling or self.block_style or self.depth() > 2:
            return None
        parts = []
        for e in self.value:
            if e.lead or e.trail:
                return None
            f = e.node.flow()
            if f is None:
                return None
            parts.append(f if e.key is None else f"{e.key}: {f}")
        return ("[" if self.kind == "seq" else "{") + ", ".join(parts) + ("]" if self.kind == "seq" else "}")


@dataclass
class Entry:
    key: str | None  # None: a sequence item
    node: Y
    lead: list = field(default_factory=list)  # comment lines above; "" is a blank line
    trail: list = field(default_factory=list)  # comments at the end of its first line


def plain_ok(s: str, value) -> bool:
    import yaml

    if not s or s != s.strip() or any(ch in s for ch in ",[]{}#\"'") or ": " in s or s.endswith(":") \
            or s[0] in "-?:&*!|>%@`":
        return False
    try:
        back = yaml.safe_load(s)
    except yaml.YAMLError:
        return False
    return type(back) is type(value) and back == value


def ystr(s: str) -> Y:
    """A YAML string scalar whose value is exactly `s`."""
    if not s.isprintable():  # a newline or a control character: YAML reads these only escaped
        return Y("scalar", '"' + s.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"')
    return Y("scalar", s if plain_ok(s, s) else "'" + s.replace("'", "''") + "'")


def _write_value(out: list, head: str, node: Y, indent: int, trail: list) -> None:
    comment = "".join("  " + c for c in trail[:1])
    extra = trail[1:]
    if node.kind == "scalar":
        out.append(f"{head} {node.value}{comment}")
    elif node.kind == "block":
        out.append(f"{head} |-{comment}")
        width = max(40, WIDTH - indent - 2)
        for line in render(node.value, width).split("\n"):
            out.append(" " * (indent + 2) + line if line else "")
    else:
        flow = node.flow()
        if flow is not None and not extra and len(head) + 1 + len(flow) <= WIDTH:
            out.append(f"{head} {flow}{comment}")
            return
        out.append(f"{head}{comment}")
        _write_items(out, node, indent + 2, extra)
        return
    for c in extra:
        out.append(" " * (indent + 2) + c)


def _write_items(out: list, node: Y, indent: int, first_lead=()) -> None:
    pad = " " * indent
    for k, e in enumerate(node.value):
        lead = (list(first_lead) if k == 0 else []) + e.lead
        if lead and lead[0] and out and out[-1].lstrip().startswith("#") \
                and len(out[-1]) - len(out[-1].lstrip()) > indent:
            out.append("")  # a comment closing the block above is not part of this entry's doc
        for c in lead:
            out.append(pad + c if c else "")
        if e.key is not None:
            _write_value(out, pad + e.key + ":", e.node, indent, e.trail)
        elif e.node.kind == "map" and e.node.value and (
                e.node.flow() is None or len(pad) + 2 + len(e.node.flow()) > WIDTH or e.trail):
            # `- key: value` with the mapping's other keys below, aligned
            first, rest = e.node.value[0], e.node.value[1:]
            for c in first.lead:
                out.append(pad + c if c else "")
            _write_value(out, pad + "- " + first.key + ":", first.node, indent + 2, e.trail + first.trail)
            _write_items(out, Y("map", rest, e.node.dangling), indent + 2)
        else:
            _write_value(out, pad + "-", e.node, indent, e.trail)
    for c in node.dangling:
        out.append(pad + c if c else "")


def write_yaml(root: Y, header: list[str], tail: list[str], header_blank: bool = True) -> str:
    out = list(header)
    if header and root.value and header_blank:
        out.append("")
    _write_items(out, root, 0)
    if tail:
        out += [""] + tail if out else tail
    return "\n".join(out) + "\n"
