"""The text formats of composer graph: Graphviz DOT, Mermaid, and the HTML page (the SVG with the
per-stage summary table)."""

from __future__ import annotations

import html

from .render_labels import fmt_count
from .render_tree import Column, Diagram, Group, Lanes, Node, Residual

# ---- text formats ----------------------------------------------------------------------------


def _walk_groups(el, visit_node, open_group, close_group):
    if isinstance(el, Node):
        visit_node(el)
    elif isinstance(el, Column):
        for it in el.items:
            _walk_groups(it, visit_node, open_group, close_group)
    elif isinstance(el, Lanes):
        for lane in el.lanes:
            _walk_groups(lane, visit_node, open_group, close_group)
        if el.merge is not None:
            visit_node(el.merge)
    elif isinstance(el, Residual):
        _walk_groups(el.body, visit_node, open_group, close_group)
        visit_node(el.add)
    elif isinstance(el, Group):
        open_group(el)
        _walk_groups(el.body, visit_node, open_group, close_group)
        close_group(el)


def _node_text(n: Node) -> str:
    return n.label + (f"\n{n.note}" if n.note else "")


def to_dot(d: Diagram, direction: str = "TB") -> str:
    from .render_svg import PALETTE

    def q(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = ["digraph model {", f"  label={q(d.title + chr(10) + d.subtitle)}; labelloc=t; fontname=monospace;",
             f"  rankdir={direction}; nodesep=0.3; ranksep=0.35;",
             '  node [shape=box, style="rounded,filled", fontname=monospace, fontsize=11];',
             "  edge [fontname=monospace, fontsize=9, color=\"#555555\"];"]
    depth = [1]

    def visit(n: Node):
        fill, stroke, _ = PALETTE.get(n.cat, PALETTE["misc"])
        shape = "circle" if n.klass == "merge" and len(n.label) <= 1 else "box"
        lines.append("  " * depth[0] + f"{n.id} [label={q(_node_text(n))}, shape={shape}, fillcolor={q(fill)}, "
                     f"color={q(stroke)}{', fontcolor=white' if n.klass == 'io' else ''}];")

    def open_g(g: Group):
        cid = "cluster_" + "".join(c if c.isalnum() else "_" for c in g.id)
        lines.append("  " * depth[0] + f"subgraph {cid} {{")
        depth[0] += 1
        title = g.title + (f"\n{g.subtitle}" if g.subtitle else "")
        lines.append("  " * depth[0] + f'label={q(title)}; style="rounded"; color="#94a3b8";')

    def close_g(g: Group):
        depth[0] -= 1
        lines.append("  " * depth[0] + "}")

    _walk_groups(d.root, visit, open_g, close_g)
    for e in d.edges:
        style = {"skip": ", style=dashed", "named": ", style=bold, color=\"#7c3aed\""}.get(e.kind, "")
        label = f"label={q(e.label)}" if e.label else ""
        attrs = ", ".join(a for a in (label, style.lstrip(", ")) if a)
        lines.append(f"  {e.src} -> {e.dst}" + (f" [{attrs}]" if attrs else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(d: Diagram, direction: str = "TB") -> str:
    def q(text: str) -> str:
        return '"' + html.escape(text, quote=True).replace("\n", "<br/>") + '"'

    lines = ["flowchart TD" if direction == "TB" else f"flowchart {direction}"]
    depth = [1]

    def visit(n: Node):
        text = q(_node_text(n))
        shape = f"(({text}))" if n.klass == "merge" else f"([{text}])" if n.klass == "io" else f"[{text}]"
        lines.append("    " * depth[0] + f"{n.id}{shape}")

    def open_g(g: Group):
        gid = "".join(c if c.isalnum() else "_" for c in g.id)
        lines.append("    " * depth[0] + f"subgraph {gid}[{q(g.title + (chr(10) + g.subtitle if g.subtitle else ''))}]")
        depth[0] += 1
        lines.append("    " * depth[0] + f"direction {direction}")

    def close_g(g: Group):
        depth[0] -= 1
        lines.append("    " * depth[0] + "end")

    _walk_groups(d.root, visit, open_g, close_g)
    for e in d.edges:
        arrow = {"skip": "-.->", "named": "==>"}.get(e.kind, "-->")
        lines.append(f"    {e.src} {arrow}" + (f"|{q(e.label)}|" if e.label else "") + f" {e.dst}")
    return "\n".join(lines) + "\n"


def to_html(d: Diagram, plan, svg: str) -> str:
    from .analyse import rows

    table = rows(plan)
    body = []
    for r in table:
        body.append(f"<tr><td>{html.escape(r.name)}</td><td>{r.blocks or ''}</td><td>{html.escape(r.output)}</td>"
                    f"<td>{r.params:,}</td><td>{fmt_count(r.macs)}</td><td>{html.escape(r.drop_path)}</td></tr>")
    total_p, total_m = sum(r.params for r in table), sum(r.macs for r in table)
    body.append(f"<tr class=total><td>total</td><td></td><td></td><td>{total_p:,}</td><td>{fmt_count(total_m)}</td>"
                "<td></td></tr>")
    svg_inline = svg.split("?>", 1)[-1] if svg.startswith("<?xml") else svg
    title = html.escape(d.title)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #1f2937; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }} p.sub {{ color: #6b7280; margin: 0 0 16px; }}
table {{ border-collapse: collapse; margin: 0 0 24px; font-family: monospace; font-size: 13px; }}
th, td {{ padding: 4px 12px; border-bottom: 1px solid #e5e7eb; text-align: right; }}
th:nth-child(1), td:nth-child(1), th:nth-child(3), td:nth-child(3) {{ text-align: left; }}
tr.total td {{ font-weight: bold; border-top: 2px solid #9ca3af; }}
.diagram {{ overflow: auto; }}
</style></head>
<body>
<h1>{title}</h1>
<p class="sub">{html.escape(d.subtitle)}</p>
<table>
<tr><th>section</th><th>blocks</th><th>output</th><th>params</th><th>MACs</th><th>drop path</th></tr>
{chr(10).join(body)}
</table>
<div class="diagram">
{svg_inline.strip()}
</div>
</body></html>
"""
