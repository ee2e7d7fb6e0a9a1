"""`composer graph`: draw a planned model as a block diagram (SVG, Graphviz DOT, Mermaid or HTML).

The plan is turned into a small diagram tree first (render_tree: nodes, columns, side-by-side lanes,
residuals, titled groups, plus the edges with the tensor shapes on them; labels in render_labels);
render_svg lays the tree out top-down and writes the SVG itself, so no system program is needed;
render_text writes DOT, Mermaid and the HTML page. Repeated blocks of a stage
collapse into one box (`6 x metaformer(attention(...), mlp)`); blocks that differ only in values
(a window shift, a drop-path rate) collapse too, with a note (`shift 0/3`). `--expand` draws every
block with its sub-layers. Named tensors (`save`/`from`) become edges from where they were saved.
Pure Python: no torch.
"""

from __future__ import annotations

FORMATS = (".svg", ".dot", ".mmd", ".html")


def render(plan, fmt: str, expand: bool = False) -> str:
    """The text of the diagram of `plan` in format `fmt` (.svg, .dot, .mmd or .html)."""
    from .render_svg import to_svg
    from .render_text import to_dot, to_html, to_mermaid
    from .render_tree import diagram

    d = diagram(plan, expand)
    if fmt == ".dot":
        return to_dot(d)
    if fmt == ".mmd":
        return to_mermaid(d)
    svg = to_svg(d)
    return to_html(d, plan, svg) if fmt == ".html" else svg
